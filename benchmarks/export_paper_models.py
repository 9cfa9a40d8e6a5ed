"""Closing figure of issue 15: the paper's models at the paper's size through ``snapgen export``.

Builds a pipeline dir holding ``snapgen-t2i`` (the 379M-class UNet, sec. 3.1) and
``snapgen-decoder`` (1.38M, sec. 3.2) with random weights, a 4-step sampler without CFG (the
step-distilled student, sec. 3.4) and stand-in text encoders of the student's widths (random
one-layer CLIP-L 768, CLIP-G 1280, Gemma 2304 with CLIP's tokenizer: the real ones cannot be
downloaded here; they are only loaded, not exported), then runs the export stage's ``run`` on
the UNet and the decoder at 1024^2 and prints one JSON object: per artefact the conversion
time, the file size against ``params x bits / 8`` of the paper's counts, and the parity
figures of the gate (ONNX Runtime vs PyTorch at 1024^2 batch 1 and 512^2 batch 2).

    python benchmarks/export_paper_models.py --formats onnx --out /tmp/paper-export \\
        --json-out benchmarks/results/export_paper_models.json

``--formats coreml onnx`` adds the Core ML packages (fp16; ``--palettize`` for 6-bit) once
``snapgen_cli/export/coreml.py`` is in. Slow: minutes on a laptop CPU, several GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch


def build_pipeline(root: Path, resolution: int) -> Path:
    """The paper's UNet and decoder (random weights) with stand-in encoders of the student's widths."""
    from snapgen_cli.core.decoder import build_decoder
    from snapgen_cli.core.flow import RectifiedFlow
    from snapgen_cli.core.pipeline import SnapGenPipeline
    from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip, make_tiny_gemma, student
    from snapgen_cli.core.unet import build_unet

    clip_l, clip_g, gemma = student()
    paths = dict(clip_l=make_tiny_clip(root / "clip_l", hidden_size=768, num_layers=1, num_heads=12),
                 clip_g=make_tiny_clip(root / "clip_g", hidden_size=1280, num_layers=1, num_heads=20),
                 gemma=make_tiny_gemma(root / "gemma", hidden_size=2304, num_layers=1))
    specs = [EncoderSpec.model_validate({**s.model_dump(), "path": str(paths[s.name])})
             for s in (clip_l, clip_g, gemma)]
    torch.manual_seed(0)
    SnapGenPipeline(unet=build_unet("snapgen-t2i"), scheduler=RectifiedFlow(shift=3.0).scheduler(1),
                    text_encoder=TextEncoderStack(specs), decoder=build_decoder("snapgen-decoder"),
                    resolution=resolution, latent=dict(channels=16, downsample=8, scaling_factor=1.5305,
                                                       shift_factor=0.0609),
                    sampler=dict(num_inference_steps=4, guidance_scale=1.0)).save_pretrained(root / "pipe")
    return root / "pipe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["onnx"], choices=["onnx", "coreml"])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--palettize", action="store_true", help="Core ML: 6-bit palettization")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 ONNX variant")
    ap.add_argument("--out", type=Path, default=Path("/tmp/snapgen-paper-export"))
    ap.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    from snapgen_cli.core.decoder import PAPER_DECODER
    from snapgen_cli.core.unet import PAPER_PARAMS
    from snapgen_cli.stages import export
    from snapgen_cli.stages.base import StageContext

    args.out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()  # the machine may be shared: the load says how contended the timings are
    t0 = time.perf_counter()
    pipe = build_pipeline(args.out, args.resolution)
    built = time.perf_counter() - t0
    cfg = export.Config(checkpoint=str(pipe), formats=args.formats, components=["unet", "decoder"],
                        resolution=args.resolution, palettize=args.palettize, onnx_fp16=not args.no_fp16)
    t0 = time.perf_counter()
    summary = export.run(cfg, StageContext(out_dir=args.out / "export"))
    wall = time.perf_counter() - t0
    manifest = json.loads((args.out / "export" / export.RESULT_FILE).read_text())
    paper = {"unet": PAPER_PARAMS["snapgen-t2i"], "decoder": PAPER_DECODER["params"]}
    rows = []
    for a in manifest["artefacts"]:
        bits = a["palettize_bits"] or {"fp32": 32, "fp16": 16}[a["precision"]]
        rows.append(dict(model=a["model"], format=a["format"], precision=a["precision"],
                         palettize_bits=a["palettize_bits"], params=a["params"], export_s=a["export_s"],
                         size_bytes=a["size_bytes"], size_mib=round(a["size_bytes"] / 2**20, 1),
                         paper_params=paper[a["model"]],
                         paper_implied_mib=round(paper[a["model"]] * bits / 8 / 2**20, 1),
                         parity=[dict(where=p["where"], min_db=p["min_db"], threshold_db=p["threshold_db"])
                                 for p in a["parity"]]))
    result = dict(
        what="snapgen-t2i UNet and snapgen-decoder, random weights, through `snapgen export` (stages/export.py)",
        resolution=args.resolution, formats=args.formats, sampler=dict(steps=4, guidance=1.0, unet_batch=1),
        artefacts=rows, stage_wall_s=round(wall, 1), pipeline_build_s=round(built, 1),
        peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        machine=dict(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
                     torch=torch.__version__, onnx=version("onnx"), onnxruntime=version("onnxruntime"),
                     load_average_start=load0, load_average_end=os.getloadavg()),
        summary=summary)
    text = json.dumps(result, indent=2, default=str)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(json.dumps(result, default=str))
    print(f"done in {wall:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
