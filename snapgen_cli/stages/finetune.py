"""``snapgen finetune``: text-to-image training on latent + text shards, initialised from the
previous stage's weights (EMA by default), progressively 256 -> 512 -> 1024 (sec. 4 "Training
Recipe"). Progressive resolution is a chain of ``finetune`` stages, one per resolution, each
``init_from = "previous"`` and ``data = "@<precompute stage>"``: every resolution keeps its
own checkpoints, resume and batch size (sup. G: 128 per GPU at 512^2, 48 at 1024^2).

Defaults follow sup. G: AdamW lr 5e-5 at a global batch of 1024 (scaled with the batch),
betas (0.9, 0.999), weight decay 0.01, EMA 0.999.
"""

from __future__ import annotations

from pydantic import Field

from ..config import PREVIOUS_OR_PATH
from ..train.diffusion import DiffusionConfig
from .base import PlanItem, StageContext
from .training import plan_training, run_training


#: Runs in every process of a distributed launch (the loop splits each global batch; stages/base.py).
EVERY_PROCESS = True


class Config(DiffusionConfig):
    init_from: str | None = Field("previous", description='checkpoint/stage dir to start from ("previous": the '
                                                          'previous stage)', json_schema_extra=PREVIOUS_OR_PATH)


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    return plan_training(cfg, ctx)


def run(cfg: Config, ctx: StageContext) -> dict:
    return run_training(cfg, ctx)
