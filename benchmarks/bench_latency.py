"""Side-by-side CPU latency of a SnapGen model and its baseline at the same resolution:
the UNet vs. the SDXL UNet (sec. 3.1), or the tiny decoder vs. the SD3 decoder (Table 2).

The machine is shared and noisy, so the two models are timed *interleaved* in one
process (A, B, A, B, ...) and only their ratio is compared with the ratio of their MACs
(counted on the meta device, MACs = FLOPs / 2). Prints a line per resolution to stderr and
one JSON line to stdout.

    python benchmarks/bench_latency.py --resolution 512 1024 --runs 3
    python benchmarks/bench_latency.py --model decoder --preset snapgen-decoder --baseline sd3-decoder
    python benchmarks/bench_latency.py ... --compile   # both models through torch.compile (inductor)

``--compile`` runs *both* models through ``torch.compile`` with inductor's weight freezing
(on CPU it fuses each conv with the elementwise ops around it into one oneDNN call), which
is what a deployment runtime does too; compilation happens in the warm-up call.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch

from snapgen_cli.core.measure import count_params
from snapgen_cli.stages.bench_device import Config, build_target, meta_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="snapgen-t2i")
    ap.add_argument("--baseline", default="sdxl-unet", choices=["sdxl-unet", "sd3-decoder"])
    ap.add_argument("--model", default="unet", choices=["unet", "decoder"])
    ap.add_argument("--resolution", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (inductor, frozen weights)")
    args = ap.parse_args()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    torch.manual_seed(0)
    results = []
    for res in args.resolution:
        cfg = Config(model=args.model, preset=args.preset, resolution=res, runs=args.runs)
        entries = {}
        for target in (args.model, args.baseline):
            macs = meta_figures(cfg, target)["macs"]
            real = build_target(cfg, target, meta=False)
            model = real.model.eval()
            fn = functools.partial(real.call, model)  # e.g. model.decode(z): compile the call, not the module
            entries[target] = dict(name=real.name, params=count_params(model), macs=macs,
                                   fn=torch.compile(fn) if args.compile else fn,
                                   inputs=real.make_inputs(torch.device("cpu"), torch.float32), times=[])
        with torch.no_grad():
            for e in entries.values():
                for _ in range(args.warmup):
                    e["fn"](e["inputs"])
            for _ in range(args.runs):
                for e in entries.values():
                    t0 = time.perf_counter()
                    e["fn"](e["inputs"])
                    e["times"].append(time.perf_counter() - t0)
        a, b = entries[args.model], entries[args.baseline]
        row = dict(resolution=res, latent=res // 8, runs=args.runs, threads=torch.get_num_threads(),
                   compiled=args.compile)
        for key, e in ((args.model, a), (args.baseline, b)):
            row[key] = dict(name=e["name"], params=e["params"], gmacs=e["macs"] / 1e9,
                            latency_s_median=statistics.median(e["times"]), latency_s_all=e["times"])
        row["mac_ratio"] = b["macs"] / a["macs"]
        row["latency_ratio"] = statistics.median(b["times"]) / statistics.median(a["times"])
        print(f"{res}px: {a['name']} {statistics.median(a['times']):.2f}s ({a['macs'] / 1e9:.0f} GMACs) vs "
              f"{b['name']} {statistics.median(b['times']):.2f}s ({b['macs'] / 1e9:.0f} GMACs): "
              f"latency ratio {row['latency_ratio']:.2f}x, MAC ratio {row['mac_ratio']:.2f}x", file=sys.stderr)
        results.append(row)
        del entries
    print(json.dumps(dict(benchmark="latency", results=results)))


if __name__ == "__main__":
    main()
