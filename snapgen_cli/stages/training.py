"""What the denoiser-training stages (pretrain, finetune) share: inputs, plan, run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.measure import count_params
from ..core.unet import SnapGenUNet, unet_config
from ..errors import ConfigError
from ..train.diffusion import DiffusionConfig, DiffusionTask
from ..train.loop import train
from .base import PlanItem, StageContext


def inputs(cfg: DiffusionConfig, ctx: StageContext) -> tuple[Path, Path | None]:
    data = ctx.resolve_input(cfg.data)
    if data is None:
        raise ConfigError("data: no precompute output given (set `data`, or put a precompute stage before this one)")
    init = ctx.resolve_input(cfg.init_from) if cfg.init_from not in (None, "", "none") else None
    return data, init


def plan_training(cfg: DiffusionConfig, ctx: StageContext) -> list[PlanItem]:
    data, init = inputs(cfg, ctx)
    with torch.device("meta"):
        params = count_params(SnapGenUNet(**unet_config(cfg.model, **cfg.model_overrides)))
    what = f"unet:{cfg.model}" if init is None else f"unet from {init}"
    return [PlanItem(model=what, params=params, inputs=[str(data)] + ([str(init)] if init else []),
                     outputs=[str(ctx.out_dir / "model_ema"), str(ctx.out_dir / "pipeline.json")],
                     notes=f"{cfg.objective} @{cfg.resolution}px, {cfg.steps} steps x {cfg.batch_size}")]


def run_training(cfg: DiffusionConfig, ctx: StageContext) -> dict:
    data, init = inputs(cfg, ctx)
    task = DiffusionTask(cfg, data, init, ctx.console)
    task.pipeline_spec().save(ctx.out_dir)
    summary = train(task, cfg, ctx.out_dir, resume=cfg.resume, console=ctx.console)
    return summary
