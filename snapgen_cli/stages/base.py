"""The small protocol every recipe stage follows (one module per stage, no inheritance).

A stage module exposes:

* ``Config`` -- a :class:`~snapgen_cli.config.StageSettings` (pydantic, unknown keys rejected) holding every
  setting of the stage, with the paper's values as defaults where the paper gives them;
* ``plan(cfg, ctx) -> list[PlanItem]`` -- what the stage would build and read/write, built
  on the meta device (no weights, no data touched); used by ``snapgen run --dry-run``. What
  a later stage's plan needs from this one before it has run (the latent space of an
  autoencoder, the text encoders of shards, the UNet config of a training stage) goes into
  ``PlanItem.provides``; the later plan reads it with ``ctx.planned_for(path)``, so a dry run
  reports the model each stage will really build;
* ``run(cfg, ctx) -> dict`` -- do the work, write into ``ctx.out_dir``, return a JSON-able
  summary (it is stored in the stage's done-marker and printed with ``--json``);
* optionally ``RESULT_FILE`` -- the file in ``ctx.out_dir`` that holds the result: the
  subcommand prints its path instead of the output dir's;
* optionally ``EVERY_PROCESS = True`` -- the stage splits its work among the processes of a
  distributed launch (``accelerate launch``, ``torchrun``): the training stages, precompute and
  eval. Any other stage runs in the main process only, the others waiting for it (:func:`run_stage`).

Stage functions know nothing about Click; ``cli.py`` turns flags into a ``Config``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field
from rich.console import Console

from ..config import StageConfig
from ..cpu import stage_threads
from ..files import model_location

C = TypeVar("C", bound=StageConfig)


@dataclass
class StageContext:
    """Where a stage runs: its output dir, the previous stage's output, the run's seed."""

    out_dir: Path
    previous: Path | None = None
    run_dir: Path | None = None
    seed: int = 0
    dry_run: bool = False
    console: Console = field(default_factory=lambda: Console(file=sys.stderr))
    #: During ``snapgen run --dry-run``: each earlier stage's output dir -> what its plan provides.
    planned: dict[str, dict] = field(default_factory=dict)

    def planned_for(self, path: str | Path | None) -> dict:
        """What the plan of the earlier stage whose output holds ``path`` provides ({} if none)."""
        if path is None:
            return {}
        p = Path(path)
        for candidate in (p, *p.parents):
            if str(candidate) in self.planned:
                return self.planned[str(candidate)]
        return {}

    def resolve_input(self, value: str | None) -> Path | None:
        """A stage input: ``None`` or ``"previous"`` mean the previous stage's output dir; a
        name of an earlier stage in the same run (``"@pretrain"``) means that stage's dir."""
        if value in (None, "previous"):
            return self.previous
        if value.startswith("@"):
            if self.run_dir is None:
                from ..errors import ConfigError

                raise ConfigError(f"{value!r} names a stage of a recipe run; outside `snapgen run` give a path")
            return self.run_dir / value[1:]
        return Path(value)


@dataclass
class PlanItem:
    """One line of a dry-run plan."""

    model: str
    params: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: str = ""
    #: What later stages' plans need from this stage's output (see the module docstring).
    provides: dict = field(default_factory=dict)


def launched_processes() -> int:
    """How many processes a distributed launch (``accelerate launch``, ``torchrun``) started: ``WORLD_SIZE``."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 0 else 1


def process_share() -> tuple[int, int]:
    """``(index, count)`` of this process in a distributed launch; ``(0, 1)`` without one."""
    if launched_processes() == 1:
        return 0, 1
    from ..train.loop import process_state

    state = process_state()
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    """Whether this is the main process of a distributed launch (or no launch: always)."""
    return process_share()[0] == 0


#: How long a process waits for the main process at most: a main-process-only stage (an evaluation,
#: an export) may take hours, past the default group's timeout (NCCL's watchdog: 10 minutes).
WAIT_TIMEOUT_S = 7 * 24 * 3600
_wait_group = None


def _waiting_group():
    """A gloo group of every process with :data:`WAIT_TIMEOUT_S`, made once, by every process together
    (:func:`run_stage` makes it as each stage starts)."""
    global _wait_group
    import datetime

    import torch.distributed as dist

    process_share()  # the default group is up
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_TIMEOUT_S))
    return _wait_group


def wait_for_everyone() -> None:
    """A barrier across the processes of a distributed launch (nothing without one)."""
    if launched_processes() > 1:
        import torch.distributed as dist

        dist.barrier(group=_waiting_group())


def from_main_process(value=None):
    """The main process's ``value`` in every process (the others wait for it); ``value`` without a launch."""
    if launched_processes() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_waiting_group())
    return box[0]


