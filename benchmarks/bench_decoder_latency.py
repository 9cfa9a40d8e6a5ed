"""Side-by-side CPU latency: the tiny decoder vs. the SD3 VAE decoder (paper sec. 3.2, Table 2).

Both decode the same random 16-channel latent (random weights: latency does not depend on
them) at every requested resolution, in ONE process. The machine is shared and noisy, so
the two are timed *interleaved* (tiny, SD3, tiny, SD3, ...) and what is compared is the
ratio of their median latencies, next to the ratio of their MACs (counted on the meta
device, MACs = FLOPs / 2) and the paper's figures (Table 2: 1.38M / 224 G vs 49.55M /
4970 G at 1024^2). Prints one human line per resolution on stderr and one JSON line on
stdout. Mirrors ``bench_unet_latency.py`` with the decoder pair and per-resolution runs.

    python benchmarks/bench_decoder_latency.py                       # 1024 (2 runs) and 512 (3 runs)
    python benchmarks/bench_decoder_latency.py --resolution 512 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from snapgen_cli.core.measure import count_macs, count_params
from snapgen_cli.stages.bench_device import PAPER_DECODER, Config, build_target

PAIR = ("decoder", "sd3-decoder")


def _entry(cfg: Config, target: str) -> dict:
    meta = build_target(cfg, target, meta=True)
    macs = count_macs(lambda: meta.call(meta.model, meta.make_inputs(torch.device("meta"), torch.float32)))
    real = build_target(cfg, target, meta=False)
    return dict(name=real.name, params=count_params(real.model), macs=macs, model=real.model.eval(), call=real.call,
                inputs=real.make_inputs(torch.device("cpu"), torch.float32), times=[])


@torch.no_grad()
def interleaved(entries: list[dict], runs: int, warmup: int) -> None:
    """Warm each up, then time them in turn, ``runs`` rounds; wall times go to ``entry["times"]``."""
    for e in entries:
        for _ in range(warmup):
            e["call"](e["model"], e["inputs"])
    for _ in range(runs):
        for e in entries:
            t0 = time.perf_counter()
            e["call"](e["model"], e["inputs"])
            e["times"].append(time.perf_counter() - t0)


def bench(resolution: int, runs: int, warmup: int, preset: str) -> dict:
    cfg = Config(model="decoder", preset=preset, resolution=resolution, runs=runs)
    tiny, sd3 = (_entry(cfg, t) for t in PAIR)
    interleaved([tiny, sd3], runs, warmup)
    row = dict(resolution=resolution, latent=resolution // 8, runs=runs, warmup=warmup,
               threads=torch.get_num_threads())
    for key, e in (("tiny", tiny), ("sd3", sd3)):
        row[key] = dict(name=e["name"], params=e["params"], gmacs=e["macs"] / 1e9,
                        latency_s_median=statistics.median(e["times"]), latency_s_all=e["times"])
        paper = PAPER_DECODER.get(e["name"])
        if paper and resolution == 1024:
            row[key] |= dict(paper_params=paper["params"], paper_gmacs=paper["macs"] / 1e9)
    row["mac_ratio"] = sd3["macs"] / tiny["macs"]
    row["param_ratio"] = sd3["params"] / tiny["params"]
    row["latency_ratio"] = row["sd3"]["latency_s_median"] / row["tiny"]["latency_s_median"]
    print(f"{resolution}px ({row['threads']} threads): {tiny['name']} {row['tiny']['latency_s_median']:.3f}s "
          f"({tiny['macs'] / 1e9:.0f} GMACs, {tiny['params'] / 1e6:.2f}M) vs {sd3['name']} "
          f"{row['sd3']['latency_s_median']:.2f}s ({sd3['macs'] / 1e9:.0f} GMACs, {sd3['params'] / 1e6:.2f}M): "
          f"latency ratio {row['latency_ratio']:.1f}x, MAC ratio {row['mac_ratio']:.1f}x", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="snapgen-decoder")
    ap.add_argument("--resolution", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (at 1024^2: --runs-1024)")
    ap.add_argument("--runs-1024", type=int, default=2, help="timed rounds at 1024^2 (the SD3 decoder is slow)")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = [bench(res, args.runs_1024 if res == 1024 else args.runs, args.warmup, args.preset)
               for res in args.resolution]
    print(json.dumps(dict(benchmark="decoder_latency", results=results)))


if __name__ == "__main__":
    main()
