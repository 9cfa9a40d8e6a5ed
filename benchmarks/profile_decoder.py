"""Where the tiny decoder's CPU time goes: eager fp32 time by op kind, with each conv kind's MACs.

The decoder's latency ratio to the SD3 decoder stays below their MAC ratio on CPU (see
``bench_latency.py``); this splits the tiny decoder's time into the dense 3x3 convs
(upsamplers, ``conv_in``/``conv_out``), pointwise and depthwise convs (the separable
residual blocks) and the elementwise ops around them (SiLU, residual add, nearest
upsampling, GroupNorm), which carry no MACs but read and write full-resolution maps.

    python benchmarks/profile_decoder.py --resolution 512 --runs 3
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
from torch.profiler import profile
from snapgen_cli.core.decoder import build_decoder
from snapgen_cli.core.measure import count_macs

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution")


def conv_kind(weight_shape: list[int]) -> str:
    return "depthwise" if weight_shape[1] == 1 else ("pointwise" if weight_shape[2] == 1 else "dense3x3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="snapgen-decoder")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dec = build_decoder(args.preset).eval()
    z = torch.randn(1, dec.config.latent_channels, args.resolution // 8, args.resolution // 8)
    macs: dict[str, float] = collections.defaultdict(float)  # per conv kind, from one hooked pass

    def count(mod: torch.nn.Conv2d, inputs, out: torch.Tensor) -> None:
        macs[conv_kind(list(mod.weight.shape))] += mod.weight[0].numel() * out.numel()

    hooks = [m.register_forward_hook(count) for m in dec.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        dec(z)
        for h in hooks:
            h.remove()
        with profile(record_shapes=True) as prof:
            for _ in range(args.runs):
                dec(z)
    ms: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        t = e.self_cpu_time_total / args.runs / 1e3
        if e.key in CONV_OPS and len(e.input_shapes) > 1 and len(e.input_shapes[1]) == 4:
            ms[conv_kind(e.input_shapes[1])] += t
        elif e.key.startswith("aten::") and e.key not in ("aten::conv2d", "aten::_convolution"):
            ms[e.key.removeprefix("aten::")] += t
    total = sum(ms.values())
    rows = {k: dict(ms=round(v, 1), share=round(v / total, 3),
                    gmacs=round(macs[k] / 1e9, 2) if k in macs else 0.0,
                    gmacs_per_s=round(macs[k] / 1e9 / (v / 1e3), 1) if k in macs else None)
            for k, v in sorted(ms.items(), key=lambda kv: -kv[1]) if v >= 0.5}
    for k, r in rows.items():
        print(f"{k:22s} {r['ms']:8.1f} ms {100 * r['share']:5.1f}%  {r['gmacs']:6.2f} GMACs", file=sys.stderr)
    print(json.dumps(dict(benchmark="decoder_profile", preset=args.preset, resolution=args.resolution,
                          threads=torch.get_num_threads(), total_ms=round(total, 1),
                          total_gmacs=round(count_macs(lambda: dec(z)) / 1e9, 2), ops=rows)))  # cross-check


if __name__ == "__main__":
    main()
