"""Building blocks of the efficient UNet (paper sec. 3.1, Fig. 2).

Each block implements one rung of the ablation ladder behind a switch, so the
same code builds the thin SDXL baseline (Fig. 2a) and the final SnapGen UNet
(Fig. 2f):

* ``ResBlock``         -- regular 3x3 conv residual block (SDXL) or the *expanded
                           separable* block of Fig. 2c (DW 3x3 -> PW to ``e*C`` -> PW back),
                           which mirrors MobileNetV4's Universal Inverted Bottleneck.
* ``Attention``        -- multi-head or multi-query attention (Fig. 2d, MQA [65]),
                           optional QK RMSNorm and 2D RoPE (Fig. 2f).
* ``FeedForward``      -- gated (GEGLU) FFN with a configurable expansion (4 -> 3, Fig. 2d).
* ``TransformerBlock`` -- [self-attention] + cross-attention + FFN; Fig. 2b drops the
                           self-attention outside the lowest-resolution stage and Fig. 2e
                           uses cross-attention + FFN blocks (no self-attention) in stage 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels`` and keeps
    at least 4 channels per group (so a 1x1 feature map of a small model still normalises)."""
    g = math.gcd(channels, max(1, min(groups, channels // 4)))
    return nn.GroupNorm(g, channels, eps=1e-6)


def conv(in_ch: int, out_ch: int, *, separable: bool, stride: int = 1) -> nn.Module:
    """A 3x3 convolution; ``separable`` makes it depthwise 3x3 + pointwise 1x1 [30]."""
    if not separable:
        return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch),
        nn.Conv2d(in_ch, out_ch, 1),
    )


class ResBlock(nn.Module):
    """Residual block with timestep conditioning.

    ``kind="conv"`` is the SDXL block: GN-SiLU-Conv3x3, + time, GN-SiLU-Conv3x3.
    ``kind="sepconv"`` is Fig. 2c: GN-SiLU-DW3x3-PW(C_in -> e*C_out), + time,
    GN-SiLU-PW(e*C_out -> C_out): the first pointwise conv expands the channels by
    ``expansion`` and the second brings them back (sec. 3.1, "expand the intermediate
    channels ... ratio is set to 2").
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, kind: str = "conv", expansion: int = 2):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        if kind == "conv":
            mid = out_ch
            self.conv1 = nn.Conv2d(in_ch, mid, 3, padding=1)
            self.conv2 = nn.Conv2d(mid, out_ch, 3, padding=1)
        elif kind == "sepconv":
            mid = out_ch * expansion
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch), nn.Conv2d(in_ch, mid, 1)
            )
            self.conv2 = nn.Conv2d(mid, out_ch, 1)
        else:
            raise ValueError(f"unknown resblock kind {kind!r}; expected 'conv' or 'sepconv'")
        self.time_proj = nn.Linear(temb_dim, mid)
        self.norm2 = group_norm(mid)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


def rope_2d(height: int, width: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary embedding tables (cos, sin), each ``(height*width, head_dim)``.

    RoPE [68] extended to two axes (sec. 3.1, Fig. 2f): the first half of each head's
    channels rotates with the row index, the second half with the column index.
    Channel pairs are interleaved (x0, x1), (x2, x3), ... as in the original RoPE.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    ang_r = torch.outer(rows, freqs)[:, None, :].expand(height, width, quarter)
    ang_c = torch.outer(cols, freqs)[None, :, :].expand(height, width, quarter)
    ang = torch.cat([ang_r, ang_c], dim=-1).reshape(height * width, 2 * quarter)
    ang = ang.repeat_interleave(2, dim=-1)  # one angle per interleaved channel pair
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, heads, N, D) by the RoPE tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Self- or cross-attention.

    * ``mqa``: multi-query attention [65] -- one key/value head shared by all query heads
      (sec. 3.1, "Replace MHSA with MQA").
    * ``qk_norm``: RMSNorm [84] on queries and keys after their projections (Fig. 2f).
    * RoPE is applied when ``forward`` receives the tables (self-attention only; a
      cross-attention key is a text token and has no 2D position).
    """

    def __init__(self, dim: int, context_dim: int | None = None, head_dim: int = 64,
                 mqa: bool = False, qk_norm: bool = False):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention dim {dim} is not a multiple of head dim {head_dim}")
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.kv_heads = 1 if mqa else self.heads
        kv_in = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_in, self.kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(kv_in, self.kv_heads * head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        b, n, _ = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_heads != self.heads:  # MQA: broadcast the single K/V head (a view, no copy)
            k = k.expand(b, self.heads, -1, -1)
            v = v.expand(b, self.heads, -1, -1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """FFN with hidden width ``mult * dim``; ``gated`` adds a GELU gate (GEGLU), which
    doubles the first projection (sec. 3.1, "Trim FFN Layers")."""

    def __init__(self, dim: int, mult: float = 4, gated: bool = True):
        super().__init__()
        hidden = int(dim * mult)
        self.gated = gated
        self.proj_in = nn.Linear(dim, hidden * (2 if gated else 1))
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(h)


class TransformerBlock(nn.Module):
    """Pre-norm block: [self-attention] -> cross-attention -> FFN."""

    def __init__(self, dim: int, context_dim: int, *, self_attention: bool, head_dim: int,
                 mqa: bool, qk_norm: bool, ffn_mult: float, ffn_gated: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = Attention(dim, None, head_dim, mqa, qk_norm) if self_attention else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, head_dim, mqa, qk_norm)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_mult, ffn_gated)

    def forward(self, x, context, mask=None, rope=None):
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x), rope=rope)
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GN -> linear in -> blocks -> linear out, with a residual around it (SDXL layout).

    When ``in_ch != dim`` (a stage-1 transformer layer of Fig. 2e that replaces a
    residual block and receives a skip connection) a 1x1 projection carries the
    residual, the way a residual block's shortcut does.
    """

    def __init__(self, in_ch: int, dim: int, depth: int, context_dim: int, *, self_attention: bool,
                 head_dim: int, mqa: bool, qk_norm: bool, rope: bool, rope_theta: float,
                 ffn_mult: float, ffn_gated: bool):
        super().__init__()
        self.norm = group_norm(in_ch)
        self.proj_in = nn.Linear(in_ch, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, context_dim, self_attention=self_attention, head_dim=head_dim, mqa=mqa,
                             qk_norm=qk_norm, ffn_mult=ffn_mult, ffn_gated=ffn_gated)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.shortcut = nn.Conv2d(in_ch, dim, 1) if in_ch != dim else nn.Identity()
        self.use_rope = rope and self_attention
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per (h, w, device); not state

    def _rope(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, device)
        if key not in self._rope_tables:
            with torch.inference_mode(False):  # a table cached under inference mode could not enter autograd later
                self._rope_tables[key] = rope_2d(h, w, self.head_dim, self.rope_theta, device)
        return self._rope_tables[key]

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
        b, _, h, w = x.shape
        rope = self._rope(h, w, x.device) if self.use_rope else None
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            t = block(t, context, mask, rope)
        t = self.proj_out(t).transpose(1, 2).reshape(b, -1, h, w)
        return self.shortcut(x) + t


class Downsample(nn.Module):
    def __init__(self, ch: int, separable: bool):
        super().__init__()
        self.conv = conv(ch, ch, separable=separable, stride=2)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, separable: bool):
        super().__init__()
        self.conv = conv(ch, ch, separable=separable)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
