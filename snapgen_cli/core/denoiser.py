"""The denoisers a diffusion stage trains and a pipeline samples: the SnapGen UNet or an SD3 DiT.

``pretrain`` / ``finetune`` train the efficient UNet (sec. 3.1) by default; with ``model``
set to a DiT preset they train an ``SD3Transformer2DModel`` instead -- the same flow
objective, data and text features -- which is how a distillation teacher is made where
SD3.5's weights cannot be had (the CPU demo, tests), and how SD3.5's exact configs are
planned on the meta device. One registry of model names covers both:

* the UNet presets of ``core/unet.py`` (``snapgen-t2i``, ``snapgen-imagenet``, ``tiny``, ``ladder-*``);
* ``sd35-large``, ``sd35-medium`` and ``sd3-tiny``: the teacher presets of ``core/teacher.py``.

:func:`denoise` calls either with the sampler's and the losses' convention: latents ``x_t``,
``timestep = sigma * 1000``, and the condition ``(context, pooled, mask)`` that
``core.text.combine`` builds (an SD3 DiT takes no attention mask: SD3 attends to every text
token, padding included). It returns the prediction and, when asked, the feature map of Eq. 5:
the UNet's last transformer layer, or the DiT's last block's image tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from ..errors import ConfigError
from .teacher import TEACHER_PRESETS, data_overrides, teacher_config, teacher_forward, use_joint_attn_processor
from .unet import UNET_PRESETS, SnapGenUNet, unet_config

#: Model names of the DiT presets (the teacher registry's, ``tiny`` renamed apart from the UNet's).
DIT_NAMES = {"sd35-large": "sd35-large", "sd35-medium": "sd35-medium", "sd3-tiny": "tiny"}
assert set(DIT_NAMES.values()) == set(TEACHER_PRESETS)


def model_names() -> list[str]:
    return [*UNET_PRESETS, *DIT_NAMES]


def is_dit(model_or_config: Any) -> bool:
    """Whether a model (or a saved config dict) is an SD3 DiT rather than a SnapGen UNet."""
    if isinstance(model_or_config, dict):
        return "joint_attention_dim" in model_or_config
    return isinstance(model_or_config, SD3Transformer2DModel)


def fresh_config(name: str, latent_channels: int, layout, overrides: dict | None = None) -> dict:
    """The config of a denoiser trained from scratch: the named preset, the data's latent
    channels and text widths (a ``core.text.TextLayout``), then ``overrides``."""
    overrides = dict(overrides or {})
    if name in DIT_NAMES:
        return teacher_config(DIT_NAMES[name], **data_overrides(layout, latent_channels), **overrides)
    if name in UNET_PRESETS:
        return unet_config(name, in_channels=latent_channels, out_channels=latent_channels, **layout.unet_kwargs(),
                           **overrides)
    raise ConfigError(f"model: unknown model {name!r}; choose one of: {', '.join(model_names())}")


def build(config: dict) -> SnapGenUNet | SD3Transformer2DModel:
    """The denoiser of a config (from :func:`fresh_config` or a saved ``config.json``)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = SD3Transformer2DModel if is_dit(config) else SnapGenUNet
    try:
        model = cls(**config)
    except TypeError as exc:
        raise ConfigError(f"model_overrides: {exc}") from None
    return use_joint_attn_processor(model) if cls is SD3Transformer2DModel else model


def saved_config(path) -> dict:
    """The config of a saved denoiser (its ``config.json``), without diffusers' ``_`` keys."""
    return {k: v for k, v in SnapGenUNet.load_config(path).items() if not k.startswith("_")}


def load(path) -> SnapGenUNet | SD3Transformer2DModel:
    """A saved denoiser (``save_pretrained`` dir), whichever class its ``config.json`` names."""
    if is_dit(saved_config(path)):
        return use_joint_attn_processor(SD3Transformer2DModel.from_pretrained(path))
    return SnapGenUNet.from_pretrained(path)


def text_dims(config) -> dict[str, int]:
    """``in_channels`` and the text widths the denoiser takes (names as ``TextLayout``'s)."""
    c = dict(config)
    if is_dit(c):
        return {"in_channels": c["in_channels"], "context_dim": c["joint_attention_dim"],
                "pooled_dim": c["pooled_projection_dim"]}
    return {"in_channels": c["in_channels"], "context_dim": c["context_dim"], "pooled_dim": c["pooled_dim"]}


def check_fits(config, latent_channels: int, layout, where) -> None:
    """The denoiser's input channels and text widths must be the data's (one ConfigError line)."""
    want = dict(in_channels=latent_channels, context_dim=layout.context_dim, pooled_dim=layout.pooled_dim)
    have = text_dims(config)
    bad = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if bad:
        raise ConfigError(f"the model does not fit the data in {where}: " +
                          ", ".join(f"{k}={m} but the shards need {d}" for k, (m, d) in bad.items()))


def forward_macs(config, latent_size: int, layout) -> int:
    """MACs of one forward of the denoiser of ``config`` for one sample: a ``latent_size``^2
    latent and the condition of ``layout`` (a ``core.text.TextLayout``: every token attended),
    counted on the meta device (``core.measure.count_macs``: nothing allocated or computed)."""
    from .measure import count_macs

    with torch.device("meta"):
        model = build(dict(config))
        c = text_dims(model.config)
        x = torch.zeros(1, c["in_channels"], latent_size, latent_size)
        cond = (torch.zeros(1, layout.seq_len, c["context_dim"]), torch.zeros(1, c["pooled_dim"]),
                torch.ones(1, layout.seq_len, dtype=torch.bool))
        return count_macs(lambda: denoise(model, x, torch.full((1,), 500.0), cond))


def denoise(model, x_t: torch.Tensor, timestep: torch.Tensor, cond, *, return_features: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prediction, features or None)`` of a UNet or an SD3 DiT (unwrapped or DDP-wrapped)."""
    context, pooled, mask = cond
    inner = getattr(model, "module", model)
    if isinstance(inner, SD3Transformer2DModel):
        if model is inner:
            return teacher_forward(model, x_t, timestep, context, pooled, return_features=return_features)
        if return_features:
            raise ConfigError("features of a DDP-wrapped DiT are not supported; train the DiT without feature KD")
        return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=context,
                     pooled_projections=pooled, return_dict=False)[0], None
    out = model(x_t, timestep, context, pooled, encoder_attention_mask=mask, return_features=return_features)
    return out.sample, out.features
