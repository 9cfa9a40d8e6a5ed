"""``snapgen step-distill``: adversarial step distillation to 4 and 8 steps (paper sec. 3.4, Eq. 9,
Fig. 7; sec. 4 "Few-Step Generation", Fig. 9; sup. D, G), following LADD (ref. [63]).

The student (initialised from the distilled model's EMA weights, ``init_from``) learns to
denoise in one call at the noise levels of a 4- and an 8-step sampler: a discriminator made
of the frozen few-step teacher's features (SD3.5-Large-Turbo) and trainable linear heads
judges its re-noised predictions against re-noised real latents, and the turbo teacher's
velocity gives the output distillation ``S(L_task, L_kd)`` (``train/step_distill.py`` has the
objective and every decision). The shards must hold the teacher's own text features
(precompute with ``--teacher-encoders``).

The paper's setting (sup. G): FSDP, gradient accumulation 4, an effective batch of 16 per GPU
at 1024^2 (``batch_size = 4``, ``grad_accum = 4``), AdamW, lr 5e-5 at a global batch of 1024
scaled with the batch, EMA 0.999; SD3.5-Large-Turbo as teacher and discriminator backbone.
FSDP: ``--fsdp`` under ``accelerate launch --multi_gpu`` shards the student and the heads
like any trainable of the shared loop (torch FSDP2; the loop's FSDP is tested on CPUs against
DDP); this stage has been run and tested here with DDP on CPUs, not with FSDP.

Writes the student's pipeline (``SnapGenPipeline.from_pretrained(out)``), which records the
step counts it was distilled for and its guidance (``sampler`` in ``model_index.json``), so
``snapgen generate`` / ``eval`` sample with 4 steps and no CFG unless told otherwise; the
heads in ``discriminator/`` (their final weights); ``losses.jsonl`` with every term and
``D_real`` / ``D_fake`` / ``acc`` per head.
"""

from __future__ import annotations

from pydantic import Field

from ..config import PREVIOUS_OR_PATH
from ..core.discriminator import FeatureHeads
from ..train.step_distill import StepDistillConfig, StepDistillTask
from .base import PlanItem, StageContext
from .distill import teacher_plan_item
from .training import plan_training, run_training


#: Runs in every process of a distributed launch (the loop splits each global batch; stages/base.py).
EVERY_PROCESS = True


class Config(StepDistillConfig):
    init_from: str | None = Field("previous", description='the distilled (or fine-tuned) student ("previous": '
                                                          'the previous stage)', json_schema_extra=PREVIOUS_OR_PATH)
    resolution: int = Field(1024, gt=0, description="which precomputed latents to train on (latents.<res>)")
    batch_size: int = Field(4, gt=0, description="samples per process per micro-batch (sup. G: 4 x grad_accum 4)")
    grad_accum: int = Field(4, gt=0, description="micro-batches per optimizer step (sup. G: 4)")
    gradient_checkpointing: bool = Field(True, description="recompute the student's activations")


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    student = plan_training(cfg, ctx)
    student[0].notes += (f"; Eq. 9 ({cfg.adv_loss}, adv_weight {cfg.adv_weight})"
                         + (" + S(task, kd)" if cfg.kd else " + task") + f", {'/'.join(map(str, cfg.student_steps))}"
                         f" steps, saved guidance {cfg.guidance}")
    teacher = teacher_plan_item(cfg, ctx, role="few-step teacher + discriminator backbone")
    heads = PlanItem(model=f"discriminator heads on teacher blocks {cfg.disc_blocks}",
                     notes=f"{len(cfg.disc_blocks)} heads of width {cfg.disc_hidden} (kernel {cfg.disc_kernel}"
                           + (", text-conditioned" if cfg.disc_text else "") + "), sized from the teacher at run time")
    if teacher.params is not None and teacher.provides.get("inner_dim"):
        heads.params = sum(p.numel() for p in FeatureHeads(
            teacher.provides["inner_dim"], tuple(cfg.disc_blocks), cfg.disc_hidden, kernel_size=cfg.disc_kernel,
            cond_dim=teacher.provides["pooled_dim"] if cfg.disc_text else 0).parameters())
    return [*student, teacher, heads]


def run(cfg: Config, ctx: StageContext) -> dict:
    return run_training(cfg, ctx, StepDistillTask)
