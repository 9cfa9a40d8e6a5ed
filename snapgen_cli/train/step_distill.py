"""The adversarial step-distillation task (paper sec. 3.4, Eq. 9, Fig. 7) that ``step-distill`` trains.

Following LADD (ref. [63]): the student ``G_theta`` (initialised from the distilled model)
denoises ``x_t`` at a noise level ``t`` of the few-step schedule in one call; its prediction
``x'_0 = x_t - t * v`` and the real ``x_0`` are both re-noised to a level ``s``
(``x'_s ~ q(x_s | x'_0)``, ``x_s ~ q(x_s | x_0)``, Eq. 1, the same noise for both) and judged
by ``D``: the frozen few-step teacher (SD3.5-Large-Turbo in the paper) as a feature extractor,
run only up to the last block with a head (``core.teacher.teacher_block_features``), plus
trainable heads (``core.discriminator.FeatureHeads``). The generator also gets the output
distillation ``S(L_task, L_kd)`` with timestep-aware scaling, the turbo teacher's velocity
at ``(x_t, t)`` as ``L_kd``'s target (``core.losses.StepDistillLoss``). Generator and
discriminator update in turn on every micro-batch (the loop's two phases), each with its own
AdamW (``lr_overrides = {discriminator = ...}`` for its own learning rate).

Decisions where the paper is silent (each a setting):

* **The student's noise levels** are the sigmas the few-step sampler visits: the shifted grid
  of each count in ``student_steps`` (default 4 and 8: one model for both, Fig. 9), drawn
  uniformly. The saved pipeline records the counts and samples with the first by default.
* **The discriminator's noise level** ``s``: ``disc_noise = "logit-normal"`` draws
  ``sigmoid(N(disc_logit_mean, disc_logit_std^2))``, LADD's choice (mean 1: mostly high noise,
  where the teacher's features carry global structure); ``"next-step"`` is Eq. 9's notation
  read literally: ``s`` is the next sigma of the student's schedule ("t - 1"; 0 after the last
  step, a clean sample). The noise of the re-noising is shared by the real and fake sample.
  LADD's mean 1 is for SD3's 128^2 latents at 1024^2 px. Noise hides more of a smaller latent
  (SD3's resolution shift: the same signal-to-noise at ``sqrt(m/n)`` times the noise odds), so
  at 8^2 latents the equivalent mean is ``1 + ln(8/128) = -1.8``. Measured on the demo
  (``benchmarks/results/step_distill_ablation.json``): the heads' accuracy stays at 0.55 through
  step distillation at mean 1; against the student held fixed it reaches 0.57-0.60 with
  ``"next-step"`` noise in 300 steps, and 0.73-0.75 on clean samples in 150.
* **Text.** The student keeps the paper's per-encoder dropout (so any subset of encoders still
  works after step distillation, sec. 4); the teacher's conditioning follows it as in
  ``distill`` (``FrozenTeacher``); the heads see the prompt only through the teacher's features
  (the paper's "few linear layers") unless ``disc_text`` conditions them on its pooled embedding
  as well (ADD's projection). Measured on the demo over 8 seeds at 4 steps
  (``benchmarks/results/step_distill_text.json``): the paper's heads keep alignment (-0.005 +-
  0.010) and lower FID (-7.8 +- 1.6); text-conditioned heads raise alignment (+0.024 +- 0.016)
  and FID (+10.2 +- 5.3), a trade, so the default stays off.
* **Guidance.** The KD target is the turbo teacher's velocity without classifier-free guidance
  (SD3.5-Large-Turbo samples with guidance 0 in diffusers, i.e. no CFG), so the distilled
  student is saved to sample without CFG (``guidance = 1``), one UNet call per step. A teacher
  that is not guidance-distilled (the demo's) can give a guided target instead,
  ``kd_guidance = w``: ``v_u + w (v_c - v_u)`` of its conditional and unconditional velocities
  (ADD's distillation target, Sauer et al. 2023), the teacher run on twice the batch.
* **The discriminator phase reuses the generator phase's fakes**: the teacher's features of
  the re-noised fakes, detached, from the same micro-batch (the frozen teacher computes the same
  numbers with or without gradients, so only the real batch costs a teacher pass: one of four
  teacher passes a step saved; the demo's step-distill on one core: 59.5 -> 70.7 samples/s, the
  same losses to the bit, ``benchmarks/results/stage_speed_step_distill.json``). Run alone (no
  generator phase before it) it computes them itself from the same per-sample randomness, so its
  update does not depend on whether the generator stepped first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import Field, field_validator

from ..core import denoiser
from ..core.discriminator import FeatureHeads
from ..core.flow import RectifiedFlow, guided
from ..core.losses import ADV_LOSSES, StepDistillLoss
from ..core.teacher import block_indices, teacher_block_features, teacher_forward
from ..core.text import sample_keep, unconditional
from ..errors import SnapgenError
from .diffusion import DiffusionTask, TextRole
from .distill import FrozenTeacher, TeacherConfig
from .loop import StepContext


class StepDistillConfig(TeacherConfig):
    """Settings of ``step-distill`` (every diffusion and loop setting, the teacher, D and Eq. 9)."""

    teacher: str = Field("stabilityai/stable-diffusion-3.5-large-turbo", description="the few-step teacher: KD "
                         "target and the discriminator's feature extractor (an SD3/SD3.5 dir, hub id or a "
                         "`finetune --model sd3-*` output)")
    student_steps: list[int] = Field([4, 8], min_length=1, description="sampling step counts to distil for; the "
                                     "student trains on their shifted sigma grids (the first is the saved default)")
    guidance: float = Field(1.0, gt=0, description="guidance the saved pipeline samples with (1: no CFG, as the "
                                                  "turbo teacher)")
    disc_blocks: list[int] = Field([9, 18, 27, 37], min_length=1, description="teacher blocks with a head (indices "
                                   "into transformer_blocks; the teacher runs up to the last of them)")
    disc_hidden: int = Field(256, gt=0, description="width of each head's hidden layer")
    disc_kernel: int = Field(1, ge=1, description="each head's first layer: 1 = linear per token (the paper's "
                             "\"linear layers\"), k > 1 = a k x k conv over the token grid (LADD's conv heads)")
    disc_text: bool = Field(False, description="condition the heads on the prompt's pooled embedding by projection "
                            "(ADD's text-conditioned heads; off: the paper's heads, text only through the teacher)")
    disc_noise: Literal["logit-normal", "next-step"] = Field("logit-normal", description="the discriminator's "
                                                             "noise level: LADD's logit-normal or the next grid sigma")
    disc_logit_mean: float = Field(1.0, description="logit-normal mean of the discriminator's noise level (LADD: 1)")
    disc_logit_std: float = Field(1.0, gt=0, description="logit-normal std of the discriminator's noise level")
    adv_loss: str = Field("non-saturating", description=f"Eq. 9's GAN loss: {', '.join(ADV_LOSSES)} (log form: "
                                                        "non-saturating)")
    adv_weight: float = Field(1.0, ge=0, description="weight of the generator's adversarial term (Eq. 9: 1)")
    kd: bool = Field(True, description="S(L_task, L_kd) with the turbo teacher (off: E[L_task])")
    kd_guidance: float = Field(1.0, gt=0, description="classifier-free guidance of the teacher's velocity in L_kd "
                               "(1: none, the turbo teacher's way; > 1 for a teacher that is not guidance-distilled)")
    r1_gamma: float = Field(0.0, ge=0, description="approximate R1 penalty weight (0: off)")
    r1_sigma: float = Field(0.01, gt=0, description="approximate R1: std of the perturbation of real inputs")

    @field_validator("adv_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in ADV_LOSSES:
            raise ValueError(f"expected one of {', '.join(ADV_LOSSES)}")
        return v

    @field_validator("student_steps")
    @classmethod
    def _positive_steps(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("expected positive step counts, e.g. [4, 8]")
        return v


def few_step_grid(objective, counts: list[int]) -> torch.Tensor:
    """(K, 2) rows ``(sigma, next sigma)`` of every step of the samplers with ``counts`` steps
    (``objective.scheduler(n).sigmas``: the shifted grid the sampler visits, ending at 0)."""
    rows = []
    for n in counts:
        sig = objective.scheduler(n).sigmas.float().cpu()
        rows += [(float(sig[i]), float(sig[i + 1])) for i in range(n)]
    return torch.tensor(rows)


class _Draw(NamedTuple):
    """Everything random about one micro-batch, drawn in one fixed order from the per-sample
    generators (so both phases, and a phase run alone, see the same)."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    cond: tuple
    teacher_cond: tuple[torch.Tensor, torch.Tensor]
    s: torch.Tensor
    renoise: torch.Tensor


