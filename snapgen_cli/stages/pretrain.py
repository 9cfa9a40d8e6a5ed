"""``snapgen pretrain``: train the UNet from scratch on class-conditional data (sec. 4
"Training Recipe", sup. H): ImageNet-1K at 256^2, the text "a photo of <class name>" with a
random synonym each time, per-encoder dropout, rectified flow (or DDPM, the sup. H ablations).

Defaults follow sup. H: AdamW lr 3e-4 at a batch of 1024 (scaled with the global batch),
betas (0.9, 0.99), weight decay 0.01.
"""

from __future__ import annotations

from pydantic import Field

from ..train.diffusion import DiffusionConfig
from .base import PlanItem, StageContext
from .training import plan_training, run_training


#: Runs in every process of a distributed launch (the loop splits each global batch; stages/base.py).
EVERY_PROCESS = True


class Config(DiffusionConfig):
    lr: float = Field(3e-4, gt=0, description="learning rate at a global batch of lr_reference_batch (sup. H)")
    betas: tuple[float, float] = (0.9, 0.99)
    resolution: int = Field(256, gt=0)


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    return plan_training(cfg, ctx)


def run(cfg: Config, ctx: StageContext) -> dict:
    return run_training(cfg, ctx)