def from_every_process(value) -> list:
    """Every process's ``value``, in process order (the first ones wait for the last); ``[value]`` without a launch."""
    if launched_processes() == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * launched_processes()
    dist.all_gather_object(values, value, group=_waiting_group())
    return values


def run_stage(module, cfg, ctx: StageContext) -> dict:
    """``module.run(cfg, ctx)`` with the stage's CPU threads (``cfg.threads``, see ``cpu.py``).

    Under a distributed launch only a stage whose module sets ``EVERY_PROCESS = True`` runs in
    every process: the training stages, precompute and eval, which split their work among them.
    Any other stage (data, generate, export, bench-device) runs in the main process alone while
    the others wait for its summary, which every process returns. So ``accelerate launch ...
    snapgen run RECIPE --jobs 1`` runs a whole recipe, and no two processes write one output (two
    ranks building the same data folder failed with "Directory not empty")."""
    if launched_processes() > 1:
        _waiting_group()  # made now, while every process is here, not when one has waited an hour
    with stage_threads(cfg.threads):
        if getattr(module, "EVERY_PROCESS", False) or launched_processes() == 1:
            return module.run(cfg, ctx)
        return from_main_process(module.run(cfg, ctx) if is_main_process() else None)


def seeded(cfg: C, ctx: StageContext) -> C:
    """``cfg`` with ``seed`` set to the run's seed where the stage leaves it unset, and every
    random generator seeded with it: the recipe's ``[run] seed`` controls model initialisation
    (and, through the loop, data order and noise)."""
    from accelerate.utils import set_seed

    if cfg.seed is None:
        cfg = cfg.model_copy(update={"seed": ctx.seed})
    set_seed(cfg.seed)
    return cfg


#: The sampler settings of the stages that sample (``generate``, ``eval``), described once.
Steps = Annotated[int | None, Field(gt=0, description="sampling steps (default: the pipeline's: 28, or the 4/8 it "
                                                        "was step-distilled for)")]
CfgScale = Annotated[float | None, Field(gt=0, description="classifier-free guidance scale, 1: none (default: the "
                                                           "pipeline's: 4.5, or 1 after step distillation)")]
CfgEnd = Annotated[float | None, Field(gt=0, description="varied CFG: ramp the scale to this value (sup. H)")]
CfgInterval = Annotated[tuple[int, int] | None, Field(description="guide only in sampling steps [start, end)")]
ImageSize = Annotated[int | None, Field(gt=0, description="image size in pixels (default: the training resolution)")]


def sampler_defaults(cfg: StageConfig, pipe) -> StageConfig:
    """``cfg`` with ``steps`` / ``guidance`` left unset taken from the pipeline it samples
    (``SnapGenPipeline.sampler_settings``: what a step-distilled model was saved with)."""
    steps, guidance = pipe.sampler_settings(cfg.steps, cfg.guidance)
    return cfg.model_copy(update={"steps": steps, "guidance": guidance})


def vae_config(path: str, subfolder: str | None, ctx: StageContext) -> dict | None:
    """An AutoencoderKL's config without its weights, for plans: from a local dir (or the HF
    cache), from the plan of the earlier stage that trains it, or the SD3 VAE's public config
    for its hub id; ``None`` when none of them knows it."""
    import warnings

    from diffusers import AutoencoderKL

    from ..core.baselines import SD3_VAE_CONFIG, SD3_VAE_HUB

    path, subfolder = model_location(path, subfolder)
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes on an offline look-up
            warnings.simplefilter("ignore")
            return dict(AutoencoderKL.load_config(path, subfolder=subfolder, local_files_only=True))
    except Exception:  # noqa: BLE001 - not downloaded / not trained yet
        pass
    if planned := ctx.planned_for(path).get("vae_config"):
        return dict(planned)
    return dict(SD3_VAE_CONFIG) if (path, subfolder) == SD3_VAE_HUB else None