class StepDistillTask(DiffusionTask):
    """Student (generator, trainable) + heads (discriminator, trainable) + the frozen turbo teacher."""

    def __init__(self, cfg: StepDistillConfig, data_dir: Path, init_dir: Path | None, console=None):
        super().__init__(cfg, data_dir, init_dir, console)
        self.frozen_teacher = FrozenTeacher(cfg, self.manifest, self.data_dir)
        self.teacher, self.teacher_text = self.frozen_teacher.model, self.frozen_teacher.text
        self.blocks = block_indices(self.teacher, cfg.disc_blocks)  # checked before training starts
        t = self.teacher.config
        self.heads = FeatureHeads(t.num_attention_heads * t.attention_head_dim, tuple(self.blocks), cfg.disc_hidden,
                                  kernel_size=cfg.disc_kernel, cond_dim=t.pooled_projection_dim if cfg.disc_text else 0)
        self.loss_fn = StepDistillLoss(cfg.adv_loss, cfg.adv_weight, cfg.kd, cfg.r1_gamma)
        self.grid = few_step_grid(self.objective, cfg.student_steps)
        # D's noise level: the logit-normal sampler of the flow objective, unshifted
        self.disc_sigma = RectifiedFlow(shift=1.0, logit_mean=cfg.disc_logit_mean, logit_std=cfg.disc_logit_std)
        self.head_names = [f"h{b}" for b in self.blocks]
        self._fake: tuple[tuple[int, int], _Draw, list[torch.Tensor]] | None = None

    # -- TrainTask ------------------------------------------------------------------------

    def trainables(self):
        return {"unet": self.unet, "discriminator": self.heads}

    def phases(self):
        return {"generator": ("unet",), "discriminator": ("discriminator",)}

    def forward_macs(self) -> None:
        """No MFU: a step also runs the frozen teacher's and the discriminator's passes, which the MACs
        of one UNet forward per sample do not count."""
        return None

    def frozen(self):
        return self.frozen_teacher.frozen()

    def text_roles(self) -> list[TextRole]:
        return [self.text, self.teacher_text]

    # -- Eq. 9 -----------------------------------------------------------------------------

    def draw(self, batch: dict, ctx: StepContext) -> _Draw:
        gens, dev = ctx.generators, ctx.device
        x0 = batch[self.key].to(dev, torch.float32)
        row = self.grid[_randint(len(self.grid), gens)]
        t = row[:, 0].to(dev)
        noise = ctx.randn(*x0.shape[1:])
        stored = self.text_features(batch, gens)
        keep = sample_keep(self.layout.names, self.cfg.p_drop, gens)
        cond = self.condition(batch, ctx, stored, keep)
        teacher_cond = self.frozen_teacher.condition(stored, keep, dev)
        s = (self.disc_sigma.sample_timesteps(len(x0), generator=gens) if self.cfg.disc_noise == "logit-normal"
             else row[:, 1]).to(dev)
        renoise = ctx.randn(*x0.shape[1:])
        return _Draw(x0, t, noise, self.objective.noisy(x0, noise, t), cond, teacher_cond, s, renoise)

    def generate(self, unet, d: _Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """G of Eq. 9: the student's velocity at ``(x_t, t)`` and its prediction ``x'_0``."""
        v_s, _ = denoiser.denoise(unet, d.x_t, self.objective.model_timestep(d.t), d.cond)
        return v_s, self.objective.predict_x0(d.x_t, v_s, d.t)

    def kd_target(self, ctx: StepContext, d: _Draw) -> torch.Tensor:
        """The teacher's velocity at ``(x_t, t)``: L_kd's target, guided with ``kd_guidance`` the
        sampler's way (``flow.guided``: one call on ``[uncond; cond]``, the null condition of
        ``text.unconditional``); at 1, one conditional call."""
        teacher = self.frozen_teacher.module(ctx)
        uncond = (unconditional(self.teacher_text.layout, len(d.x_t), device=d.x_t.device)[:2]
                  if self.cfg.kd_guidance != 1 else None)
        return guided(lambda x, t, c: teacher_forward(teacher, x, t, *c, return_features=False)[0],
                      d.x_t, self.objective.model_timestep(d.t), d.teacher_cond, uncond, self.cfg.kd_guidance)

    def features(self, x: torch.Tensor, s: torch.Tensor, teacher_cond, ctx: StepContext, grad: bool = False):
        """The frozen teacher's features of ``x`` (latents at noise level ``s``) at the head blocks."""
        return teacher_block_features(self.frozen_teacher.module(ctx), x, self.objective.model_timestep(s),
                                      *teacher_cond, self.blocks, grad=grad)

    def judge(self, heads, feats: list[torch.Tensor], s: torch.Tensor, latent: torch.Tensor, pooled: torch.Tensor):
        """The heads' logits on the teacher's ``feats`` of latents shaped like ``latent``: D of Eq. 9
        (``pooled``: the teacher's pooled text, which text-conditioned heads read)."""
        p = self.teacher.config.patch_size
        return heads(feats, s, (latent.shape[-2] // p, latent.shape[-1] // p),
                     cond=pooled if self.cfg.disc_text else None)

    def loss(self, phase, batch, ctx: StepContext):
        heads = ctx.accelerator.unwrap_model(ctx.models["discriminator"])
        if phase == "generator":
            d = self.draw(batch, ctx)
            v_s, fake = self.generate(ctx.models["unet"], d)
            fake_s = self.objective.noisy(fake, d.renoise, d.s)
            fake_feats = self.features(fake_s, d.s, d.teacher_cond, ctx, grad=True)
            logits = self.judge(heads, fake_feats, d.s, fake_s, d.teacher_cond[1])
            v_t = self.kd_target(ctx, d) if self.cfg.kd else None
            self._fake = ((ctx.step, ctx.micro), d, [f.detach() for f in fake_feats])
            return self.loss_fn.generator(logits, v_s, self.objective.target(d.x0, d.noise, d.t), d.t, v_t)
        if phase != "discriminator":
            raise SnapgenError(f"step distillation has no phase {phase!r}")
        if self._fake is not None and self._fake[0] == (ctx.step, ctx.micro):
            _, d, fake_feats = self._fake
        else:  # run alone: the same draws, the student's prediction and its features, without gradients
            d = self.draw(batch, ctx)
            with torch.no_grad():
                _, fake = self.generate(ctx.accelerator.unwrap_model(ctx.models["unet"]), d)
            fake_feats = self.features(self.objective.noisy(fake, d.renoise, d.s), d.s, d.teacher_cond, ctx)
        self._fake = None
        b = len(d.x0)
        real_s = self.objective.noisy(d.x0, d.renoise, d.s)
        both = [torch.cat(pair) for pair in zip(self.features(real_s, d.s, d.teacher_cond, ctx), fake_feats,
                                                 strict=True)]
        pooled = d.teacher_cond[1]
        logits = self.judge(ctx.models["discriminator"], both, torch.cat([d.s, d.s]), real_s,
                            torch.cat([pooled, pooled]))
        real, fake_logits = [lg[:b] for lg in logits], [lg[b:] for lg in logits]
        perturbed = None
        if self.cfg.r1_gamma:
            jitter = ctx.randn(*d.x0.shape[1:]) * self.cfg.r1_sigma
            jittered = self.features(real_s + jitter, d.s, d.teacher_cond, ctx)
            perturbed = self.judge(ctx.models["discriminator"], jittered, d.s, real_s, pooled)
        return self.loss_fn.discriminator(real, fake_logits, self.head_names, perturbed)

    # -- the saved pipeline ----------------------------------------------------------------

    def pipeline(self, unet):
        pipe = super().pipeline(unet)
        pipe.register_to_config(sampler={"num_inference_steps": int(self.cfg.student_steps[0]),
                                         "distilled_steps": [int(n) for n in self.cfg.student_steps],
                                         "guidance_scale": float(self.cfg.guidance)})
        return pipe


def _randint(high: int, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.randint(high, (1,), generator=g) for g in gens])

