"""``snapgen generate``: prompts -> PNGs from a trained pipeline directory, or from an export.

Uses the tiny decoder when the pipeline (or ``--decoder``) names one, otherwise the
autoencoder's own decoder. ``--backend onnxruntime --checkpoint EXPORT_DIR`` runs the whole
pipeline (text encoders, the sampler loop with CFG, the UNet, the tiny decoder) from the ONNX
artefacts of ``snapgen export`` on ONNX Runtime (``export/runtime.py``): the same sampler code,
so the same seed gives the same image as the PyTorch pipeline within the export's parity.
Image ``i`` uses seed ``seed + i``: the same seed gives the same image whatever the batch size.
Writes ``<out>/<i:05d>.png``, ``<out>/prompts.jsonl`` (one line per image: file, prompt, seed)
and ``<out>/grid.png``: one row per prompt with its ``images_per_prompt`` images (one image per
prompt: up to 8 prompts a row).

``--dtype`` / ``--compile`` (``core/speed.py``): bf16 and ``torch.compile`` with CUDA graphs by
default on CUDA, fp32 eager elsewhere. The result reports the settings used and the seconds spent
encoding text, denoising and decoding apart, with ``samples_per_s`` over denoising + decoding
(the text encoders run once per prompt; PNG writing is not counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import UNSET_IS_PREVIOUS
from ..core.flow import Guidance
from ..core.speed import InferenceSpeed
from ..errors import ConfigError
from ..files import atomic_write_text
from .base import CfgEnd, CfgInterval, CfgScale, ImageSize, PlanItem, StageContext, Steps, sampler_defaults


class Config(InferenceSpeed):
    checkpoint: str | None = Field(None, description="pipeline dir (a training stage's output); default: previous "
                                                      "stage", json_schema_extra=UNSET_IS_PREVIOUS)
    prompts: list[str] = Field(default_factory=list)
    prompt_file: str | None = Field(None, description="a text file, one prompt per line")
    steps: Steps = None
    guidance: CfgScale = None
    guidance_end: CfgEnd = None
    guidance_interval: CfgInterval = None
    seed: int = Field(0, ge=0)
    size: ImageSize = None
    batch_size: int = Field(4, gt=0)
    images_per_prompt: int = Field(1, gt=0)
    encoders: list[str] | None = Field(None, description="use only these text encoders (others dropped)")
    decoder: str | None = Field(None, description="tiny decoder dir (overrides the pipeline's)")
    vae: str | None = Field(None, description="AutoencoderKL dir or hub id (overrides the pipeline's)")
    device: str = "cpu"
    grid: bool = True
    backend: Literal["pytorch", "onnxruntime"] = Field(
        "pytorch", description="pytorch: a pipeline dir; onnxruntime: a `snapgen export` dir (its ONNX models)")
    onnx_precision: Literal["fp32", "fp16"] = Field("fp32", description="onnxruntime backend: which ONNX variant")

    @model_validator(mode="after")
    def _some_prompts(self):
        if not self.prompts and not self.prompt_file:
            raise ValueError("give prompts (arguments) or a prompt_file")
        return self


def read_prompts(cfg: Config) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file {str(path)!r}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt_file {cfg.prompt_file!r}: holds no prompts")
    return prompts


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    ckpt = ctx.resolve_input(cfg.checkpoint)
    n = len(cfg.prompts) * cfg.images_per_prompt if not cfg.prompt_file else None
    return [PlanItem(model=f"pipeline {ckpt}", inputs=[str(ckpt)], outputs=[str(ctx.out_dir / "grid.png")],
                     notes=f"{n if n is not None else '?'} images, {cfg.steps or 'default'} steps, "
                           f"cfg {cfg.guidance or 'default'}")]


def run(cfg: Config, ctx: StageContext) -> dict:
    import torch

    from ..core.measure import resolve_device
    from ..core.pipeline import load_pipeline
    from ..data.images import save_png

    ckpt = ctx.resolve_input(cfg.checkpoint)
    if ckpt is None:
        raise ConfigError("checkpoint: give the pipeline dir to generate from (--checkpoint)")
    prompts = [p for p in read_prompts(cfg) for _ in range(cfg.images_per_prompt)]
    if cfg.backend == "onnxruntime":
        from ..export.runtime import OnnxRuntimePipeline

        if cfg.decoder or cfg.vae:
            raise ConfigError("--decoder/--vae: the onnxruntime backend decodes with the exported decoder; "
                              "export the pipeline with the decoder you want instead")
        if cfg.dtype != "auto" or cfg.compile:
            raise ConfigError("--dtype/--compile: the onnxruntime backend runs the exported models; choose their "
                              "precision with --onnx-precision")
        pipe = OnnxRuntimePipeline.from_export(ckpt, precision=cfg.onnx_precision, device=cfg.device)
    else:
        pipe = load_pipeline(ckpt, decoder=cfg.decoder, vae=cfg.vae, device=resolve_device(cfg.device),
                             dtype=cfg.dtype, compile=cfg.compile)
    pipe.set_progress_bar_config(disable=False, file=ctx.console.file, leave=False)
    cfg = sampler_defaults(cfg, pipe)
    guidance = Guidance(scale=cfg.guidance, scale_end=cfg.guidance_end, interval=cfg.guidance_interval)
    gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=cfg.steps, guidance=guidance, generator=gens, size=cfg.size,
                  batch_size=cfg.batch_size, encoders=cfg.encoders).images
    out = ctx.out_dir
    lines = []
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        save_png(img, out / f"{i:05d}.png")
        lines.append({"file": f"{i:05d}.png", "prompt": prompt, "seed": cfg.seed + i})
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    result = {"out_dir": str(out), "images": len(images), "files": [x["file"] for x in lines]}
    timings = pipe.last_timings
    seconds = timings["denoising_s"] + timings["decoding_s"]
    result |= {"timings": timings, "samples_per_s": len(images) / max(seconds, 1e-9),
               **(pipe.speed_settings if cfg.backend == "pytorch" else {"onnx_precision": cfg.onnx_precision})}
    if cfg.grid:
        cols = cfg.images_per_prompt if cfg.images_per_prompt > 1 else min(len(images), 8)  # a row per prompt
        save_png(images, out / "grid.png", cols=cols)
        result["grid"] = str(out / "grid.png")
    return result
