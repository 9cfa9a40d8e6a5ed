"""Building blocks of the efficient UNet (paper sec. 3.1, Fig. 2).

Each block implements one rung of the ablation ladder behind a switch, so the
same code builds the thin SDXL baseline (Fig. 2a) and the final SnapGen UNet
(Fig. 2f):

* ``ResBlock``         -- regular 3x3 conv residual block (SDXL) or the Fig. 2c block whose
                           two 3x3 convs are each an *expanded separable conv*
                           (``ExpandedSepConv``: DW 3x3 -> PW to ``e*C`` -> PW back to ``C``),
                           MobileNetV4's Universal Inverted Bottleneck in its ConvNext-like form.
* ``Attention``        -- multi-head or multi-query attention (Fig. 2d, MQA [65]),
                           optional QK RMSNorm and 2D RoPE (Fig. 2f).
* ``FeedForward``      -- gated (GEGLU) FFN with a configurable expansion (4 -> 3, Fig. 2d).
* ``TransformerBlock`` -- [self-attention] + cross-attention + FFN; Fig. 2b drops the
                           self-attention outside the lowest-resolution stage.
* ``CrossAttnLayer``   -- Fig. 2e: a stage-1 layer made of cross-attention + FFN transformer
                           blocks (no self-attention) in place of the residual block.

CPU training speed (``benchmarks/bench_train_step.py``): the tiny UNet spends most of its
MACs in small GEMMs and runs many more small kernels than an SDXL-style UNet of its size
(QK RMSNorm, RoPE, GEGLU, MQA). Without changing the function, the blocks cut kernels where
the same numbers can be had with fewer: one GEMM for projections of the same input, MQA
without the K/V broadcast, the attention mask's bias made once, RMSNorm with a fused CPU
backward, GEGLU halves as two GEMMs, explicit padding for depthwise convs on tiny maps.
``tests/test_blocks_speed.py`` checks each against the plain formulation.
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


class DepthwiseConv2d(nn.Conv2d):
    """3x3 depthwise convolution (padding 1), the DW half of a separable conv [30].

    On CPU, a map of at most 2x2 (the tiny UNet's lowest stage) is zero-padded explicitly and
    convolved unpadded: the same numbers (the padding is zeros either way), but oneDNN's
    padded depthwise backward is slow on such maps. Measured (torch 2.14, oneDNN 3.12, one
    AMD EPYC core; forward + backward, batch 32, channels_last, 32-256 channels): 2x2 maps
    1.0-2.6x and 1x1 maps 1.6-5.2x faster this way; from 3x3 up the padded kernel is faster."""

    def __init__(self, ch: int, stride: int = 1):
        super().__init__(ch, ch, 3, stride=stride, padding=1, groups=ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and min(x.shape[-2:]) <= 2:
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return super().forward(x)


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution; while training, a GEMM over channels-last pixels (``_training_kernels``)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)

    def channels_last(self, h: torch.Tensor) -> torch.Tensor:
        """The same map on channels-last pixels (..., C_in) -> (..., C_out): one GEMM."""
        return F.linear(h, self.weight.flatten(1), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _training_kernels(self):
            return super().forward(x)
        return self.channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv(in_ch: int, out_ch: int, *, separable: bool, stride: int = 1) -> nn.Module:
    """A 3x3 convolution; ``separable`` makes it depthwise 3x3 + pointwise 1x1 [30]."""
    if not separable:
        return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
    return nn.Sequential(DepthwiseConv2d(in_ch, stride), PointwiseConv2d(in_ch, out_ch))


class ExpandedSepConv(nn.Sequential):
    """Fig. 2c "expanded separable conv", the replacement of one 3x3 conv: DW 3x3 on the
    input, PW to ``expansion * out_ch`` ("the number of channels after the first PW layer
    is increased with an expansion ratio"), SiLU, PW back to ``out_ch`` ("reduced back to
    the original number after the second PW layer"). The activation between the two
    PWs (UIB [58] has one there) keeps them from collapsing into one linear map; UIB's
    BatchNorm is left out (the residual block keeps SDXL's GroupNorms)."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int = 2):
        hidden = expansion * out_ch
        super().__init__(DepthwiseConv2d(in_ch), PointwiseConv2d(in_ch, hidden),
                         nn.SiLU(), PointwiseConv2d(hidden, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _training_kernels(self):
            return super().forward(x)
        dw, pw1, act, pw2 = self  # the two PWs as GEMMs with one permute each way (see _training_kernels)
        return pw2.channels_last(act(pw1.channels_last(dw(x).permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning: GN-SiLU-conv1, + time, GN-SiLU-conv2, plus
    the input (through a 1x1 conv where the channels change), as SDXL's.

    ``kind="conv"``: conv1/conv2 are regular 3x3 convs (SDXL). ``kind="sepconv"`` (Fig. 2c):
    each is an :class:`ExpandedSepConv` with ``expansion`` 2 (sec. 3.1, "we replace all
    Conv layers with [expanded] SepConv"), ~4C^2 weights each against a 3x3 conv's 9C^2.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, kind: str = "conv", expansion: int = 2):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        if kind == "conv":
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        elif kind == "sepconv":
            self.conv1 = ExpandedSepConv(in_ch, out_ch, expansion)
            self.conv2 = ExpandedSepConv(out_ch, out_ch, expansion)
        else:
            raise ValueError(f"unknown resblock kind {kind!r}; expected 'conv' or 'sepconv'")
        self.time_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.shortcut = PointwiseConv2d(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

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
    # Broadcast products, not torch.outer: the same float32 numbers, and coremltools (which
    # reads a traced float ``arange`` as int32) can convert a broadcast ``mul`` but not ``outer``.
    ang_r = (rows[:, None] * freqs)[:, None, :].expand(height, width, quarter)
    ang_c = (cols[:, None] * freqs)[None, :, :].expand(height, width, quarter)
    ang = torch.cat([ang_r, ang_c], dim=-1).reshape(height * width, 2 * quarter)
    ang = ang.repeat_interleave(2, dim=-1)  # one angle per interleaved channel pair
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, heads, N, D) by the RoPE tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim with a fused backward: torch's CPU ``rms_norm`` is a composite
    (pow, mean, add, rsqrt, mul, mul) whose autograd graph runs about a dozen kernels backward;
    CUDA has a fused ``_fused_rms_norm_backward``, CPU has none. The forward is the same
    composite (bitwise the same output); the backward is the closed form torch's CUDA kernel
    computes, ``gx = rstd * (g w - x_hat * mean(g w * x_hat))``, ``gw = sum(g * x_hat)``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_w = (grad * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        g = grad * weight
        grad_x = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, norm: nn.Module) -> torch.Tensor:
    """RMSNorm over the last dim: :class:`_RMSNormFunction` on the CPU training path (grad
    enabled, float32/64 input of the weight's dtype), else ``norm(x)`` -- the module itself
    (inference, other devices, whose kernels are fused, float16/bfloat16)."""
    if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and weight is not None and eps is not None and x.dtype == weight.dtype):
        return _RMSNormFunction.apply(x, weight, eps)
    return norm(x)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dim (same parameters and state dict) whose CPU training
    path uses :class:`_RMSNormFunction`'s fused backward (:func:`rms_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, super().forward)


def _training_kernels(module: nn.Module) -> bool:
    """Whether ``module`` runs the CPU training formulations (projections that share an input
    as one GEMM on concatenated weights, GEGLU's halves as two GEMMs, an expanded SepConv's two
    1x1 convs as GEMMs over channels-last pixels: 2-2.5x faster forward + backward than oneDNN's
    1x1 convs on the tiny UNet's 2x2-8x8 maps, measured): in training mode, not
    while tracing or exporting. Both compute the same products up to float summation order
    (~1e-7), but not batch-invariantly: with them, an image sampled in a batch of 4 and again in
    a batch of 2 differed by one 8-bit level, which breaks the eval stage's resume (regenerated
    images must equal the first run's). A model in eval mode (every pipeline), tracing and export
    therefore use one nn.Linear per layer, and an exported graph holds each layer's own weight
    (Core ML palettizes per weight). Keyed on the mode, not on grad mode, so a training model
    computes the same numbers with and without gradients (step-distill's discriminator phase)."""
    return module.training and not torch.jit.is_tracing() and not torch.compiler.is_exporting()


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
        self.norm_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``mask``: (B, L) bool, True where a context token is attended, or the additive bias
        :func:`attention_bias` made of it once for all layers (what ``SnapGenUNet`` passes)."""
        b, n, _ = x.shape
        d, kv = self.head_dim, self.kv_heads * self.head_dim
        # One GEMM for the projections that read the same input (their weights concatenated;
        # the same products as three nn.Linear calls, a third of the per-call overhead); one
        # nn.Linear each in inference, tracing and export (_training_kernels).
        fused = _training_kernels(self)
        if context is None and fused:
            q, k, v = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])).split(
                [self.heads * d, kv, kv], dim=-1)
        elif fused:
            q = self.to_q(x)
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).split([kv, kv], dim=-1)
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        # (B, tokens, heads, D): QK RMSNorm over each head's channels, RoPE by token.
        q, k, v = q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        bias = None if mask is None else attention_bias(mask, q.dtype)
        if self.kv_heads == 1:
            # MQA: every query head attends to the one K/V head, so the heads fold into the query
            # sequence, (B, 1, tokens * heads, D) against (B, 1, L, D): the rows of broadcasting
            # K/V to every head, without the broadcast (or its gradient's sum over heads).
            out = F.scaled_dot_product_attention(q.reshape(b, 1, -1, d), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=bias)
            return self.to_out(out.reshape(b, n, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, 1, 1, L) attention bias of a (B, L) key mask (True or 1: attended):
    0 or -inf, what ``scaled_dot_product_attention`` builds from a boolean mask. A 4-D bias
    already made is returned as is (in ``dtype``): ``SnapGenUNet`` makes it once per forward
    instead of every cross-attention layer converting the mask again."""
    if mask.ndim == 4:
        return mask.to(dtype)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask.bool(), float("-inf"))
    return bias[:, None, None]


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
        if not self.gated:
            return self.proj_out(F.gelu(self.proj_in(x)))
        # GEGLU: value and gate halves of proj_in as two GEMMs (the same products as one GEMM
        # and a chunk), so the gate's GELU and the product run on contiguous tensors and the
        # backward needs no concatenation (the tiny UNet's FFNs on one CPU core: 3-20% faster
        # forward + backward).
        # Inference, tracing and export: one GEMM and a chunk (_training_kernels).
        if not _training_kernels(self):
            value, gate = self.proj_in(x).chunk(2, dim=-1)
            return self.proj_out(value * F.gelu(gate))
        w, b = self.proj_in.weight, self.proj_in.bias
        n = w.shape[0] // 2
        return self.proj_out(F.linear(x, w[:n], b[:n]) * F.gelu(F.linear(x, w[n:], b[n:])))


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
    """GN -> linear in -> blocks -> linear out, with a residual around it (SDXL layout)."""

    def __init__(self, dim: int, depth: int, context_dim: int, *, self_attention: bool,
                 head_dim: int, mqa: bool, qk_norm: bool, rope: bool, rope_theta: float,
                 ffn_mult: float, ffn_gated: bool):
        super().__init__()
        self.norm = group_norm(dim)
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, context_dim, self_attention=self_attention, head_dim=head_dim, mqa=mqa,
                             qk_norm=qk_norm, ffn_mult=ffn_mult, ffn_gated=ffn_gated)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.use_rope = rope and self_attention
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per (h, w, device); not state

    def _rope(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # A compiled graph computes the small tables itself (the same numbers): filling the cache
            # from inside the graph would change its guards and recompile the whole model on the next call.
            return rope_2d(h, w, self.head_dim, self.rope_theta, device)
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
        return x + self.proj_out(t).transpose(1, 2).reshape(b, -1, h, w)


class CrossAttnLayer(nn.Module):
    """A stage-1 layer of Fig. 2e: ``depth`` transformer blocks with cross-attention and FFN
    and no self-attention, in the place of a residual block (sec. 3.1, "we replace the
    residual blocks with transformer blocks that include CA and FFN while without SA
    layers"), run on the feature map's pixels as tokens. Where a skip connection makes
    ``in_ch != dim``, a linear layer maps the concatenated channels to ``dim`` first (the
    replaced block's conv1 and 1x1 shortcut did the channel change). No GroupNorm /
    proj_in / proj_out wrapper as in ``Transformer2D``: the blocks are pre-norm residual
    blocks themselves, and the wrapper would add 2C^2 MACs a pixel at full resolution
    (core/unet.py's docstring has the figures).
    """

    def __init__(self, in_ch: int, dim: int, depth: int, context_dim: int, *, head_dim: int, mqa: bool,
                 qk_norm: bool, ffn_mult: float, ffn_gated: bool):
        super().__init__()
        self.proj = nn.Linear(in_ch, dim) if in_ch != dim else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, context_dim, self_attention=False, head_dim=head_dim, mqa=mqa,
                             qk_norm=qk_norm, ffn_mult=ffn_mult, ffn_gated=ffn_gated)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
        b, _, h, w = x.shape
        t = self.proj(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            t = block(t, context, mask)
        return t.transpose(1, 2).reshape(b, -1, h, w)


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
