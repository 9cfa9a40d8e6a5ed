"""Apple's neural-engine layout for the SnapGen UNet's transformer layers (Core ML export).

The paper's on-device figures (sec. 3.2, Tab. 2; "Discussion of Total On-Device Latency":
UNet 274 ms per step, decoder 119 ms on an iPhone 16 Pro Max) come from Core ML models
running on the Apple Neural Engine (ANE) through the Swift Core ML Diffusers app (supp. A).
Apple's published recipe for transformers on the ANE (apple/ml-stable-diffusion and
apple/ml-ane-transformers) rewrites each token-sequence layer for the ANE's preferred
layout, and :func:`to_ane_layout` applies it to a SnapGen module before tracing:

* **(B, C, 1, S) layout**: the token stream of a ``Transformer2D`` / ``CrossAttnLayer``
  stays channels-first. The (B, C, H, W) feature map is reshaped to (B, C, 1, H*W) -- no
  transposes -- and every ``nn.Linear`` applied to tokens becomes a 1x1 ``nn.Conv2d``
  holding the same weights (``weight[:, :, None, None]``); the text context (B, L, D) is
  transposed once to (B, D, 1, L).
* **LayerNorm / RMSNorm over the channel axis** (axis 1 for LayerNorm, the head-dim axis for
  the QK RMSNorm of Fig. 2f), written out as mean / variance / rsqrt, the ANE-friendly form.
* **Attention implementation** (``attention``), Apple's two choices:

  - ``"split_einsum"`` for the ANE: every head is a separate pair of einsums on 4-D
    tensors (``bchq,bkhc->bkhq``, softmax over the key axis, ``bkhq,bchk->bchq``),
    concatenated along channels; MQA's single key/value head is shared by all of them;
  - ``"split_einsum_v2"``: split_einsum with each head's queries cut into chunks of 512
    tokens (``QUERY_CHUNK``; the last chunk takes the rest), which bounds the (keys x
    queries) weight tensors of long sequences (stage-1 cross-attention at 1024^2: 16384
    queries); identical to split_einsum below 512 queries, as Apple's;
  - ``"original"`` for the GPU: all heads in one batched matmul.

Decisions:

* Only layers that act on token sequences are rewritten: the transformer layers
  (``Transformer2D``, ``CrossAttnLayer`` and the blocks inside). The ``nn.Linear`` layers on
  the (B, C) conditioning vectors (timestep / pooled-text MLPs, each residual block's
  ``time_proj``) stay linear layers: they see one vector per sample, there is no sequence
  layout to change. Convolutions (the residual blocks, the whole tiny decoder) are already
  in the ANE's layout, so the decoder is returned unchanged.
* A masked key gets the additive bias -1e4 before the softmax (Apple's SD attention masks),
  not -inf: ``exp(-1e4)`` is exactly 0 in fp16 and fp32, and there is no ``inf`` arithmetic
  on the ANE. SnapGen never masks a whole row (``core/text.py``), so the two are equal.
* RoPE (Fig. 2f) is applied on the head-dim axis with the tables of the original layer,
  transposed to (head_dim, S).

The rewrite is exact up to float rounding: ``to_ane_layout(m)(x) == m(x)`` at >= 60 dB
PSNR in fp32 (tests/test_coreml.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import Attention, CrossAttnLayer, FeedForward, Transformer2D, TransformerBlock

#: Apple's attention implementations: "split_einsum[_v2]" (neural engine), "original" (GPU).
ATTENTION_IMPLEMENTATIONS = ("original", "split_einsum", "split_einsum_v2")
#: Queries per chunk of "split_einsum_v2" (Apple's CHUNK_SIZE).
QUERY_CHUNK = 512

#: Additive attention bias of a masked key (see the module docstring).
MASK_BIAS = -1e4


def linear_to_conv(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 conv computing ``linear`` on a (B, C, 1, S) tensor (same weights, copied)."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _to_conv(module: nn.Module) -> nn.Module:
    return linear_to_conv(module) if isinstance(module, nn.Linear) else module


class ChannelLayerNorm(nn.Module):
    """``nn.LayerNorm`` over axis 1 of a (B, C, 1, S) tensor."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone()) if norm.weight is not None else None
        self.bias = nn.Parameter(norm.bias.detach().clone()) if norm.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        out = centred * torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class HeadRMSNorm(nn.Module):
    """``nn.RMSNorm(head_dim)`` over axis 2 of a (B, heads, head_dim, S) tensor (QK norm)."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = nn.Parameter(norm.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(dim=2, keepdim=True) + self.eps) * self.weight.view(1, 1, -1, 1)


def _rope_channels_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``core.blocks.apply_rope`` on (B, heads, D, S) with (D, S) tables: interleaved channel
    pairs (x0, x1) rotate to (x0 cos - x1 sin, x1 cos + x0 sin)."""
    b, h, d, s = x.shape
    pairs = x.reshape(b, h, d // 2, 2, s)
    rotated = torch.stack((-pairs[:, :, :, 1], pairs[:, :, :, 0]), dim=3).reshape(b, h, d, s)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class ANEAttention(nn.Module):
    """:class:`~snapgen_cli.core.blocks.Attention` on the (B, C, 1, S) layout."""

    def __init__(self, attn: Attention, implementation: str):
        super().__init__()
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {implementation!r}: expected one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.implementation = implementation
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.to_q, self.to_k = linear_to_conv(attn.to_q), linear_to_conv(attn.to_k)
        self.to_v, self.to_out = linear_to_conv(attn.to_v), linear_to_conv(attn.to_out)
        self.norm_q = HeadRMSNorm(attn.norm_q) if attn.norm_q is not None else None
        self.norm_k = HeadRMSNorm(attn.norm_k) if attn.norm_k is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` (B, C, 1, S); ``context`` (B, D, 1, L) or None (self-attention); ``mask`` (B, L)
        bool, True where attended, or the UNet's (B, 1, 1, L) 0 / -inf bias; ``rope`` (cos, sin) tables of shape (head_dim, S)."""
        b, c, _, s = x.shape
        ctx = x if context is None else context
        n_k = ctx.shape[3]
        q = self.to_q(x).reshape(b, self.heads, self.head_dim, s)
        k = self.to_k(ctx).reshape(b, self.kv_heads, self.head_dim, n_k)
        v = self.to_v(ctx).reshape(b, self.kv_heads, self.head_dim, n_k)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = _rope_channels_first(q, *rope), _rope_channels_first(k, *rope)
        q = q * self.head_dim**-0.5
        if mask is not None and mask.ndim == 4:  # the UNet's (B, 1, 1, L) additive bias (core.blocks.attention_bias)
            mask = mask.reshape(b, -1) == 0
        bias = None if mask is None else (~mask.bool()).to(q.dtype) * MASK_BIAS  # (B, L): finite, as the ANE needs
        if self.implementation == "original":
            weights = torch.matmul(q.transpose(2, 3), k)  # (B, heads, S, L); one K/V head broadcasts
            if bias is not None:
                weights = weights + bias[:, None, None, :]
            out = torch.matmul(v, weights.softmax(dim=-1).transpose(2, 3))  # (B, heads, D, S)
            out = out.reshape(b, c, 1, s)
        else:
            k_t = k.permute(0, 3, 1, 2)  # (B, L, kv_heads, D): the key axis first, as the einsum wants
            chunk = QUERY_CHUNK if self.implementation == "split_einsum_v2" else s
            heads = []
            for i in range(self.heads):
                j = i if self.kv_heads > 1 else 0
                ki = k_t[:, :, j : j + 1]  # (B, L, 1, D)
                vi = v[:, j].unsqueeze(2)  # (B, D, 1, L)
                qh = q[:, i].unsqueeze(2)  # (B, D, 1, S)
                parts = []
                # static slices, not torch.split (coremltools cannot convert a split longer than the axis)
                for qi in [qh] if s <= chunk else [qh[..., a : a + chunk] for a in range(0, s, chunk)]:
                    w = torch.einsum("bchq,bkhc->bkhq", qi, ki)  # (B, L, 1, queries)
                    if bias is not None:
                        w = w + bias[:, :, None, None]
                    parts.append(torch.einsum("bkhq,bchk->bchq", w.softmax(dim=1), vi))  # (B, D, 1, queries)
                heads.append(torch.cat(parts, dim=3) if len(parts) > 1 else parts[0])
            out = torch.cat(heads, dim=1)
        return self.to_out(out)


class ANEFeedForward(nn.Module):
    """:class:`~snapgen_cli.core.blocks.FeedForward` with 1x1 convs (gate on the channel axis)."""

    def __init__(self, ff: FeedForward):
        super().__init__()
        self.gated = ff.gated
        self.proj_in, self.proj_out = linear_to_conv(ff.proj_in), linear_to_conv(ff.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.gated:
            h, gate = h.chunk(2, dim=1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(h)


class ANETransformerBlock(nn.Module):
    """:class:`~snapgen_cli.core.blocks.TransformerBlock` on the (B, C, 1, S) layout."""

    def __init__(self, block: TransformerBlock, implementation: str):
        super().__init__()
        self.norm1 = ChannelLayerNorm(block.norm1) if block.norm1 is not None else None
        self.attn1 = ANEAttention(block.attn1, implementation) if block.attn1 is not None else None
        self.norm2, self.norm3 = ChannelLayerNorm(block.norm2), ChannelLayerNorm(block.norm3)
        self.attn2 = ANEAttention(block.attn2, implementation)
        self.ff = ANEFeedForward(block.ff)

    def forward(self, x, context, mask=None, rope=None):
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x), rope=rope)
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


def _context_channels_first(context: torch.Tensor) -> torch.Tensor:
    """Text tokens (B, L, D) -> (B, D, 1, L)."""
    return context.transpose(1, 2).unsqueeze(2)


class ANETransformer2D(nn.Module):
    """:class:`~snapgen_cli.core.blocks.Transformer2D` without the token transposes."""

    def __init__(self, layer: Transformer2D, implementation: str):
        super().__init__()
        self.norm = layer.norm
        self.proj_in, self.proj_out = linear_to_conv(layer.proj_in), linear_to_conv(layer.proj_out)
        self.blocks = nn.ModuleList(ANETransformerBlock(b, implementation) for b in layer.blocks)
        self.use_rope, self.head_dim, self.rope_theta = layer.use_rope, layer.head_dim, layer.rope_theta
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
        b, c, h, w = x.shape
        rope = None
        if self.use_rope:
            cos, sin = Transformer2D._rope(self, h, w, x.device)  # the same tables (and cache) as the layer's
            rope = (cos.t(), sin.t())
        t = self.proj_in(self.norm(x).reshape(b, c, 1, h * w))
        ctx = _context_channels_first(context)
        for block in self.blocks:
            t = block(t, ctx, mask, rope)
        return x + self.proj_out(t).reshape(b, c, h, w)


class ANECrossAttnLayer(nn.Module):
    """:class:`~snapgen_cli.core.blocks.CrossAttnLayer` (Fig. 2e) on the (B, C, 1, S) layout."""

    def __init__(self, layer: CrossAttnLayer, implementation: str):
        super().__init__()
        self.proj = _to_conv(layer.proj)
        self.blocks = nn.ModuleList(ANETransformerBlock(b, implementation) for b in layer.blocks)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
        b, c, h, w = x.shape
        t = self.proj(x.reshape(b, c, 1, h * w))
        ctx = _context_channels_first(context)
        for block in self.blocks:
            t = block(t, ctx, mask)
        return t.reshape(b, -1, h, w)


_REWRITES = {Transformer2D: ANETransformer2D, CrossAttnLayer: ANECrossAttnLayer}


def to_ane_layout(module: nn.Module, attention: str = "split_einsum") -> nn.Module:
    """A copy of ``module`` whose transformer layers run on Apple's (B, C, 1, S) layout with the
    ``attention`` implementation ("split_einsum" / "split_einsum_v2" for the neural engine,
    "original" for the GPU); ``module`` itself is left unchanged. Same inputs, same outputs."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if type(module) in _REWRITES:
        return _REWRITES[type(module)](module, attention)
    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _REWRITES:
                setattr(parent, name, _REWRITES[type(child)](child, attention))
    return out
