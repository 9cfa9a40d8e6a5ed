"""PatchGAN discriminator for training the tiny decoder (paper sec. 3.2, "adversarial loss [23]").

The paper names an adversarial loss but not the discriminator. We use the layout that
latent-autoencoder training made standard -- the pix2pix / taming-transformers
``NLayerDiscriminator``: 4x4 convs, ``n_layers`` stride-2 stages doubling the width
(capped at ``8 * base_channels``), one stride-1 stage, then a 1-channel 4x4 conv, so
each output logit judges one overlapping patch (a 70x70 receptive field for
``n_layers=3``). Decisions where the paper is silent:

* ``norm="group"`` by default instead of taming's BatchNorm: it does not depend on the
  per-device batch (small under FSDP/DDP) and behaves the same in the R1 double
  backward; ``"batch"`` gives the taming layout and ``"none"`` no normalisation.
* Weights start as in pix2pix/taming: conv ``N(0, 0.02)``, norm scale ``N(1, 0.02)``.
"""

from __future__ import annotations

import copy

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ConfigError
from .blocks import group_norm

DISC_NORMS = ("group", "batch", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return group_norm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Images (B, C, H, W) in [-1, 1] -> patch logits (B, 1, ~H/2^n_layers, ~W/2^n_layers)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in DISC_NORMS:
            raise ConfigError(f"discriminator norm: expected one of {', '.join(DISC_NORMS)}, got {norm!r}")
        if n_layers < 1:
            raise ConfigError(f"discriminator n_layers: expected an integer >= 1, got {n_layers}")
        use_bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=use_bias), _norm(norm, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


DISCRIMINATOR_PRESETS: dict[str, dict] = {
    "patchgan": dict(base_channels=64, n_layers=3),
    "tiny": dict(base_channels=8, n_layers=2),
}


def build_discriminator(preset: str = "patchgan", **overrides) -> PatchDiscriminator:
    if preset not in DISCRIMINATOR_PRESETS:
        raise ConfigError(
            f"unknown discriminator preset {preset!r}; choose one of: {', '.join(DISCRIMINATOR_PRESETS)}"
        )
    return PatchDiscriminator(**{**copy.deepcopy(DISCRIMINATOR_PRESETS[preset]), **overrides})
