"""``snapgen distill``: multi-level knowledge distillation from a DiT teacher with timestep-aware
scaling (paper sec. 3.3, Eq. 4-8, Fig. 5-6; sec. 4 "Training Recipe"; sup. F Tab. 3; sup. G).

The student (initialised from the fine-tuned model's EMA weights, ``init_from``) learns from
the data (Eq. 2), from the frozen teacher's velocity (output KD, Eq. 4) and from the
teacher's last-block features through a two-conv projector (feature KD, Eq. 5), combined by
timestep-aware scaling (Eq. 7-8). ``kd`` / ``featkd`` / ``t_scaling`` switch each part, so
every row of Tab. 3 is a setting (``t_scaling = false`` is Eq. 6 with ``lambda_kd`` /
``lambda_featkd``). The shards must hold the teacher's own text features (precompute with
``--teacher-encoders teacher``: SD3.5's CLIP-L, CLIP-G and T5-XXL).

The paper's setting (sup. G): SD3.5-Large as teacher, 1024^2, batch 32 per A100 (48 without
distillation), gradient checkpointing, AdamW lr 5e-5 at a global batch of 1024, EMA 0.999;
the teacher fits beside the student on one 80 GB GPU in bf16 (``core/teacher.py`` has the
memory estimate; ``teacher_device`` / ``teacher_offload`` when it does not).

Writes the student's pipeline (``SnapGenPipeline.from_pretrained(out)``), ``projector/``,
``losses.jsonl`` with every term and the per-t-bin sums, and ``fig6.png``: the mean task and
KD loss per t bin, as the paper's Fig. 6.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ..config import PREVIOUS_OR_PATH
from ..core.measure import count_params
from ..core.teacher import PUBLISHED_PARAMS, build_teacher, count_teacher_params
from ..train.distill import DistillConfig, DistillTask, TeacherConfig, teacher_location
from .base import PlanItem, StageContext, is_main_process
from .training import plan_training, run_training

#: Hub ids whose config is a teacher preset: planned on the meta device without a download.
HUB_PRESETS = {"stabilityai/stable-diffusion-3.5-large": "sd35-large",
               "stabilityai/stable-diffusion-3.5-large-turbo": "sd35-large",  # the same architecture
               "stabilityai/stable-diffusion-3.5-medium": "sd35-medium"}


#: Runs in every process of a distributed launch (the loop splits each global batch; stages/base.py).
EVERY_PROCESS = True


class Config(DistillConfig):
    init_from: str | None = Field("previous", description='the fine-tuned student ("previous": the previous stage)',
                                  json_schema_extra=PREVIOUS_OR_PATH)
    resolution: int = Field(1024, gt=0, description="which precomputed latents to train on (latents.<res>)")
    batch_size: int = Field(32, gt=0, description="samples per process per micro-batch (sup. G: 32 at 1024^2 with KD)")
    gradient_checkpointing: bool = Field(True, description="recompute the student's activations (sup. G)")


def teacher_plan_item(cfg: TeacherConfig, ctx: StageContext, role: str = "frozen") -> PlanItem:
    """The teacher built on the meta device: from its local config, a known hub id's preset,
    or the plan of the stage that trains it (``provides`` its width as ``inner_dim``, its pooled
    text width as ``pooled_dim``)."""
    from diffusers import SD3Transformer2DModel

    path, sub = teacher_location(cfg.teacher, cfg.teacher_subfolder)
    config = None
    try:
        config = SD3Transformer2DModel.load_config(path, subfolder=sub, local_files_only=True)
    except Exception:  # noqa: BLE001 - not downloaded / not trained yet
        config = ctx.planned_for(cfg.teacher).get("unet_config")
    with torch.device("meta"):
        model = (SD3Transformer2DModel.from_config(config) if config else
                 build_teacher(HUB_PRESETS[cfg.teacher]) if cfg.teacher in HUB_PRESETS else None)
    params = count_params(model) if model is not None else None
    paper = PUBLISHED_PARAMS.get(HUB_PRESETS.get(cfg.teacher, ""))
    note = f"{role}; " + ("config unknown until it exists" if model is None else
                         f"{count_teacher_params(model) / 1e9:.3g}B with its positional table"
                         + (f" (published {paper / 1e9:.1f}B)" if paper else ""))
    inner = ({"inner_dim": model.config.num_attention_heads * model.config.attention_head_dim,
              "pooled_dim": model.config.pooled_projection_dim} if model else {})
    return PlanItem(model=f"teacher SD3Transformer2DModel {cfg.teacher}", params=params, inputs=[cfg.teacher],
                    notes=note, provides=inner)


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    student = plan_training(cfg, ctx)
    terms = [k for k in ("kd", "featkd") if getattr(cfg, k)]
    student[0].notes += f"; loss: task{''.join(' + ' + k for k in terms)}" + (
        ", t-scaling (Eq. 8)" if cfg.t_scaling and terms else ", Eq. 6" if terms else "")
    items = [*student, teacher_plan_item(cfg, ctx)]
    if cfg.featkd:
        items.append(PlanItem(model="projector psi (2 convs)", outputs=[str(Path(ctx.out_dir) / "projector")],
                              notes="sized from the student's and the teacher's feature maps at run time"))
    return items


def run(cfg: Config, ctx: StageContext) -> dict:
    from ..core.losses import plot_fig6

    summary = run_training(cfg, ctx, DistillTask)
    if cfg.fig6_bins and is_main_process():
        summary["fig6"] = str(plot_fig6(Path(ctx.out_dir) / "losses.jsonl", Path(ctx.out_dir) / "fig6.png"))
    projector = Path(ctx.out_dir) / "projector"
    if projector.is_dir():
        from ..core.losses import FeatureProjector

        summary["projector_params"] = count_params(FeatureProjector.from_pretrained(projector))
    return summary
