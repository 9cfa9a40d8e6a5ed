"""CPU training throughput: SnapGen UNets vs. diffusers ``UNet2DConditionModel`` of about the
same parameter count, same batch and latent size, measured interleaved in one process.

One training step = forward + MSE loss + backward + AdamW step (fp32: bf16 autocast is
~30x slower on these CPUs). The comparison models are SDXL-style diffusers UNets whose
widths are chosen to match the SnapGen model's parameter count within a few percent.

    python benchmarks/bench_train_throughput.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from snapgen_cli.core.measure import count_params
from snapgen_cli.core.unet import build_unet

#: diffusers UNets sized like the SnapGen presets (SDXL block layout, 64-wide heads).
DIFFUSERS_MATCH = {
    "tiny": dict(block_out_channels=(24, 48, 96), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                 attention_head_dim=(2, 4, 8), cross_attention_dim=64),  # 2.35M vs 2.10M
    "snapgen-t2i": dict(block_out_channels=(256, 512, 768), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
                        attention_head_dim=(4, 8, 12), cross_attention_dim=2304),  # 367.1M vs 374.8M
}


def diffusers_unet(preset: str, in_channels: int) -> UNet2DConditionModel:
    cfg = DIFFUSERS_MATCH[preset]
    return UNet2DConditionModel(
        in_channels=in_channels, out_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        norm_num_groups=min(32, cfg["block_out_channels"][0] // 4), **cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiny-batch", type=int, default=32)
    ap.add_argument("--tiny-latent", type=int, default=8)
    ap.add_argument("--big-batch", type=int, default=2)
    ap.add_argument("--big-latent", type=int, default=32, help="32: a 256^2 image")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for preset, batch, lat, tokens in (("tiny", args.tiny_batch, args.tiny_latent, 16),
                                       ("snapgen-t2i", args.big_batch, args.big_latent, 333)):
        ours = build_unet(preset)
        c = ours.config
        theirs = diffusers_unet(preset, c.in_channels)
        x = torch.randn(batch, c.in_channels, lat, lat)
        t = torch.rand(batch) * 1000
        ctx = torch.randn(batch, tokens, c.context_dim)
        pooled = torch.randn(batch, c.pooled_dim)
        calls = {
            "snapgen": (ours, lambda m: m(x, t, ctx, pooled).sample),
            "diffusers": (theirs, lambda m: m(x, t, ctx[..., :m.config.cross_attention_dim]).sample),
        }
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, (m, _) in calls.items()}
        times: dict[str, list[float]] = {k: [] for k in calls}

        def step(k):
            m, f = calls[k]
            loss = (f(m) - x).square().mean()
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

        for k in calls:  # warm-up
            step(k)
        for _ in range(args.runs):
            for k in calls:
                t0 = time.perf_counter()
                step(k)
                times[k].append(time.perf_counter() - t0)
        row = dict(preset=preset, batch=batch, latent=lat, tokens=tokens, threads=torch.get_num_threads())
        for k, (m, _) in calls.items():
            med = statistics.median(times[k])
            row[k] = dict(params=count_params(m), step_s=med, samples_per_s=batch / med)
        row["ratio_snapgen_over_diffusers"] = row["snapgen"]["samples_per_s"] / row["diffusers"]["samples_per_s"]
        print(f"{preset}: snapgen {row['snapgen']['params'] / 1e6:.1f}M {row['snapgen']['samples_per_s']:.2f} samples/s | "
              f"diffusers UNet2DConditionModel {row['diffusers']['params'] / 1e6:.1f}M "
              f"{row['diffusers']['samples_per_s']:.2f} samples/s | ratio {row['ratio_snapgen_over_diffusers']:.2f}x "
              f"(batch {batch}, {lat}x{lat} latent)", file=sys.stderr)
        rows.append(row)
        del calls, opts, ours, theirs
    print(json.dumps(dict(benchmark="train_throughput", results=rows)))


if __name__ == "__main__":
    main()
