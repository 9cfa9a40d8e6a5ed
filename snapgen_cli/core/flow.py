"""Training objectives and samplers: rectified flow (paper sec. 3.3, Eq. 1-3) and DDPM (sup. H).

Two :class:`Objective` implementations share one interface, so a training stage and the
sampler do not care which one a recipe picks:

* :class:`RectifiedFlow` -- ``x_t = (1 - s) x_0 + s * eps`` (Eq. 1), velocity target
  ``eps - x_0`` (Eq. 2), logit-normal(0, 1) timestep sampling with the SD3 time shift
  ``s' = shift * s / (1 + (shift - 1) * s)`` (shift 3, sec. 4 "Hyper-parameters") in
  training *and* inference, and the Flow-Euler sampler ``x_{t-1} = x_t + (s_{t-1} - s_t) v``
  (Eq. 3) via diffusers' ``FlowMatchEulerDiscreteScheduler``. The UNet gets ``s * 1000``.
* :class:`DDPM` -- the ImageNet ablations of sup. H: linear betas over 1000 steps, epsilon
  target, ``DDPMScheduler.add_noise`` for training and ``HeunDiscreteScheduler`` (30 steps,
  same betas) for sampling. The UNet gets the integer timestep.

:func:`sample` runs the reverse process for either, with classifier-free guidance
(:class:`Guidance`: a constant scale, a guidance interval, and the "varied CFG" ramp of sup. H).

Decisions where the paper is silent:

* **Inference grid.** The unshifted times are uniform, ``1, 1 - 1/N, ..., 1/N``, then 0; the
  shift is applied to them once (``sigma_i = shift(1 - i/N)``), exactly as in training.
  (diffusers' default ``set_timesteps`` would start from an already shifted ``sigma_min``.)
* **Per-sample randomness.** Every random draw accepts one ``torch.Generator`` or a list of
  them, one per sample (diffusers' ``randn_tensor`` convention), so a training loop can seed
  each sample by its global index and get the same numbers on any number of processes.
* **Guidance pass.** The conditional and unconditional branches run as one batched
  ``model_fn`` call on ``[uncond; cond]`` (half the launches on a GPU, the standard way); a
  condition is a tensor or a tuple/list of tensors (or ``None``s), concatenated element-wise.
  A step whose scale is 1 makes only the conditional call.
* **Saved sampler.** A pipeline stores the objective as its diffusers scheduler
  (:meth:`Objective.scheduler`'s config); :func:`objective_from_scheduler` reads it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..errors import ConfigError

Generator = torch.Generator | list[torch.Generator] | None

#: ``model_fn(x, model_timestep, cond) -> prediction``: the network as the sampler sees it;
#: ``model_timestep`` is a (B,) float tensor in [0, 1000].
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------
# Random draws, per sample or per batch.


def uniform_tensor(shape: tuple[int, ...], generator: Generator = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """U[0, 1) of ``shape``; with a list of generators, row ``i`` comes from ``generator[i]``."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        out = torch.cat([torch.rand((1, *shape[1:]), generator=g) for g in generator])
    else:
        out = torch.rand(shape, generator=generator)
    return out.to(device) if device is not None else out


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) per-sample value shaped to broadcast over ``x`` (B, ...)."""
    return t.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------
# Timesteps: the shift. (Eq. 7's weight lambda(t) is ``core.losses.lambda_t``.)


def time_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 time shift ``shift * t / (1 + (shift - 1) * t)`` (sec. 3.3; shift 3 in sec. 4)."""
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------------------
# Objectives.


