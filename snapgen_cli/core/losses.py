"""The paper's losses: multi-level distillation (sec. 3.3, Eq. 2, 4-8; Eq. 9 reuses Eq. 7) and the
tiny decoder's objective (sec. 3.2).

**Distillation** (``snapgen distill``). Every term is computed per sample, a (B,) tensor (the mean
over all non-batch dims), so that Eq. 7 can weight and scale each sample by its own t:

    L_task   = || (eps - x_0) - v_s(x_t, t) ||^2                          (Eq. 2, :func:`task_loss`)
    L_kd     = || v_T(x_t, t) - v_s(x_t, t) ||^2                          (Eq. 4, :func:`kd_loss`)
    L_featkd = || f_T(x_t, t) - psi(f_s(x_t, t)) ||^2                     (Eq. 5, :func:`featkd_loss`)
    L        = L_task + lambda_1 L_kd + lambda_2 L_featkd                (Eq. 6, the linear baseline)
    S(L_task, L_kd) = E_t[ lambda(t) L_task^t
                           + (1 - lambda(t)) |L_task^t| / |L_kd^t| L_kd^t ]  (Eq. 7, :func:`timestep_aware_scaling`)
    L_MD     = S(L_task, L_kd) + S(L_task, L_featkd)                     (Eq. 8, :class:`DistillLoss`)

``psi`` is :class:`FeatureProjector` (two convs), ``lambda`` is :func:`lambda_t`, and E_t is the
batch mean. :class:`DistillLoss` makes each row of supplement F's Tab. 3 a setting (task only;
+ kd; + featkd; + t-scaling). :func:`tbin_sums` logs per-sample terms in t bins every step and
:func:`plot_fig6` draws Fig. 6 (mean loss magnitude of L_task and L_kd against t) from a run's
``losses.jsonl``. Step distillation (sec. 3.4, Eq. 9) subtracts ``S(L_task, L_kd)`` from a GAN
objective: :class:`StepDistillLoss` combines :func:`timestep_aware_scaling` and :class:`AdversarialLoss`.

**Decoder** (``snapgen train-decoder``): "the mean squared error (MSE) loss, lpips loss [86],
adversarial loss [23], and discard[s] the KL term [36] as the encoder is fixed":

    L_G = w_mse * MSE + w_l1 * L1 + w_lpips * LPIPS + w_adv(step) * L_adv^G
    L_D = L_adv^D + (gamma / 2) * R1

All images are in [-1, 1] (the decoder's output range and LPIPS' input range). Everything is plain
tensors and modules, so any training loop can call :meth:`DecoderLoss.forward` on the decoder step
and :meth:`DecoderLoss.discriminator_loss` on the discriminator step.

Decisions where the paper is silent, distillation:

* **Timestep of Eq. 7.** ``lambda`` is evaluated at the noise level the sample was actually
  noised with (the shifted ``sigma`` in (0, 1) of Eq. 1, the "t" of Eq. 1), not at the unshifted
  logit-normal draw; ``lambda(0.5) = 1``, ``lambda(0) = lambda(1) = 0``.
* **Magnitude ratio.** ``|L_task^t| / |L_kd^t|`` is taken per sample and detached: a scale, not
  a path for gradients. So a sample's scaled KD term equals ``(1 - lambda) |L_task|`` in value,
  while its gradient is the KD gradient times ``(1 - lambda) |L_task| / |L_kd|`` (and no
  gradient reaches the student through L_task by way of the ratio). The denominator is clamped
  at ``RATIO_EPS = 1e-6`` (a KD loss that small means the student matches the teacher to 1e-3
  RMS): a zero KD loss gives a zero term instead of 0 * inf = NaN, and the ratio stays at most
  ``|L_task| / 1e-6``; below the clamp the term's value falls under ``(1 - lambda) |L_task|``.
* **Eq. 8 counts L_task twice.** Each S carries its own ``lambda L_task``, so with both KD
  terms on, the task term weighs ``2 lambda``; we implement Eq. 8 exactly as written. In value,
  ``L_MD = 2 E[L_task]`` (each S is ``E[L_task]`` unless the clamp bites): the KD terms change
  the gradient, not the logged loss. With one KD term on, ``L = S(L_task, that term)``; with none,
  ``L = E[L_task]`` (Tab. 3's first row), t-scaling or not. ``lambda_kd`` / ``lambda_featkd``
  weigh Eq. 6 only (Eq. 8 has no constants).
* **||.||^2 is a mean** over the non-batch elements (``F.mse_loss``'s convention, as the
  diffusion task's Eq. 2 already was), a constant factor away from a sum: under Eq. 7 the ratio
  cancels it, under Eq. 6 ``lambda_1, lambda_2`` absorb it. Eq. 5's sum over layer pairs has one
  pair (the last transformer layer of each model, as the text says).
* **Precision.** Terms are computed in float32 whatever the autocast dtype of the models (the
  teacher runs in bf16); the teacher's outputs and features are detached.
* **Teacher features are not normalised.** SD3.5's last-layer hidden states are far larger than
  a velocity; under Eq. 8 the ratio matches L_featkd to L_task per sample anyway, under Eq. 6
  ``lambda_featkd`` has to.
* **Projector** (``psi``): see :class:`FeatureProjector` (3x3 conv that changes the grid, SiLU,
  1x1 conv that changes the width).
* **Fig. 6 logging.** 10 equal bins of ``sigma`` in (0, 1); each step logs, for every bin, the
  sum of each per-sample term (``tbin/<term>/<i>``) and the number of samples (``tbin/n/<i>``),
  zeros included, so all processes log the same keys and any average over micro-batches,
  processes or steps keeps ``sum / n`` exact.

Decisions where the paper is silent, decoder:

* The adversarial weight is a constant ``adv_weight`` switched on at ``adv_start_step``
  (before it, the discriminator is not even run): the reconstruction terms first get
  the decoder to a sensible image, as in taming/SD autoencoder training. We do not use
  taming's adaptive (last-layer gradient-ratio) weight: it needs the decoder's last
  layer and a second backward pass, and a constant weight is easier to reason about.
* Hinge loss by default (``adv_loss="non-saturating"`` for the original GAN loss [23]);
  an R1 penalty on real images is available (``r1_gamma > 0``), off by default.
* LPIPS uses the AlexNet trunk by default (``lpips_net``), frozen, in eval mode.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ConfigError, SnapgenError

#: Clamp of the denominator of Eq. 7's magnitude ratio (see the module docstring).
RATIO_EPS = 1e-6
#: Number of equal-width sigma bins of the Fig. 6 log.
T_BINS = 10


# ------------------------------------------------------------ per-sample terms (Eq. 2, 4, 5)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||^2`` per sample: the float32 mean over every dim but the first, shape (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"loss terms need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.float() - b.float()).square().flatten(1).mean(1)


def task_loss(v_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per sample: ``||target - v_student||^2`` (flow: ``target = eps - x_0``)."""
    return per_sample_mse(target, v_student)


