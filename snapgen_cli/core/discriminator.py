"""The two discriminators: a PatchGAN for the tiny decoder (sec. 3.2) and the heads on a frozen
teacher's features for step distillation (sec. 3.4, :class:`FeatureHeads`).

PatchGAN discriminator for training the tiny decoder (paper sec. 3.2, "adversarial loss [23]").

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


# ----------------------------------------------------------------------------------------
# Step distillation (sec. 3.4): trainable heads on the frozen few-step teacher's features.


class FeatureHeads(ModelMixin, ConfigMixin):
    """The trainable part of sec. 3.4's discriminator ``D_{theta_T}``: "a few linear layers ...
    after feature extraction" from the frozen teacher (SD3.5-Large-Turbo), one head per chosen
    teacher block (``blocks``), as in LADD (Sauer et al. 2024, ref. [63]).

    A head maps each image token (B, N, ``feature_dim``) to a logit: LayerNorm (no affine) ->
    Linear(feature_dim, hidden) -> FiLM by the noise level -> SiLU -> Linear(hidden, 1). The
    noise level ``sigma`` enters as SD3 embeds it (``sigma * 1000`` through sinusoidal features
    and a 2-layer MLP, diffusers' ``Timesteps`` / ``TimestepEmbedding``), giving a per-head
    scale and shift of the hidden layer: "heads conditioned on the noise level". Decisions where
    the paper is silent: token-wise logits (LADD's heads are also token-/patch-wise), by default no
    text conditioning in the heads (the teacher's features already carry the prompt), the last
    layer zero-initialised so that every head starts at logit 0 (the discriminator loss then starts
    at its analytic value, 2 ln 2 for the log form).

    ``cond_dim`` > 0 conditions every head on a text embedding (B, ``cond_dim``) as ADD does
    (Sauer et al. 2023, after StyleGAN-T and Miyato & Koyama's projection discriminator): a
    per-head linear map of the embedding, zero-initialised, is dotted with each token's hidden
    features and added to its logit, ``logit += <silu(h), W_c c> / sqrt(hidden)``. A head can then
    score how well an image matches its prompt, not only whether it looks real.

    ``kernel_size`` 1 (default) is the paper's "linear layers": each token judged on its own.
    ``kernel_size`` k > 1 makes the first layer a k x k convolution over the teacher's token grid
    (LADD's heads are convolutional), so a head sees each token's neighbourhood; ``forward`` then
    needs the grid's ``(h, w)``.
    """

    @register_to_config
    def __init__(self, feature_dim: int, blocks: tuple[int, ...] = (-1,), hidden: int = 256, embed_dim: int = 256,
                 kernel_size: int = 1, cond_dim: int = 0):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        if not blocks:
            raise ConfigError("disc_blocks: expected at least one teacher block index")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"disc_kernel: expected an odd size >= 1 (1: linear heads), got {kernel_size}")
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(embed_dim, hidden)
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.inp = nn.ModuleList(nn.Linear(feature_dim, hidden) if kernel_size == 1 else
                                 nn.Conv2d(feature_dim, hidden, kernel_size, padding=kernel_size // 2) for _ in blocks)
        self.film = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in blocks)
        self.out = nn.ModuleList(nn.Linear(hidden, 1) for _ in blocks)
        self.cond = nn.ModuleList(nn.Linear(cond_dim, hidden) for _ in blocks) if cond_dim else None
        for lin in [*self.film, *self.out, *(self.cond or [])]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, features: list[torch.Tensor], sigma: torch.Tensor,
                grid: tuple[int, int] | None = None, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-token logits (B, N) of each head, from the teacher's tokens after each block
        (``core.teacher.teacher_block_features``) and the noise level (B,) in [0, 1]; ``grid``:
        the tokens' (h, w) layout, which convolutional heads need; ``cond``: the text embedding
        (B, ``cond_dim``) that text-conditioned heads need."""
        if len(features) != len(self.inp):
            raise ValueError(f"{len(features)} feature maps for {len(self.inp)} heads")
        if (self.cond is not None) != (cond is not None):
            raise ValueError(f"heads with cond_dim {self.config.cond_dim} got "
                             f"{'no' if cond is None else 'a'} text embedding")
        if self.config.kernel_size > 1 and (grid is None or grid[0] * grid[1] != features[0].shape[1]):
            raise ValueError(f"convolutional heads need the token grid (h, w) of {features[0].shape[1]} tokens, "
                             f"got {grid}")
        emb = self.time_embed(self.time_proj(sigma.reshape(-1).float() * 1000.0).to(features[0].dtype))
        emb = nn.functional.silu(emb)
        logits = []
        projections = [None] * len(self.inp) if self.cond is None else [lin(cond.to(emb.dtype)) for lin in self.cond]
        for f, inp, film, out, proj in zip(features, self.inp, self.film, self.out, projections, strict=True):
            scale, shift = film(emb).unsqueeze(1).chunk(2, dim=-1)
            f = self.norm(f)
            if isinstance(inp, nn.Conv2d):  # tokens -> (B, C, h, w) -> conv -> tokens
                b, n, c = f.shape
                f = inp(f.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)
            else:
                f = inp(f)
            h = nn.functional.silu(f * (1 + scale) + shift)
            logit = out(h).squeeze(-1)
            if proj is not None:
                logit = logit + (h * proj.unsqueeze(1)).sum(-1) * h.shape[-1] ** -0.5
            logits.append(logit)
        return logits