@runtime_checkable
class Objective(Protocol):
    """What a training stage and the sampler need from a diffusion objective.

    ``t`` is the objective's own time variable (flow: ``sigma`` in (0, 1); DDPM: the integer
    step in [0, 1000)); :meth:`model_timestep` maps it to what the UNet gets.
    """

    name: str

    def sample_timesteps(self, n: int, generator: Generator = None,
                         device: torch.device | str | None = None) -> torch.Tensor: ...

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def predict_x0(self, xt: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor: ...

    def scheduler(self, steps: int, device: torch.device | str | None = None) -> SchedulerMixin: ...


@dataclass(frozen=True)
class RectifiedFlow:
    """Rectified flow with logit-normal timesteps and the SD3 shift (sec. 3.3, Eq. 1-3)."""

    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    name: str = "flow"

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ConfigError(f"shift: expected a positive number, got {self.shift}")
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std: expected a positive number, got {self.logit_std}")

    def sample_timesteps(self, n: int, generator: Generator = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """``sigma = shift(sigmoid(u))``, ``u ~ N(logit_mean, logit_std^2)``: (n,) float32 in (0, 1)."""
        u = randn_tensor((n,), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        sigma = time_shift(torch.sigmoid(u * self.logit_std + self.logit_mean), self.shift)
        return sigma.to(device) if device is not None else sigma

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``x_t = (1 - sigma) x_0 + sigma * eps``."""
        s = _bcast(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 2: the velocity ``eps - x_0``."""
        return noise - x0

    def predict_x0(self, xt: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_0 = x_t - sigma * v`` (inverts Eq. 1 given the velocity)."""
        return xt - _bcast(t, xt) * prediction

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * 1000.0

    def scheduler(self, steps: int, device: torch.device | str | None = None) -> FlowMatchEulerDiscreteScheduler:
        """Flow-Euler (Eq. 3) on ``sigma_i = shift(1 - i/steps)``, ``i = 0..steps-1``, then 0."""
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)
        sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], device=device)
        return sched


@dataclass(frozen=True)
class DDPM:
    """DDPM with a linear beta schedule over 1000 steps and an epsilon target (sup. H)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    name: str = "ddpm"

    @cached_property
    def _train_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                             beta_end=self.beta_end, beta_schedule="linear", prediction_type="epsilon")

    def sample_timesteps(self, n: int, generator: Generator = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integer steps in [0, num_train_timesteps): (n,) int64."""
        u = uniform_tensor((n,), generator)
        t = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        return t.to(device) if device is not None else t

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (``DDPMScheduler.add_noise``)."""
        return self._train_scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def predict_x0(self, xt: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = _bcast(self._train_scheduler.alphas_cumprod.to(xt.device)[t.to(xt.device)], xt)
        return (xt - (1 - abar).sqrt() * prediction) / abar.sqrt()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def scheduler(self, steps: int, device: torch.device | str | None = None) -> HeunDiscreteScheduler:
        """Heun's 2nd-order sampler with the training betas (sup. H: 30 steps)."""
        sched = HeunDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                                      beta_end=self.beta_end, beta_schedule="linear", prediction_type="epsilon")
        sched.set_timesteps(steps, device=device)
        return sched


def objective_from_scheduler(scheduler: SchedulerMixin) -> Objective:
    """The objective a saved sampler belongs to (inverse of :meth:`Objective.scheduler`)."""
    c = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return RectifiedFlow(shift=float(c.shift))
    if isinstance(scheduler, HeunDiscreteScheduler) and c.beta_schedule == "linear":
        return DDPM(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end)
    raise ConfigError(f"scheduler {type(scheduler).__name__}: not a SnapGen sampler (FlowMatchEulerDiscreteScheduler "
                      "for rectified flow, HeunDiscreteScheduler with linear betas for DDPM)")


def make_objective(name: str, **kwargs: Any) -> Objective:
    """``"flow"`` (rectified flow, the paper's T2I objective) or ``"ddpm"`` (sup. H ablations)."""
    objectives = {"flow": RectifiedFlow, "ddpm": DDPM}
    if name not in objectives:
        raise ConfigError(f"objective: expected one of {', '.join(objectives)}, got {name!r}")
    return objectives[name](**kwargs)


# ----------------------------------------------------------------------------------------
# Classifier-free guidance and the sampler.


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance [28] ``u + w (c - u)`` with an optional interval and ramp.

    * ``scale``: the guidance scale ``w``; 1 means conditional only (one forward pass).
    * ``interval``: guide only at sampling steps ``start <= i < end`` (0-based; Kynkaanniemi
      et al. [37]); other steps use ``w = 1``. ``None``: every step.
    * ``scale_end``: "varied CFG" (sup. H): ``w`` ramps linearly from ``scale`` at the first
      guided step to ``scale_end`` at the last one. The paper's final ImageNet setting, "varied
      cfg in steps [10, 30] with cfg scaling from 1.1 to 5.4", is :data:`IMAGENET_VARIED_CFG`.
    """

    scale: float = 1.0
    interval: tuple[int, int] | None = None
    scale_end: float | None = None

    def __post_init__(self) -> None:
        if self.scale <= 0 or (self.scale_end is not None and self.scale_end <= 0):
            raise ConfigError(f"guidance scale: expected positive numbers, got {self.scale}, {self.scale_end}")
        if self.interval is not None:
            start, end = self.interval
            if not 0 <= start < end:
                raise ConfigError(f"guidance interval: expected 0 <= start < end, got [{start}, {end})")

    def scale_at(self, step: int, num_steps: int) -> float:
        """The guidance scale at sampling step ``step`` (0-based) of ``num_steps``."""
        start, end = self.interval if self.interval is not None else (0, num_steps)
        end = min(end, num_steps)
        if not start <= step < end:
            return 1.0
        if self.scale_end is None or end - start == 1:
            return self.scale
        return self.scale + (self.scale_end - self.scale) * (step - start) / (end - start - 1)

    def active(self, num_steps: int) -> bool:
        return any(self.scale_at(i, num_steps) != 1.0 for i in range(num_steps))


IMAGENET_VARIED_CFG = Guidance(scale=1.1, scale_end=5.4, interval=(10, 30))


def _cat_cond(uncond: Any, cond: Any) -> Any:
    """``[uncond; cond]`` along the batch: tensors are concatenated, tuples/lists element-wise."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, (tuple, list)):
        return type(cond)(_cat_cond(u, c) for u, c in zip(uncond, cond, strict=True))
    if cond is None and uncond is None:
        return None
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__} for guidance")


def guided(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float) -> torch.Tensor:
    """One classifier-free-guided prediction ``u + w (c - u)`` from one batched call on
    ``[uncond; cond]``; ``scale == 1`` is a single conditional pass."""
    if scale == 1.0:
        return model_fn(x, t, cond)
    pred_uncond, pred = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(uncond, cond)).chunk(2)
    return pred_uncond + scale * (pred - pred_uncond)


@torch.no_grad()
def sample(model_fn: ModelFn, noise: torch.Tensor, steps: int, cond: Any, uncond: Any = None,
           guidance: Guidance | None = None, objective: Objective | None = None,
           on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` in ``steps`` sampling steps; return ``x_0``.

    Flow: ``steps`` Flow-Euler updates (Eq. 3), one model pass each (both guidance branches
    batched). DDPM: ``steps`` Heun steps (2 passes each except the last). ``model_fn`` gets
    the scheduler's timesteps, which are the objective's model timesteps (``sigma * 1000`` / t).
    ``on_step`` is called after each of the ``steps`` sampling steps (progress bars).
    """
    objective = objective or RectifiedFlow()
    guidance = guidance or Guidance()
    if steps < 1:
        raise ConfigError(f"steps: expected a positive integer, got {steps}")
    if uncond is None and guidance.active(steps):
        raise ValueError("classifier-free guidance needs an unconditional input (uncond)")
    sched = objective.scheduler(steps, device=noise.device)
    x = noise * float(getattr(sched, "init_noise_sigma", 1.0))
    for call, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        t_model = t.expand(x.shape[0]).to(torch.float32)
        pred = guided(model_fn, x_in, t_model, cond, uncond, guidance.scale_at(call // sched.order, steps))
        x = sched.step(pred, t, x).prev_sample.to(noise.dtype)
        if on_step is not None and ((call + 1) % sched.order == 0 or call + 1 == len(sched.timesteps)):
            on_step()
    return x


__all__ = [
    "DDPM", "Guidance", "IMAGENET_VARIED_CFG", "ModelFn", "Objective", "RectifiedFlow", "guided",
    "make_objective", "objective_from_scheduler", "sample", "time_shift", "uniform_tensor",
]
