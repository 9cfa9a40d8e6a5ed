"""The multi-level knowledge-distillation task (paper sec. 3.3, Eq. 4-8, Fig. 5) that ``distill`` trains.

A :class:`DistillTask` is the denoising task of ``pretrain`` / ``finetune`` (same shards,
noise, timesteps and per-encoder dropout, drawn from the same per-sample generators) plus a
frozen SD3-family teacher (``core/teacher.py``) fed its own conditioning, and a trainable
projector psi (``core.losses.FeatureProjector``) from the student's last transformer layer
to the teacher's last block. The loss is ``core.losses.DistillLoss``: Eq. 8 by default,
Eq. 6 or any row of supplement Tab. 3 by its switches.

Decisions where the paper is silent:

* **The teacher's text dropout follows the student's.** SD3 was trained with the same
  per-encoder dropout (0.464 each), so it has an unconditional mode; a sample whose
  student text is dropped must not get a conditional teacher target. A teacher encoder with
  the name of a student encoder (SD3.5's CLIP-L / CLIP-G against SnapGen's) is kept exactly
  when that one is; the others (T5-XXL) are kept when any student encoder is, so a fully
  unconditional student sample has a fully unconditional teacher.
* **Where the teacher runs.** On the training device in its ``teacher_dtype`` (bf16 on a
  GPU by default), never wrapped by DDP; ``teacher_device`` puts it on its own device and
  ``teacher_offload`` streams it from CPU RAM (``core.teacher.load_teacher``).
* **The projector** is trained with the student (its own AdamW, the same lr) and saved to
  ``projector/``; only the student gets an EMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..core import denoiser
from ..core.losses import DistillLoss, FeatureProjector
from ..core.teacher import check_teacher, load_teacher, teacher_forward
from ..core.text import combine, sample_keep
from ..errors import ConfigError
from .diffusion import DiffusionConfig, DiffusionTask, TextRole
from .loop import StepContext


class TeacherConfig(DiffusionConfig):
    """Settings of a stage with a frozen SD3-family teacher (``distill``, ``step-distill``)."""

    teacher: str = Field("stabilityai/stable-diffusion-3.5-large", description="the teacher: an SD3/SD3.5 pipeline "
                         "or transformer dir, a hub id, or a `finetune --model sd3-*` output")
    teacher_subfolder: str | None = Field("transformer", description="subfolder of the teacher's weights")
    teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="the teacher's weights and compute: auto = bfloat16 on an accelerator, else float32")
    teacher_device: str | None = Field(None, description="run the teacher on its own device (e.g. cuda:1)")
    teacher_offload: bool = Field(False, description="keep the teacher in CPU RAM, streamed to the GPU per layer")


class DistillConfig(TeacherConfig):
    """Settings of ``distill`` (every diffusion and loop setting, plus the teacher and the loss)."""

    kd: bool = Field(True, description="output distillation, Eq. 4")
    featkd: bool = Field(True, description="feature distillation through the projector, Eq. 5")
    t_scaling: bool = Field(True, description="timestep-aware scaling, Eq. 7-8 (off: the linear Eq. 6)")
    lambda_kd: float = Field(1.0, ge=0, description="Eq. 6's weight of L_kd (without t_scaling)")
    lambda_featkd: float = Field(1.0, ge=0, description="Eq. 6's weight of L_featkd (without t_scaling)")
    projector_channels: int | None = Field(None, gt=0, description="the projector's hidden width (default: the "
                                                                   "student's feature width)")
    fig6_bins: int = Field(10, ge=0, description="t bins of the per-t loss log and fig6.png (0: none)")


def teacher_location(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """A snapgen pipeline dir (a ``finetune --model sd3-*`` output) keeps its DiT in ``unet/``."""
    local = Path(path)
    if subfolder and local.is_dir() and not (local / subfolder).is_dir() and (local / "unet" / "config.json").is_file():
        return str(local), "unet"
    return path, subfolder


class FrozenTeacher:
    """The frozen teacher of a training task, fed its own precomputed text features (the
    shards' ``teacher`` role): loaded, checked against the data, placed (module docstring)."""

    def __init__(self, cfg: TeacherConfig, manifest: dict, data_dir: Path):
        if cfg.objective != "flow":
            raise ConfigError("objective: a teacher-guided stage needs the flow objective (the teacher predicts a "
                              "velocity)")
        self.manifest, self.text = manifest, TextRole(manifest, "teacher", data_dir)
        dtype = cfg.teacher_dtype
        if dtype == "auto":  # the loop trains on the accelerator when there is one (bf16: sec. 3.3's 8B teacher)
            dtype = "bfloat16" if torch.accelerator.is_available() else "float32"
        self.model = load_teacher(*teacher_location(cfg.teacher, cfg.teacher_subfolder), dtype=dtype,
                                  device=cfg.teacher_device, offload=cfg.teacher_offload)
        check_teacher(self.model, self.text.layout, manifest["latent"]["channels"])
        self.own_device = cfg.teacher_device is not None or cfg.teacher_offload

    def frozen(self) -> dict:
        """For the loop's ``frozen()``: on the training device unless it has its own."""
        return {} if self.own_device else {"teacher": self.model}

    def module(self, ctx: StepContext):
        return ctx.models.get("teacher", self.model)

    def keep(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's encoder keep flags from the student's (module docstring)."""
        any_kept = torch.stack(list(keep.values())).any(0)
        return {n: keep.get(n, any_kept) for n in self.text.layout.names}

    def condition(self, stored: dict, keep: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of the teacher's own text, dropped where the student's is."""
        context, pooled, _ = combine(self.text.features(stored, self.manifest), self.text.layout, self.keep(keep),
                                     device=device)
        return context, pooled


class DistillTask(DiffusionTask):
    """Student (trainable) + projector (trainable) + teacher (frozen) on the diffusion task."""

    def __init__(self, cfg: DistillConfig, data_dir: Path, init_dir: Path | None, console=None):
        super().__init__(cfg, data_dir, init_dir, console)
        self.frozen_teacher = FrozenTeacher(cfg, self.manifest, self.data_dir)
        self.teacher, self.teacher_text = self.frozen_teacher.model, self.frozen_teacher.text
        self.loss_fn = DistillLoss(kd=cfg.kd, featkd=cfg.featkd, t_scaling=cfg.t_scaling, lambda_kd=cfg.lambda_kd,
                                   lambda_featkd=cfg.lambda_featkd, t_bins=cfg.fig6_bins)
        self.projector = self._projector() if cfg.featkd else None

    def _projector(self) -> FeatureProjector:
        """psi sized from one meta-device forward of the student and the teacher's patch grid."""
        lat = self.cfg.resolution // int(self.manifest["latent"]["downsample"])
        with torch.device("meta"):
            probe = denoiser.build(dict(self.unet.config))
            cond = combine({}, self.layout, batch_size=1, device="meta")
            _, feats = denoiser.denoise(probe, torch.zeros(1, self.unet.config.in_channels, lat, lat), torch.zeros(1),
                                        cond, return_features=True)
        if feats is None:
            raise ConfigError("featkd: the student has no transformer layer to distil features into")
        t = self.teacher.config
        inner, p = t.num_attention_heads * t.attention_head_dim, t.patch_size
        return FeatureProjector.between(feats.shape[1], inner, tuple(feats.shape[-2:]), (lat // p, lat // p),
                                        self.cfg.projector_channels)

    # -- TrainTask ------------------------------------------------------------------------

    def trainables(self):
        return {"unet": self.unet, **({"projector": self.projector} if self.projector is not None else {})}

    def forward_macs(self) -> None:
        """No MFU: a step also runs the teacher's forward and the projector, which the MACs of one UNet
        forward per sample do not count."""
        return None

    def frozen(self):
        return self.frozen_teacher.frozen()

    def text_roles(self) -> list[TextRole]:
        return [self.text, self.teacher_text]

    def loss(self, phase, batch, ctx: StepContext):
        x0, t, xt, target = self.noised(batch, ctx)
        stored = self.text_features(batch, ctx.generators)
        keep = sample_keep(self.layout.names, self.cfg.p_drop, ctx.generators)
        cond = self.condition(batch, ctx, stored, keep)
        ts = self.objective.model_timestep(t)
        featkd = self.projector is not None
        v_s, f_s = denoiser.denoise(ctx.models["unet"], xt, ts, cond, return_features=featkd)
        v_t = f_t = proj = None
        if self.cfg.kd or featkd:  # Tab. 3's first row trains on L_task alone: no teacher call
            tctx, tpooled = self.frozen_teacher.condition(stored, keep, ctx.device)
            v_t, f_t = teacher_forward(self.frozen_teacher.module(ctx), xt, ts, tctx, tpooled, return_features=featkd)
        if featkd:
            proj = ctx.models["projector"](f_s, size=tuple(f_t.shape[-2:]))
        return self.loss_fn(v_s, target, t, v_t, proj, f_t)
