"""The paper's losses: ``lambda(t)`` of Eq. 7 (sec. 3.3) and the objective of the tiny decoder
(paper sec. 3.2, "Training of the Decoder").

The decoder is trained with "the mean squared error (MSE) loss, lpips loss [86],
adversarial loss [23], and discard[s] the KL term [36] as the encoder is fixed":

    L_G = w_mse * MSE + w_l1 * L1 + w_lpips * LPIPS + w_adv(step) * L_adv^G
    L_D = L_adv^D + (gamma / 2) * R1

All images are in [-1, 1] (the decoder's output range and LPIPS' input range).
Everything here is plain tensors and modules, so any training loop can call
:meth:`DecoderLoss.forward` on the decoder step and :meth:`DecoderLoss.discriminator_loss`
on the discriminator step. Decisions where the paper is silent:

* The adversarial weight is a constant ``adv_weight`` switched on at ``adv_start_step``
  (before it, the discriminator is not even run): the reconstruction terms first get
  the decoder to a sensible image, as in taming/SD autoencoder training. We do not use
  taming's adaptive (last-layer gradient-ratio) weight: it needs the decoder's last
  layer and a second backward pass, and a constant weight is easier to reason about.
* Hinge loss by default (``adv_loss="non-saturating"`` for the original GAN loss [23]);
  an R1 penalty on real images is available (``r1_gamma > 0``), off by default.
* LPIPS uses the AlexNet trunk by default (``lpips_net``), frozen, in eval mode.
* **Timestep of Eq. 7.** :func:`lambda_t` is evaluated at the noise level the sample was
  actually noised with (the shifted ``sigma`` for flow), the "t" of Eq. 1.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SnapgenError

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


LPIPS_NETS = ("alex", "vgg", "squeeze")


# ---------------------------------------------------------------------------- reconstruction


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


# ---------------------------------------------------------------------------- LPIPS


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


# ---------------------------------------------------------------------------- adversarial

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


# ---------------------------------------------------------------------------- the objective


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
