"""An autoencoder's latent space, the one place it is written: SD3-style normalisation (the
diffusion model works on ``(z - shift_factor) * scaling_factor`` of the raw latents ``z``;
decoders take raw latents back, ``latents / scaling_factor + shift_factor``, both factors read
from the autoencoder's or the tiny decoder's config) and the downsampling factor f.
(No diffusers import: ``precompute`` stays quick to load.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


def latent_scale_shift(autoencoder: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from an ``AutoencoderKL``'s or ``TinyDecoder``'s config
    (SD3: 1.5305, 0.0609); a missing or ``None`` shift is 0 (SD1/SDXL autoencoders)."""
    cfg = autoencoder.config
    scale = getattr(cfg, "scaling_factor", None)
    if scale is None:
        raise ConfigError(f"{type(autoencoder).__name__} config has no scaling_factor; set it in its config.json")
    return float(scale), float(getattr(cfg, "shift_factor", None) or 0.0)


def normalize_latents(autoencoder: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw autoencoder latents -> diffusion space (``(z - shift) * scale``), as in SD3 training."""
    scale, shift = latent_scale_shift(autoencoder)
    return (z - shift) * scale


def denormalize_latents(autoencoder: Any, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion-space latents -> the autoencoder's raw latent space (``z / scale + shift``)."""
    scale, shift = latent_scale_shift(autoencoder)
    return latents / scale + shift


def downsampling_factor(vae_config: Any) -> int:
    """f of an ``AutoencoderKL`` config, a dict or its ``.config`` (diffusers: ``2 ** (len(block_out_channels) - 1)``)."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)
