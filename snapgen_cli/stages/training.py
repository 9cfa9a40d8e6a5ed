"""What the denoiser-training stages (pretrain, finetune) share: inputs, plan, run.

A stage's output directory is a :class:`~snapgen_cli.core.pipeline.SnapGenPipeline`
(``SnapGenPipeline.from_pretrained(out)``): ``unet/`` holds the EMA weights the pipeline
samples with, ``model/`` the raw weights, plus the loop's checkpoints and logs.

The plan reports the UNet the stage really builds: the ``init_from`` checkpoint's (read from
its ``config.json``, or from the plan of the earlier stage that writes it), else the preset
with the data's latent channels and text-encoder widths (read from the shards' manifest, or
from the plan of the precompute stage that writes them) and ``model_overrides``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import denoiser
from ..core.measure import count_params
from ..core.text import TextLayout, parse_specs
from ..data.shards import MANIFEST, encoder_specs, read_manifest
from ..errors import ConfigError
from ..train.diffusion import DiffusionConfig, DiffusionTask, init_unet_dir
from ..train.loop import train
from .base import PlanItem, StageContext, is_main_process, seeded, wait_for_everyone


def refuse_model_with_init(cfg: DiffusionConfig, init: str | Path | None, where: str = "") -> None:
    """Decision (issue 16 item 3): ``model`` / ``model_overrides`` set together with a checkpoint to
    start from is an error (exit 2) naming both keys, never a silently ignored key. A checkpoint
    carries its own architecture (its ``config.json``), so the keys could only be ignored or
    contradict it; refusing also catches a recipe stage copied from a from-scratch one. Only keys
    the user gave count (a recipe key, a flag): the defaults never clash."""
    given = [k for k in ("model", "model_overrides") if k in cfg.model_fields_set]
    if init is not None and given:
        raise ConfigError(f"{where}{given[0]}: set together with init_from ({init}), whose checkpoint fixes the "
                          f"architecture, so {' and '.join(given)} would be ignored; remove {' and '.join(given)}, "
                          f'or set init_from = "none" to build {cfg.model!r} from scratch')


def inputs(cfg: DiffusionConfig, ctx: StageContext) -> tuple[Path, Path | None]:
    data = ctx.resolve_input(cfg.data)
    if data is None:
        raise ConfigError("data: no precompute output given (set `data`, or put a precompute stage before this one)")
    init = ctx.resolve_input(cfg.init_from) if cfg.init_from not in (None, "", "none") else None
    refuse_model_with_init(cfg, init)
    return data, init


def _data_info(data: Path, ctx: StageContext, role: str = "student") -> tuple[int | None, TextLayout]:
    """(latent channels, the ``role``'s text layout) of the shards at ``data``: their manifest,
    or the plan of the earlier stage that writes them."""
    if (data / MANIFEST).is_file():
        m = read_manifest(data)
        channels, specs = m["latent"]["channels"], encoder_specs(m, role)
    elif planned := ctx.planned_for(data):
        channels, specs = planned.get("latent_channels"), planned.get("text_encoders", {}).get(role, [])
    else:
        raise ConfigError(f"data: {data} holds no {MANIFEST}; point it at a `snapgen precompute` output")
    if not specs:
        flag = "--encoders" if role == "student" else "--teacher-encoders"
        raise ConfigError(f"data: the shards in {data} hold no {role} text features (precompute with {flag})")
    return channels, TextLayout.from_specs(parse_specs(specs, "encoders"))


def _init_config(init: Path, cfg: DiffusionConfig, ctx: StageContext) -> dict:
    """The config of the UNet at ``init``: its ``config.json``, or the plan of the stage that writes it."""
    if init.exists():
        return denoiser.saved_config(init_unet_dir(init, cfg.init_weights))
    if planned := ctx.planned_for(init).get("unet_config"):
        return dict(planned)
    raise ConfigError(f"init_from: {init} does not exist (and no earlier stage of the recipe writes it)")


def plan_training(cfg: DiffusionConfig, ctx: StageContext) -> list[PlanItem]:
    data, init = inputs(cfg, ctx)
    channels, layout = _data_info(data, ctx, cfg.text_role)
    config = _init_config(init, cfg, ctx) if init is not None else None
    params, note = None, f"{cfg.objective} @{cfg.resolution}px, {cfg.steps} steps x {cfg.batch_size}"
    if config is None and channels is not None:
        config = denoiser.fresh_config(cfg.model, channels, layout, cfg.model_overrides)
    if config is not None:
        denoiser.check_fits(config, config["in_channels"] if channels is None else channels, layout, data)
        with torch.device("meta"):
            params = count_params(denoiser.build(config))
    else:
        note += "; the latent channels are known once the autoencoder exists"
    what = f"unet:{cfg.model}" if init is None else f"unet from {init} (its saved architecture)"
    resumed = [str(cfg.resume)] if cfg.resume not in (None, "auto") else []  # a checkpoint, or a run's newest one
    return [PlanItem(model=what, params=params, inputs=[str(data)] + ([str(init)] if init else []) + resumed,
                     outputs=[str(ctx.out_dir / "model_index.json"), str(ctx.out_dir / "unet")], notes=note,
                     provides={"unet_config": config} if config else {})]


def run_training(cfg: DiffusionConfig, ctx: StageContext, task_cls: type[DiffusionTask] = DiffusionTask) -> dict:
    data, init = inputs(cfg, ctx)
    cfg = seeded(cfg, ctx)  # the UNet's initial weights follow the run's seed
    task = task_cls(cfg, data, init, ctx.console)
    summary = train(task, cfg, ctx.out_dir, resume=cfg.resume, console=ctx.console)
    if is_main_process():
        task.save_pipeline(ctx.out_dir)
    wait_for_everyone()
    return {**summary, "params": count_params(task.unet), "pipeline": str(ctx.out_dir)}
