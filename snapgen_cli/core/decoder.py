"""The tiny and fast latent decoder (paper sec. 3.2, Fig. 4b, Table 2).

It replaces the SD3 VAE decoder (49.55M params, ~4970 G MACs for a 128x128 latent ->
1024x1024 image) while reading the same 16-channel, f=8 latents of the frozen SD3
encoder. The paper's five changes to the SDXL/SD3 decoder, and the switch for each:

1. no attention layers -- there are none;
2. a minimal amount of GroupNorm -- ``norm="minimal"`` (``"all"`` / ``"none"`` for
   the ablation);
3. thinner, with separable convs (depthwise 3x3 + pointwise 1x1) -- ``block_out_channels``,
   ``separable=True``;
4. fewer residual blocks in the high-resolution stages -- ``layers_per_block``;
5. residual blocks have no conv shortcut; the upsampling layer changes the channels.

Decisions where the paper is silent (measured with ``torch.utils.flop_counter`` on the
meta device, MACs = FLOPs / 2, 128x128x16 latent -> 1024x1024x3 image):

* **Layout**: ``conv_in`` (regular 3x3, latent -> ``block_out_channels[0]``), then one
  stage per entry of ``block_out_channels`` (ordered from latent to image resolution,
  the opposite of diffusers' encoder-ordered list -- diffusers pipelines only read its
  length, which gives the upsampling factor ``2 ** (len - 1)``), each holding
  ``layers_per_block[i]`` residual blocks and, except the last, an upsampler
  (nearest x2 -> 3x3 conv ``C_i -> C_{i+1}``); then SiLU and a regular 3x3 ``conv_out``.
* **Residual block**: ``[GN] -> SiLU -> SepConv -> [GN] -> SiLU -> SepConv`` plus the
  identity; SiLU as in the SD3 decoder.
* **Which convs are separable**: all convs of the residual blocks (``separable``). The
  upsampler convs -- the only layers that change the width (change 5) -- and
  ``conv_in``/``conv_out`` stay full 3x3 convs (``upsample_separable=False``). With
  separable upsamplers too, no layout with <= 2 blocks at 512 px and <= 1 at 1024 px
  reaches both paper figures (best found: 1.5M params at 172 G MACs), so we read
  "replace Conv with SepConvs" as applying to the residual blocks.
* **GroupNorm placement**, ``norm="minimal"``: one GroupNorm at the entrance of the
  first residual block of every resolution stage (4 GNs for f=8), none in front of
  ``conv_out``: one normalisation per resolution keeps the colour statistics in check
  (the paper's "color shifting") while the full-resolution maps see a single reduction.
  ``"all"`` normalises before every conv of every block and before ``conv_out`` (the
  SD3 layout); ``"none"`` removes them all.
* **Widths/depths** of ``snapgen-decoder`` (stages at 128, 256, 512, 1024 px):
  channels ``(192, 192, 160, 48)``, residual blocks ``(4, 3, 2, 1)`` -- SD3 has 3 per
  stage, so the two high-resolution stages have fewer. Found by a grid search over
  widths and depths for the layout closest to both of Table 2's figures. Measured:
  **1,368,867 parameters (paper: 1.38M, -0.8%) and 222.8 G MACs (paper: 224 G, -0.5%)**;
  TAESD3's decoder: 1.23M; SD3's: 49.5M and ~4970 G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ConfigError
from .blocks import conv, group_norm
from .latents import denormalize_latents
from .presets import preset_config

NORM_MODES = ("minimal", "all", "none")


class DecoderResBlock(nn.Module):
    """Residual block without a conv shortcut (change 5): ``x + f(x)`` at constant width."""

    def __init__(self, channels: int, *, norms: tuple[bool, bool], separable: bool):
        super().__init__()
        self.norm1 = group_norm(channels) if norms[0] else nn.Identity()
        self.conv1 = conv(channels, channels, separable=separable)
        self.norm2 = group_norm(channels) if norms[1] else nn.Identity()
        self.conv2 = conv(channels, channels, separable=separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class DecoderUpsample(nn.Module):
    """Nearest x2 upsampling then a 3x3 (separable) conv that also changes the width."""

    def __init__(self, in_ch: int, out_ch: int, *, separable: bool):
        super().__init__()
        self.conv = conv(in_ch, out_ch, separable=separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _block_norms(norm: str, first_in_stage: bool) -> tuple[bool, bool]:
    if norm == "all":
        return True, True
    if norm == "minimal":
        return first_in_stage, False
    return False, False


class TinyDecoder(ModelMixin, ConfigMixin):
    """Latent -> image decoder, a drop-in replacement for ``AutoencoderKL``'s decoding side.

    ``decode(z)`` takes *unnormalised* latents, exactly like ``AutoencoderKL.decode`` in
    diffusers pipelines (which call ``vae.decode(latents / scaling_factor + shift_factor)``),
    and returns a :class:`DecoderOutput` whose ``sample`` is the image in [-1, 1].
    ``scaling_factor``/``shift_factor`` (SD3's by default) live in the config for the
    pipelines and :func:`latents_to_images` to read.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (192, 192, 160, 48),
        layers_per_block: tuple[int, ...] = (4, 3, 2, 1),
        norm: str = "minimal",
        separable: bool = True,
        upsample_separable: bool = False,
        scaling_factor: float = 1.5305,
        shift_factor: float = 0.0609,
    ):
        super().__init__()
        if norm not in NORM_MODES:
            raise ConfigError(f"decoder norm: expected one of {', '.join(NORM_MODES)}, got {norm!r}")
        if len(layers_per_block) != len(block_out_channels) or not block_out_channels:
            raise ConfigError(
                f"decoder layers_per_block: expected one entry per block_out_channels entry "
                f"({len(block_out_channels)}), got {len(layers_per_block)}"
            )
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(latent_channels, chans[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i, (ch, depth) in enumerate(zip(chans, layers_per_block)):
            layers: list[nn.Module] = [
                DecoderResBlock(ch, norms=_block_norms(norm, j == 0), separable=separable) for j in range(depth)
            ]
            if i + 1 < len(chans):
                layers.append(DecoderUpsample(ch, chans[i + 1], separable=upsample_separable))
            self.stages.append(nn.Sequential(*layers))
        self.norm_out = group_norm(chans[-1]) if norm == "all" else nn.Identity()
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents (B, C, h, w) -> image (B, 3, f*h, f*w) in about [-1, 1].

        Runs in the channels-last memory format: the separable convs are memory-bound, and
        oneDNN / cuDNN run depthwise convs much faster on NHWC (measured on a 2-core CPU:
        1.6x at 512^2, same numbers to 1e-6). The output is an ordinary (B, 3, H, W) tensor.
        Not while exporting (``snapgen export``): a graph has no strides.
        """
        h = self.conv_in(z if torch.compiler.is_exporting() else z.contiguous(memory_format=torch.channels_last))
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Same contract as ``AutoencoderKL.decode``: unnormalised latents in, image out."""
        image = self(z)
        return DecoderOutput(sample=image) if return_dict else (image,)


def latents_to_images(decoder_or_vae: ModelMixin, normalized_latents: torch.Tensor) -> torch.Tensor:
    """Decode diffusion-space latents with a :class:`TinyDecoder` or an ``AutoencoderKL``
    (reading ``scaling_factor``/``shift_factor`` from its config; a ``None`` shift is 0)
    into float32 images in [0, 1], shape (B, 3, H, W). The latents are cast to the
    model's dtype first, as diffusers pipelines do."""
    z = denormalize_latents(decoder_or_vae, normalized_latents).to(decoder_or_vae.dtype)
    image = decoder_or_vae.decode(z).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)


DECODER_PRESETS: dict[str, dict] = {
    "snapgen-decoder": dict(block_out_channels=(192, 192, 160, 48), layers_per_block=(4, 3, 2, 1)),
    "tiny": dict(block_out_channels=(64, 48, 32, 16), layers_per_block=(2, 1, 1, 1)),  # 84.7k params
}

#: The figures Table 2 reports for the paper's decoder (128x128 latent -> 1024x1024 image).
PAPER_DECODER = {"params": 1.38e6, "macs": 224e9}


def decoder_config(preset: str, **overrides) -> dict:
    """The config dict of a named preset, with ``overrides`` applied."""
    return preset_config(DECODER_PRESETS, "decoder", preset, **overrides)


def build_decoder(preset: str = "snapgen-decoder", **overrides) -> TinyDecoder:
    return TinyDecoder(**decoder_config(preset, **overrides))