def kd_loss(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per sample: ``||v_teacher - v_student||^2``, the teacher's output detached."""
    return per_sample_mse(v_teacher.detach(), v_student)


def featkd_loss(projected: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per sample: ``||f_teacher - psi(f_student)||^2``; ``projected`` is ``psi(f_student)``
    (:class:`FeatureProjector`'s output), ``f_teacher`` the teacher's last-layer tokens as a map
    (``core.teacher.tokens_to_map``), detached."""
    if projected.shape != f_teacher.shape:
        raise ValueError(f"feature KD: projected student features {tuple(projected.shape)} do not match the "
                         f"teacher's {tuple(f_teacher.shape)}; build the FeatureProjector with teacher_channels="
                         f"{f_teacher.shape[1]} and the grid ratio as stride (FeatureProjector.between)")
    return per_sample_mse(f_teacher.detach(), projected)


# ------------------------------------------------------------ timestep-aware scaling (Eq. 7)


def lambda_t(t: torch.Tensor) -> torch.Tensor:
    """``lambda(t)`` of Eq. 7: the logit-normal(0, 1) density normalised to max 1 (at t = 0.5).

    ``p(t) = exp(-logit(t)^2 / 2) / (sqrt(2 pi) t (1 - t))`` and ``p(0.5) = 4 / sqrt(2 pi)``, so
    ``lambda(t) = exp(-logit(t)^2 / 2) / (4 t (1 - t))``; it is 0 at t = 0 and t = 1.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    inside = (t > 0) & (t < 1)
    tc = torch.where(inside, t, torch.full_like(t, 0.5))
    value = torch.exp(-torch.logit(tc) ** 2 / 2) / (4 * tc * (1 - tc))
    return torch.where(inside, value, torch.zeros_like(value))


def scaled_kd(task: torch.Tensor, kd: torch.Tensor, lam: torch.Tensor, eps: float = RATIO_EPS) -> torch.Tensor:
    """The KD half of Eq. 7 per sample: ``(1 - lambda) * (|L_task| / |L_kd|) * L_kd``, the ratio
    detached and its denominator clamped at ``eps``; equals ``(1 - lambda) |L_task|`` in value."""
    ratio = task.detach().abs() / kd.detach().abs().clamp_min(eps)
    return (1 - lam) * ratio * kd


def timestep_aware_scaling(task: torch.Tensor, kd: torch.Tensor, lam: torch.Tensor,
                           eps: float = RATIO_EPS) -> torch.Tensor:
    """``S(L_task, L_kd)`` of Eq. 7 from per-sample (B,) terms and ``lam = lambda_t(sigma)``: the
    batch mean of ``lambda L_task + scaled_kd(L_task, L_kd, lambda)``. Also Eq. 9's KD term."""
    return (lam * task + scaled_kd(task, kd, lam, eps)).mean()


# ------------------------------------------------------------ the projector psi (Eq. 5)


class FeatureProjector(ModelMixin, ConfigMixin):
    """``psi`` of Eq. 5: "a lightweight trainable projector with only two Conv layers" from the
    student's last transformer-layer feature map (B, C_s, H_s, W_s) to the teacher's last-layer
    tokens as a map (B, C_t, H_t, W_t), the DiT's (H/p, W/p) patch grid (p = 2).

    ``conv1`` k x k with stride ``stride`` (the grid ratio H_s / H_t), C_s -> ``hidden_channels``
    (default C_s): the grid change, learnt; k = 3 for stride 1 and 2, 2 * stride - 1 above, padded
    so that a grid ``stride`` times the teacher's lands on it exactly. Then SiLU (two linear convs
    in a row would be one conv). ``conv2`` 1x1, hidden -> C_t: the width change.

    ``snapgen-t2i`` against SD3.5-Large: the last transformer layer is a stage-1 CA + FFN layer
    at the latent's full resolution, 256 wide; the teacher's tokens lie on the half-resolution
    grid, 2432 wide; so stride 2, 256 -> 256 (3x3, 0.59M weights) -> 2432 (1x1, 0.62M): 1.2M
    parameters, against 11.5M were the 3x3 conv to go to the teacher's width first. Ladder
    presets with residual first stages (``ladder-a..d``) end on stage 2, already on the teacher's
    grid: stride 1. :meth:`between` picks the stride from the two grids. For a grid that is no
    such multiple (a student coarser than the teacher), ``forward(x, size=(H_t, W_t))`` first
    resizes the input bilinearly to ``stride * size``, so any pair of resolutions works.
    """

    @register_to_config
    def __init__(self, student_channels: int, teacher_channels: int, stride: int = 2,
                 hidden_channels: int | None = None):
        super().__init__()
        if stride < 1:
            raise ConfigError(f"projector stride: expected a positive integer, got {stride}")
        hidden = hidden_channels or student_channels
        k = 3 if stride <= 2 else 2 * stride - 1
        self.conv1 = nn.Conv2d(student_channels, hidden, k, stride=stride, padding=k // 2)
        self.conv2 = nn.Conv2d(hidden, teacher_channels, 1)

    @staticmethod
    def grid_stride(student_hw: tuple[int, int], teacher_hw: tuple[int, int]) -> int:
        """``H_s / H_t`` when both sides of the student grid are that integer multiple of the
        teacher's, else 1 (the forward pass then resizes)."""
        (hs, ws), (ht, wt) = student_hw, teacher_hw
        if hs % ht == 0 and ws % wt == 0 and hs // ht == ws // wt:
            return hs // ht
        return 1

    @classmethod
    def between(cls, student_channels: int, teacher_channels: int, student_hw: tuple[int, int],
                teacher_hw: tuple[int, int], hidden_channels: int | None = None) -> FeatureProjector:
        """A projector for these two feature grids (e.g. the latent's H x W and H/2 x W/2)."""
        return cls(student_channels, teacher_channels, cls.grid_stride(student_hw, teacher_hw), hidden_channels)

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``psi(features)``; with ``size`` (the teacher's grid) the output is exactly that size."""
        if size is not None:
            s = self.config.stride
            want = (size[0] * s, size[1] * s)
            if tuple(features.shape[-2:]) != want:
                features = F.interpolate(features, size=want, mode="bilinear", align_corners=False)
        return self.conv2(F.silu(self.conv1(features)))


# ------------------------------------------------------------ distillation objective (Eq. 6, 8)


class DistillLoss:
    """Multi-level knowledge distillation (sec. 3.3): Eq. 8 with ``t_scaling``, else Eq. 6; each
    term a switch, so every row of supplement F's Tab. 3 is a setting:

    ====================  ============================================  =====================================
    Tab. 3 row            settings                                      loss
    ====================  ============================================  =====================================
    L_task                ``kd=False, featkd=False``                    E[L_task]
    + L_kd                ``kd=True, featkd=False, t_scaling=False``    E[L_task] + l_1 E[L_kd]
    + L_featkd            ``kd=True, featkd=True, t_scaling=False``     Eq. 6
    + t-scaling (paper)   ``kd=True, featkd=True, t_scaling=True``      Eq. 8 = S(task, kd) + S(task, featkd)
    ====================  ============================================  =====================================

    A term that is off is not computed (its inputs may be ``None``). ``t_bins > 0`` adds the
    per-t-bin sums of the computed terms to the logs (:func:`tbin_sums`, for Fig. 6).
    """

    def __init__(self, kd: bool = True, featkd: bool = True, t_scaling: bool = True, lambda_kd: float = 1.0,
                 lambda_featkd: float = 1.0, eps: float = RATIO_EPS, t_bins: int = T_BINS):
        for name, value in (("lambda_kd", lambda_kd), ("lambda_featkd", lambda_featkd)):
            if not value >= 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {value}")
        if not eps > 0:
            raise ConfigError(f"eps: expected a number > 0, got {eps}")
        self.kd, self.featkd, self.t_scaling = kd, featkd, t_scaling
        self.lambda_kd, self.lambda_featkd, self.eps, self.t_bins = lambda_kd, lambda_featkd, eps, t_bins

    def __call__(
        self,
        v_student: torch.Tensor,
        target: torch.Tensor,
        sigma: torch.Tensor,
        v_teacher: torch.Tensor | None = None,
        feat_student: torch.Tensor | None = None,
        feat_teacher: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss (a scalar) and its detached terms for logging.

        ``v_student`` (B, ...) the student's velocity, ``target`` Eq. 2's ``eps - x_0``, ``sigma``
        (B,) the noise level each sample was noised with; ``v_teacher`` the teacher's velocity
        (``kd``); ``feat_student`` the *projected* student features ``psi(f_s)`` and
        ``feat_teacher`` the teacher's (B, C_t, H_t, W_t) (``featkd``). Logged: ``task``, ``kd``,
        ``featkd`` (batch means of the unscaled terms), with t-scaling ``lambda`` (mean
        lambda(t)), ``scaled_kd``, ``scaled_featkd`` (batch means of the scaled KD halves of
        Eq. 7), and ``tbin/...`` (:func:`tbin_sums`).
        """
        task = task_loss(v_student, target)
        terms = {"task": task}
        if self.kd:
            if v_teacher is None:
                raise SnapgenError("DistillLoss(kd=True) needs the teacher's velocity: pass v_teacher=")
            terms["kd"] = kd_loss(v_student, v_teacher)
        if self.featkd:
            if feat_student is None or feat_teacher is None:
                raise SnapgenError("DistillLoss(featkd=True) needs feat_student= (projected) and feat_teacher=")
            terms["featkd"] = featkd_loss(feat_student, feat_teacher)
        kds = [k for k in ("kd", "featkd") if k in terms]
        logs = {k: v.detach().mean() for k, v in terms.items()}
        if not kds:
            loss = task.mean()
        elif self.t_scaling:  # Eq. 8 (Eq. 7 alone with one KD term)
            sigma = torch.as_tensor(sigma, device=task.device).reshape(-1)
            lam = lambda_t(sigma)
            loss = task.new_zeros(())
            for k in kds:
                scaled = scaled_kd(task, terms[k], lam, self.eps)
                loss = loss + (lam * task + scaled).mean()
                logs[f"scaled_{k}"] = scaled.detach().mean()
            logs["lambda"] = lam.mean()
        else:  # Eq. 6
            weights = {"kd": self.lambda_kd, "featkd": self.lambda_featkd}
            loss = task.mean()
            for k in kds:
                loss = loss + weights[k] * terms[k].mean()
        if self.t_bins:
            logs |= tbin_sums(sigma, terms, self.t_bins)
        return loss, logs


# ------------------------------------------------------------ Fig. 6: loss magnitude per t bin

_TBIN_KEY = re.compile(r"(?:^|/)tbin/([^/]+)/(\d+)$")


def tbin_sums(sigma: torch.Tensor, terms: Mapping[str, torch.Tensor], bins: int = T_BINS) -> dict[str, torch.Tensor]:
    """Per-t-bin sums of per-sample (B,) terms, for one step's log: ``tbin/<term>/<i>`` is the sum
    of the term over the samples whose ``sigma`` lies in ``[i / bins, (i + 1) / bins)`` (sigma = 1
    in the last bin), ``tbin/n/<i>`` their number. Every bin is present, zeros included."""
    sigma = torch.as_tensor(sigma).detach().float().reshape(-1)
    device = next(iter(terms.values())).device if terms else sigma.device
    idx = (sigma * bins).floor().long().clamp(0, bins - 1).to(device)
    counts = torch.zeros(bins, device=device).index_add_(0, idx, torch.ones(len(idx), device=device))
    out = {f"tbin/n/{i}": n for i, n in enumerate(counts)}
    for name, values in terms.items():
        sums = torch.zeros(bins, device=device).index_add_(0, idx, values.detach().float())
        out |= {f"tbin/{name}/{i}": v for i, v in enumerate(sums)}
    return out


def read_tbins(losses_jsonl: str | Path | Iterable[Mapping[str, float]], start: int = 0,
               end: int | None = None) -> dict[str, list[float]]:
    """Mean of each logged term per t bin over the steps ``start <= step <= end`` of a run's
    ``losses.jsonl`` (a path, or its records): ``{"n": [samples per bin], term: [sum / n per bin,
    NaN where n = 0]}``. Keys may carry a phase prefix (``distill/tbin/kd/3``)."""
    if isinstance(losses_jsonl, (str, Path)):
        lines = Path(losses_jsonl).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    else:
        records = list(losses_jsonl)
    sums: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("step", 0) < start or (end is not None and rec.get("step", 0) > end):
            continue
        for key, value in rec.items():
            if m := _TBIN_KEY.search(key):
                bucket = sums.setdefault(m.group(1), {})
                bucket[int(m.group(2))] = bucket.get(int(m.group(2)), 0.0) + float(value)
    if "n" not in sums:
        raise SnapgenError(f"no tbin/ keys in {losses_jsonl if isinstance(losses_jsonl, (str, Path)) else 'the log'}"
                           f" (steps {start}..{end or 'end'}): log per-t-bin terms with DistillLoss(t_bins > 0)")
    bins = max(sums["n"]) + 1
    n = [sums["n"].get(i, 0.0) for i in range(bins)]
    out = {"n": n}
    for name, bucket in sums.items():
        if name != "n":
            out[name] = [bucket.get(i, 0.0) / n[i] if n[i] > 0 else math.nan for i in range(bins)]
    return out


FIG6_LABELS = {"task": r"$\mathcal{L}_{task}$", "kd": r"$\mathcal{L}_{kd}$", "featkd": r"$\mathcal{L}_{featkd}$"}


def plot_fig6(losses_jsonl: str | Path, out_png: str | Path, terms: tuple[str, ...] = ("task", "kd"),
              start: int = 0, end: int | None = None, size: tuple[int, int] = (640, 400)) -> Path:
    """Fig. 6 of the paper from a run's ``losses.jsonl``: the mean loss magnitude of each of
    ``terms`` per t bin (:func:`read_tbins`) against the bin's centre, one line each, as a PNG
    of ``size`` pixels. Terms the run did not log are left out; empty bins are gaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only plotting needs it
    from matplotlib.figure import Figure

    means = read_tbins(losses_jsonl, start, end)
    bins = len(means["n"])
    centres = [(i + 0.5) / bins for i in range(bins)]
    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = [t for t in terms if t in means]
    if not drawn:
        raise SnapgenError(f"none of {', '.join(terms)} was logged per t bin in {losses_jsonl}")
    for t in drawn:
        ax.plot(centres, means[t], marker="o", label=FIG6_LABELS.get(t, t))
    ax.set_xlim(0, 1)
    ax.set_xlabel("t (noise level sigma)")
    ax.set_ylabel("mean loss magnitude")
    ax.set_title(f"Fig. 6: loss magnitude per t bin ({int(sum(means['n']))} samples)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# ------------------------------------------------------------ decoder: reconstruction (sec. 3.2)


class ReconstructionLoss(nn.Module):
    """``w_mse * MSE + w_l1 * L1`` between the decoded and the target image."""

    def __init__(self, mse_weight: float = 1.0, l1_weight: float = 0.0):
        super().__init__()
        self.mse_weight = mse_weight
        self.l1_weight = l1_weight

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = F.mse_loss(recon, target)
        logs = {"mse": mse.detach()}
        loss = self.mse_weight * mse
        if self.l1_weight:
            l1 = F.l1_loss(recon, target)
            logs["l1"] = l1.detach()
            loss = loss + self.l1_weight * l1
        return loss, logs


# ------------------------------------------------------------ decoder: LPIPS

LPIPS_NETS = ("alex", "vgg", "squeeze")


def lpips_backbone_checkpoint(net: str) -> str:
    """The path where torchvision caches the ImageNet trunk that ``lpips.LPIPS(net=net)`` loads
    (``$TORCH_HOME/hub/checkpoints/<file name of torchvision's download URL>``)."""
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def load_lpips(net: str = "alex", off: str = "lpips_weight = 0") -> nn.Module:
    """The real ``lpips.LPIPS(net=net)``, frozen: the one LPIPS of the package (the decoder loss and
    the reconstruction metric). Its torchvision trunk must be cached already: nothing is downloaded,
    and a missing file is one ConfigError saying where to put it, or ``off`` (the setting that
    turns LPIPS off for the caller)."""
    if net not in LPIPS_NETS:
        raise ConfigError(f"lpips_net: expected one of {', '.join(LPIPS_NETS)}, got {net!r}")
    path = lpips_backbone_checkpoint(net)
    if not os.path.isfile(path):
        name = os.path.basename(path)
        raise ConfigError(
            f"LPIPS ({net}) needs torchvision's ImageNet {net} weights at {path} (nothing is downloaded): put "
            f"https://download.pytorch.org/models/{name} there, or set TORCH_HOME to a folder holding "
            f"hub/checkpoints/{name}; or set {off} to go without LPIPS"
        )
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=``
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, verbose=False)
    return model.eval().requires_grad_(False)


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance [86] between images in [-1, 1].

    ``model`` is an ``lpips.LPIPS`` (or any module with its ``(x, y) -> (B, 1, 1, 1)``
    contract); by default the real one from :func:`load_lpips`. It is frozen and kept in
    eval mode (``train()`` does not reach it).
    """

    def __init__(self, net: str = "alex", model: nn.Module | None = None):
        super().__init__()
        self.model = (model if model is not None else load_lpips(net)).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(recon, target).mean()


# ------------------------------------------------------------ adversarial (decoder; Eq. 9's GAN)

# Generator side (fake logits -> loss) and discriminator side (real, fake logits -> loss).
_G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": lambda fake: -fake.mean(),
    "non-saturating": lambda fake: F.softplus(-fake).mean(),
}
_D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
    "non-saturating": lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
}
ADV_LOSSES = tuple(_G_LOSSES)


class AdversarialLoss:
    """Hinge [Lim & Ye] or non-saturating [23] GAN loss on discriminator logits.

    * hinge:          G: ``-E[D(fake)]``;  D: ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``
    * non-saturating: G: ``E[softplus(-D(fake))]``;  D: ``E[softplus(-D(real))] + E[softplus(D(fake))]``
    """

    def __init__(self, kind: str = "hinge"):
        if kind not in _G_LOSSES:
            raise ConfigError(f"adv_loss: expected one of {', '.join(ADV_LOSSES)}, got {kind!r}")
        self.kind = kind

    def generator(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return _G_LOSSES[self.kind](fake_logits)

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return _D_LOSSES[self.kind](real_logits, fake_logits)


def r1_penalty(disc: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R1 gradient penalty (Mescheder et al. 2018): ``E[||grad_x D(x)||^2]`` on real images.

    Returns ``(penalty, real_logits)`` so the caller reuses the logits for the D loss; the
    penalty is differentiable w.r.t. the discriminator's parameters (double backward).
    """
    real = real.detach().requires_grad_(True)
    logits = disc(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean(), logits


# ------------------------------------------------------------ decoder: the objective


class DecoderLoss(nn.Module):
    """The decoder objective of sec. 3.2: MSE (+ L1) + LPIPS + warmed-up adversarial, no KL.

    ``lpips_weight = 0`` trains without LPIPS (no weights needed); ``lpips`` lets a caller
    pass a ready :class:`LPIPSLoss`.
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        l1_weight: float = 0.0,
        lpips_weight: float = 1.0,
        lpips_net: str = "alex",
        adv_weight: float = 0.1,
        adv_loss: str = "hinge",
        adv_start_step: int = 0,
        r1_gamma: float = 0.0,
        lpips: LPIPSLoss | None = None,
    ):
        super().__init__()
        self.reconstruction = ReconstructionLoss(mse_weight, l1_weight)
        self.lpips_weight = lpips_weight
        self.lpips = (lpips if lpips is not None else LPIPSLoss(lpips_net)) if lpips_weight else None
        self.adversarial = AdversarialLoss(adv_loss)
        self.adv_weight = adv_weight
        self.adv_start_step = adv_start_step
        self.r1_gamma = r1_gamma

    def adversarial_active(self, step: int) -> bool:
        """Whether the GAN terms count at ``step`` (the loop skips the D step otherwise)."""
        return self.adv_weight > 0 and step >= self.adv_start_step

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor, disc: nn.Module | None = None, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator (decoder) loss and its detached terms for logging. The adversarial term
        also puts gradients on ``disc``'s parameters: zero them before the D step."""
        loss, logs = self.reconstruction(recon, target)
        if self.lpips is not None:
            lp = self.lpips(recon, target)
            logs["lpips"] = lp.detach()
            loss = loss + self.lpips_weight * lp
        adv = recon.new_zeros(())
        if self.adversarial_active(step):
            if disc is None:
                raise SnapgenError(f"DecoderLoss: step {step} >= adv_start_step needs the discriminator; pass disc=")
            adv = self.adversarial.generator(disc(recon))
            loss = loss + self.adv_weight * adv
        logs["adv_g"] = adv.detach()
        logs["loss_g"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real images and (detached) decoded images, plus
        ``r1_gamma / 2 * R1`` when ``r1_gamma > 0``."""
        logs: dict[str, torch.Tensor] = {}
        if self.r1_gamma:
            r1, real_logits = r1_penalty(disc, real)
            logs["r1"] = r1.detach()
        else:
            real_logits = disc(real.detach())
        fake_logits = disc(fake.detach())
        loss = self.adversarial.discriminator(real_logits, fake_logits)
        logs["adv_d"] = loss.detach()
        if self.r1_gamma:
            loss = loss + 0.5 * self.r1_gamma * r1
        logs["loss_d"] = loss.detach()
        logs["logits_real"] = real_logits.detach().mean()
        logs["logits_fake"] = fake_logits.detach().mean()
        return loss, logs


# ------------------------------------------------------------ step distillation (sec. 3.4, Eq. 9)


class StepDistillLoss:
    """Eq. 9: ``min_D max_G E[log D(x_{t-1}, t)] + E[log(1 - D(x'_{t-1}, t))] - S(L_task, L_kd)``.

    The generator (the student) minimises ``adv_weight * L_adv^G + S(L_task, L_kd)`` and the
    discriminator (heads on the frozen teacher's features) minimises ``L_adv^D`` (+ the
    approximate R1 penalty), both averaged over the heads. ``adv_loss="non-saturating"`` is
    Eq. 9's log form as GANs train it [23]: D minimises ``softplus(-D(real)) + softplus(D(fake))``
    (= ``-log sigmoid(D(real)) - log(1 - sigmoid(D(fake)))``), G minimises ``softplus(-D(fake))``
    (the non-saturating ``-log sigmoid(D(fake))`` instead of ``log(1 - sigmoid(D(fake)))``); at
    zero logits the D loss is ``2 ln 2``. ``"hinge"`` is the option LADD also uses.

    ``S`` is :func:`timestep_aware_scaling` at the student's own noise level (Eq. 7); ``kd=False``
    leaves ``E[L_task]`` (the ablation without the turbo teacher's output). ``adv_weight`` 1 is
    Eq. 9 as written (no constant). The approximate R1 (``r1_gamma > 0``; SD3-Turbo / LADD's
    substitute for the double-backward R1 through the big teacher): ``r1_gamma * E||D(x) -
    D(x + N(0, r1_sigma^2))||^2`` on real inputs, which needs no gradient through the teacher.

    Logged per head ``h<block>``: the mean real and fake logits ``D_real`` / ``D_fake`` and the
    discriminator's accuracy ``acc`` (a sample's score is its mean token logit; real counts as
    right above 0, fake below).
    """

    def __init__(self, adv_loss: str = "non-saturating", adv_weight: float = 1.0, kd: bool = True,
                 r1_gamma: float = 0.0, eps: float = RATIO_EPS):
        if not adv_weight >= 0:
            raise ConfigError(f"adv_weight: expected a number >= 0, got {adv_weight}")
        if not r1_gamma >= 0:
            raise ConfigError(f"r1_gamma: expected a number >= 0, got {r1_gamma}")
        self.adversarial = AdversarialLoss(adv_loss)
        self.adv_weight, self.kd, self.r1_gamma, self.eps = adv_weight, kd, r1_gamma, eps

    def generator(self, fake_logits: list[torch.Tensor], v_student: torch.Tensor, target: torch.Tensor,
                  sigma: torch.Tensor, v_teacher: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's loss: ``adv_weight * mean_h L_adv^G(D_h(x'_s)) + S(L_task, L_kd)``."""
        task = task_loss(v_student, target)
        logs = {"task": task.detach().mean()}
        if self.kd:
            if v_teacher is None:
                raise SnapgenError("StepDistillLoss(kd=True) needs the teacher's velocity: pass v_teacher=")
            kd = kd_loss(v_student, v_teacher)
            sigma = torch.as_tensor(sigma, device=task.device).reshape(-1)
            distill = timestep_aware_scaling(task, kd, lambda_t(sigma), self.eps)
            logs["kd"] = kd.detach().mean()
        else:
            distill = task.mean()
        adv = torch.stack([self.adversarial.generator(f.float()) for f in fake_logits]).mean()
        logs |= {"S": distill.detach(), "adv_g": adv.detach()}
        return self.adv_weight * adv + distill, logs

    def discriminator(self, real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor], names: list[str],
                      real_perturbed: list[torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The heads' loss on real and (detached) fake inputs; ``real_perturbed``: the logits of
        the perturbed real inputs for the approximate R1."""
        losses, logs = [], {}
        for name, real, fake in zip(names, real_logits, fake_logits, strict=True):
            real, fake = real.float(), fake.float()
            losses.append(self.adversarial.discriminator(real, fake))
            sr, sf = real.detach().flatten(1).mean(1), fake.detach().flatten(1).mean(1)
            logs |= {f"D_real/{name}": sr.mean(), f"D_fake/{name}": sf.mean(),
                     f"acc/{name}": 0.5 * ((sr > 0).float().mean() + (sf < 0).float().mean())}
        loss = torch.stack(losses).mean()
        logs["adv_d"] = loss.detach()
        if self.r1_gamma:
            if real_perturbed is None:
                raise SnapgenError("StepDistillLoss(r1_gamma > 0) needs the logits of perturbed reals")
            r1 = torch.stack([(a.float() - b.float()).square().mean()
                              for a, b in zip(real_logits, real_perturbed, strict=True)]).mean()
            logs["r1"] = r1.detach()
            loss = loss + self.r1_gamma * r1
        return loss, logs
