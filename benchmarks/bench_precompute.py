"""Throughput of ``snapgen precompute`` on this machine (images/s).

Two figures for the same images at one resolution (default 256^2):

* ``end_to_end``: the whole stage -- PNG decode, validation, resize + crop, AE encode,
  shard write and manifest -- over a folder of random 320x288 PNGs;
* ``vae_only``: ``AutoencoderKL.encode`` on ready (B, 3, R, R) tensors, the same batches.

The AE is a tiny random ``AutoencoderKL`` (16 latent channels, f = 8, the SD3 layout
thinned to 8/8/16/16 channels) unless ``--vae`` names a real one; text encoders are off.
Prints one JSON line on stdout and a human line on stderr.

    python benchmarks/bench_precompute.py [--num-images 64] [--resolution 256] [--vae PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                  scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=False).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=2, help="image decoding threads")
    ap.add_argument("--vae", default=None, help="a diffusers AutoencoderKL folder (default: a tiny random one)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL

    from snapgen_cli.stages import precompute as pc
    from snapgen_cli.stages.base import StageContext

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_path = Path(args.vae) if args.vae else tiny_vae(tmp / "vae")
        rng = np.random.default_rng(0)
        (tmp / "images").mkdir()
        for i in range(args.num_images):
            Image.fromarray(rng.integers(0, 256, (320, 288, 3), dtype=np.uint8)).save(tmp / "images" / f"{i:05d}.png")

        cfg = pc.Config(source=str(tmp / "images"), vae=str(vae_path), resolutions=[args.resolution], encoders=[],
                        batch_size=args.batch_size, shard_size=max(args.batch_size, 64), num_workers=args.num_workers,
                        device=args.device)
        t = time.perf_counter()
        summary = pc.run(cfg, StageContext(out_dir=tmp / "out"))
        end_to_end = summary["num_samples"] / (time.perf_counter() - t)

        vae = AutoencoderKL.from_pretrained(vae_path, subfolder=pc._vae_location(cfg)[1]).to(args.device).eval()
        x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=args.device) * 2 - 1
        with torch.no_grad():
            vae.encode(x[:1])  # warm-up
            t, done = time.perf_counter(), 0
            while done < args.num_images:
                vae.encode(x[: min(args.batch_size, args.num_images - done)]).latent_dist.mean.sum().item()
                done += min(args.batch_size, args.num_images - done)
            vae_only = done / (time.perf_counter() - t)

    result = {"benchmark": "precompute", "resolution": args.resolution, "num_images": args.num_images,
              "batch_size": args.batch_size, "vae": args.vae or "tiny-random (8/8/16/16, 16ch, f=8)",
              "device": args.device, "threads": torch.get_num_threads(),
              "end_to_end_images_per_s": round(end_to_end, 2), "vae_only_images_per_s": round(vae_only, 2)}
    print(json.dumps(result))
    print(f"precompute {args.resolution}^2 on {args.device} ({torch.get_num_threads()} threads): "
          f"{end_to_end:.1f} images/s end to end (decode+resize+encode+write), {vae_only:.1f} images/s AE encode only",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
