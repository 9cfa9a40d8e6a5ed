"""The SnapGen efficient UNet (paper sec. 3.1, Fig. 2) and its named presets.

One config describes every rung of the Fig. 2 ablation ladder:

====  ====================================================  =========================================
step  change (sec. 3.1)                                      config switch
====  ====================================================  =========================================
(a)   thin SDXL UNet: channels [256, 512, 896],              ``block_channels``, ``transformer_depth``
      transformer blocks [0, 2, 4]
(b)   self-attention only in the lowest-resolution stage     ``self_attention=(False, False, True)``
(c)   every 3x3 conv as a separable conv; in the residual    ``resblock="sepconv"``, ``sepconv_expansion=2``
      blocks expanded: DW 3x3 -> PW C->2C -> PW 2C->C
(d)   FFN expansion 3 (gated) and MQA                        ``ffn_mult=3``, ``attention="mqa"``
(e)   stage 1: cross-attention + FFN transformer blocks      ``first_stage="transformer"``,
      replace the residual blocks (no self-attention)        ``first_stage_layers=1``
(f)   QK RMSNorm and 2D RoPE                                 ``qk_norm=True``, ``rope=True``
====  ====================================================  =========================================

**Reading of sec. 3.1.** ``snapgen bench-device --ablation-ladder`` (params; MACs at a
128x128 latent, 77 CLIP-L tokens), each step against the previous one, paper in brackets:
(b) -1.7% / -16.9% [-17% MACs]; (c) -16.4% [-15%] / -27.7% [-27%]; (d1) -12.6% [-12%] /
-12.0% [-12%]; (d2) -16.1% [-16%] / -5.9% [-6%]; (e) -0.6% / -2.7% ["smaller, faster";
Fig. 3: no metric hurt]; (f) +0.0% / +0.0% ["negligible"]. Every stated figure holds.

* (c) "we replace all Conv layers with SepConv [DW + PW] ... reduces parameters by 24%":
  with both 3x3 convs of every residual block and the samplers' convs as DW + PW we
  measure -23.8%. "The number of channels after the first PW layer is increased with an
  expansion ratio, and reduced back to the original number after the second PW layer":
  each residual-block conv becomes DW -> PW (C -> 2C) -> PW (2C -> C) (``ExpandedSepConv``,
  UIB's ConvNext-like form), 4C^2 weights against SepConv's C^2 and a 3x3 conv's 9C^2, so
  the saving shrinks to about 24% x 10/16 = 15%. The samplers stay plain SepConv (the
  expansion "aligns our residual block with UIB"); ``conv_in``/``conv_out`` stay regular
  (0.1% of the MACs). Rejected, params / MACs: one expanded SepConv per residual block
  (DW -> PW C->2C -> PW 2C->C, the previous reading) -19.4% / -34.0%; UIB's ExtraDW form
  (DW -> PW C->2C -> DW -> PW 2C->C, the two convs' PWs as "first" and "second")
  -19.3% / -34.0%; expansion of the input width (2x a concatenated skip) -12.8% / -19.5%;
  expanded samplers as well -15.7% / -25.4% (fits; the text ties the expansion to the
  residual block).
* (e) "we replace the residual blocks with transformer blocks that include CA and FFN
  while without SA layers. This adjustment makes the model smaller, faster, and more
  efficient": the stage-1 residual blocks give way to CA + FFN blocks on the pixels
  (``blocks.CrossAttnLayer``; a linear layer maps a concatenated skip to the stage width),
  **one per down level and two per up level** instead of SDXL's 2 and 3 residual blocks
  (``first_stage_layers=1``; the up stage keeps one layer more than the down stage, so every
  skip is still consumed, as in diffusers' ``layers_per_block=1``). Why fewer: Fig. 3's
  caption keeps only changes "that improve any of the metrics without hurting others", so
  (e) cannot add FLOPs, yet a CA + FFN block with the FFN sec. 3.1 sets for every
  transformer block (gated, x3) costs ~11.6C^2 MACs a pixel (query and output projections
  2C^2, FFN 9C^2, attention over 77 tokens ~0.6C^2) against 8C^2 for a (c) residual block:
  no one-for-one replacement can be "faster". The text gives no block counts for any
  stage (only transformer depths), so the count is the one free choice that lets every
  stated figure hold. Rejected, params / MACs: one CA + FFN block per residual block
  (2 down, 3 up; this code's earlier reading) -0.1% / +1.6% (more FLOPs); and so a
  timestep projection into each stage-1 layer +0.2% / +1.6%; a non-gated x3 FFN, or a
  gated x2 one, in one-for-one stage-1 blocks -0.4% / -0.9% (fits, but contradicts the FFN
  sec. 3.1 states; the layer count is stated nowhere); measured with the pooled input
  below and one-for-one blocks: SDXL's Transformer2D wrapper (GroupNorm, proj_in,
  proj_out, 1x1 shortcut) +0.1% / +4.0%; CA + FFN blocks in place of the residual blocks
  of every stage +1.5% / +5.4%.
* Conditions enter by cross-attention only (``pooled_conditioning=False`` in the ladder
  and paper-size presets): the residual blocks add a timestep embedding and no pooled text
  vector. (1) Sec. 3.1 (e): SDXL's UNet, with CA only from the second stage, leaves
  "missing conditional guidance for the first stage", which holds only if its stage-1
  residual blocks get no text through their conditioning vector (SDXL adds its pooled
  CLIP-G vector there); (2) sup. H: the class text "can be seamlessly fused by the
  cross-attention layer"; (3) sizes: with SD3's pooled input (CLIP-L + CLIP-G, 2048 wide;
  768 for the ImageNet model) through an MLP to the conditioning vector, the T2I model
  adds 8.6M to the ImageNet one (9.0M with one-for-one stage-1 blocks), against
  379M - 372M = 7M (at most 8M after rounding); without it 7.3M (7.7M). With it the totals
  are 381.9M [+2.7%] and 390.5M [+3.0%] (383.7M, 392.7M); the ladder deltas move by at most
  0.1 point. Rejected (one-for-one blocks): keeping the pooled input with Gemma projected
  to a 2048-wide context instead of SD3's zero-padding to 2304 (T2I - ImageNet 7.7M, but
  T2I 391.4M, +3.3%).
* Totals: ``snapgen-imagenet`` 380.0M [372M: +2.2%], 35.9 GMACs at 256^2 [38G: -5.5%];
  ``snapgen-t2i`` 387.4M [379M: +2.2%]; T2I - ImageNet 7.3M [7M]. (With one-for-one
  stage-1 blocks: 381.8M, 37.6 GMACs, 389.5M; the alternatives below were measured so.)
  372M itself cannot hold
  for the thin SDXL the paper starts from (ours 634.1M; diffusers' ``UNet2DConditionModel``
  so configured, with SDXL's pooled and time-id embedding, 637.5M): from (b)'s 623.6M,
  -15/-12/-16% leave 385.0M before (e) even at their rounding limits, while all
  stage-1 residual blocks hold 5.0M (1.3%). Rejected, ImageNet / T2I, without the pooled
  input: ``time_embed_dim`` other than SDXL's 4x the first stage width (1024):
  1280 (SDXL's own width) 384.7M / 392.4M; 768 379.0M / 386.7M with (e) -0.0%; 512
  376.4M / 384.1M with (e) +0.1%; 256 373.9M / 381.6M with (e) +0.2% (narrower embeddings
  shrink the stage-1 timestep projections that (e) removes, so (e) stops being smaller;
  the paper names no width, SD3 uses its transformer width); a mid-block transformer
  depth of 3 instead of the last stage's 4 (SDXL gives its mid block the last stage's
  depth, 10; sec. 3.1 names only the three stages' [0, 2, 4]): 371.2M / 378.7M, all ladder
  deltas still fit, and 36.9 GMACs, but nothing in the text supports it; depth 2:
  360.5M (-3.1%).

Decisions where the paper is silent (all config keys, documented here once):

* **Layout** follows SDXL: ``layers_per_block=2`` layers per down stage and 3 per up
  stage (stage 1 from step (e) on: ``first_stage_layers=1``, so 1 and 2), a mid block
  (res, transformer, res) at the lowest resolution whose transformer depth equals the last
  stage's, skip connections concatenated.
* **Timestep** (and, with ``pooled_conditioning``, pooled text) enter the SD3 way: a
  sinusoidal timestep embedding (timestep in [0, 1000], i.e. ``sigma * 1000`` for flow
  matching) through an MLP, plus an MLP of the pooled text vector where enabled, summed
  into one conditioning vector that every residual block adds to its features (after
  conv1, as SDXL). The paper-size presets and the ladder leave the pooled vector out (see
  above; the text layout still delivers one, and such a UNet does not read it); the
  ``tiny`` preset keeps it, and so does the class default, so checkpoints saved without the
  key load as they were saved.
* **Text conditioning** (see ``core/text.py``): CLIP-L (768) and CLIP-G (1280)
  penultimate token features are concatenated along channels (2048) and zero-padded
  to Gemma-2-2b's width (2304); the Gemma tokens are appended along the sequence. So
  ``context_dim=2304`` and ``pooled_dim=768+1280=2048`` for ``snapgen-t2i``. The
  ImageNet model uses one CLIP-L text encoder (sup. H): ``context_dim=pooled_dim=768``,
  and an 8-channel autoencoder latent (sup. H), so ``in_channels=8``.
* **Attention** uses 64-channel heads; MQA keeps one 64-channel key/value head.
  RoPE is applied in self-attention only; QK-norm in self- and cross-attention.
* **Stage-1 layers** (step e) hold ``first_stage_depth=1`` block each, ``first_stage_layers``
  of them per down level (one more per up level; ``None``: ``layers_per_block``, as saved
  configs without the key were built); they get no timestep input (the replaced residual
  blocks carried it; the paper's CA + FFN blocks have none).
* **Expanded separable convs** (step c) have a SiLU between their two PWs and no norm.
* **Feature distillation** (sec. 3.3, Eq. 5) reads the output of the last layer
  that contains a transformer (the last one run in the decoder path), returned by
  ``forward(..., return_features=True)``.

Checkpoints saved before the (c)/(e) reading above (residual blocks with one expanded
SepConv, stage-1 ``Transformer2D`` layers) do not load: their ``sepconv`` residual blocks'
shapes differ, and ``from_pretrained`` stops with a size-mismatch error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import CrossAttnLayer, Downsample, ResBlock, Transformer2D, Upsample, attention_bias, group_norm
from .presets import preset_config


@dataclass
class SnapGenUNetOutput(BaseOutput):
    """``sample``: the predicted velocity (flow) or noise (DDPM); ``features``: the last
    transformer layer's feature map (B, C, H, W) when requested, else ``None``."""

    sample: torch.Tensor
    features: torch.Tensor | None = None


class UNetLayer(nn.Module):
    """One UNet layer: a residual block and/or a transformer (SDXL: res -> transformer), or a
    stage-1 cross-attention + FFN layer in the residual block's place (Fig. 2e)."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, *, stage_cfg: dict, transformer_only: bool):
        super().__init__()
        c = stage_cfg
        tkw = dict(head_dim=c["attention_head_dim"], mqa=c["attention"] == "mqa", qk_norm=c["qk_norm"],
                   ffn_mult=c["ffn_mult"], ffn_gated=c["ffn_gated"])
        if transformer_only:
            self.res = None
            self.attn = CrossAttnLayer(in_ch, out_ch, depth, c["context_dim"], **tkw)
        else:
            self.res = ResBlock(in_ch, out_ch, c["time_embed_dim"], c["resblock"], c["sepconv_expansion"])
            self.attn = (Transformer2D(out_ch, depth, c["context_dim"], self_attention=c["self_attention"],
                                       rope=c["rope"], rope_theta=c["rope_theta"], **tkw)
                         if depth > 0 else None)

    def forward(self, x, temb, context, mask):
        if self.res is not None:
            x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x, context, mask)
        return x


class SnapGenUNet(ModelMixin, ConfigMixin):
    """Efficient UNet of SnapGen. See the module docstring for the config switches."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        block_channels: tuple[int, ...] = (256, 512, 896),
        transformer_depth: tuple[int, ...] = (0, 2, 4),
        layers_per_block: int = 2,
        self_attention: tuple[bool, ...] = (False, False, True),
        resblock: str = "sepconv",
        sepconv_expansion: int = 2,
        ffn_mult: float = 3.0,
        ffn_gated: bool = True,
        attention: str = "mqa",
        attention_head_dim: int = 64,
        first_stage: str = "transformer",
        first_stage_depth: int = 1,
        first_stage_layers: int | None = None,
        qk_norm: bool = True,
        rope: bool = True,
        rope_theta: float = 10000.0,
        context_dim: int = 2304,
        pooled_dim: int = 2048,
        pooled_conditioning: bool = True,
        time_embed_dim: int = 1024,
    ):
        super().__init__()
        n = len(block_channels)
        if not (len(transformer_depth) == len(self_attention) == n):
            raise ValueError("block_channels, transformer_depth and self_attention must have the same length")
        if attention not in ("mhsa", "mqa"):
            raise ValueError(f"attention must be 'mhsa' or 'mqa', got {attention!r}")
        if first_stage not in ("resnet", "transformer"):
            raise ValueError(f"first_stage must be 'resnet' or 'transformer', got {first_stage!r}")
        if first_stage_layers is not None and first_stage_layers < 1:
            raise ValueError(f"first_stage_layers must be >= 1 or None, got {first_stage_layers!r}")
        # layers of each down stage (an up stage has one more: SDXL's skip layout)
        stage_layers = [layers_per_block] * n
        if first_stage_layers is not None:
            stage_layers[0] = first_stage_layers
        self.gradient_checkpointing = False
        base = dict(context_dim=context_dim, attention_head_dim=attention_head_dim, attention=attention,
                    qk_norm=qk_norm, rope=rope, rope_theta=rope_theta, ffn_mult=ffn_mult, ffn_gated=ffn_gated,
                    time_embed_dim=time_embed_dim, resblock=resblock, sepconv_expansion=sepconv_expansion)
        stage_cfgs = [dict(base, self_attention=self_attention[i]) for i in range(n)]
        sep = resblock == "sepconv"

        c0 = block_channels[0]
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim)
        self.pooled_embedding = (PixArtAlphaTextProjection(pooled_dim, time_embed_dim, act_fn="silu")
                                 if pooled_conditioning else None)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)

        def make_layer(stage, cin, cout):
            only_t = stage == 0 and first_stage == "transformer"
            depth = first_stage_depth if only_t else transformer_depth[stage]
            return UNetLayer(cin, cout, depth, stage_cfg=stage_cfgs[stage], transformer_only=only_t)

        skip_ch = [c0]
        ch = c0
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, cout in enumerate(block_channels):
            layers = nn.ModuleList()
            for _ in range(stage_layers[i]):
                layers.append(make_layer(i, ch, cout))
                ch = cout
                skip_ch.append(ch)
            self.down.append(layers)
            if i < n - 1:
                self.downsamplers.append(Downsample(ch, sep))
                skip_ch.append(ch)

        mid_cfg = stage_cfgs[-1]
        self.mid = UNetLayer(ch, ch, transformer_depth[-1], stage_cfg=mid_cfg, transformer_only=False)
        self.mid_res = ResBlock(ch, ch, time_embed_dim, resblock, sepconv_expansion)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(n)):
            cout = block_channels[i]
            layers = nn.ModuleList()
            for _ in range(stage_layers[i] + 1):
                layers.append(make_layer(i, ch + skip_ch.pop(), cout))
                ch = cout
            self.up.append(layers)
            if i > 0:
                self.upsamplers.append(Upsample(ch, sep))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def _run(self, module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def conditioning(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                     pooled_projections: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector (B, time_embed_dim) every residual block adds: the sinusoidal
        timestep embedding, computed in fp32 and cast to ``sample``'s dtype, through its MLP,
        plus, with ``pooled_conditioning``, the MLP of the pooled text vector (without it the
        pooled vector is not read; module docstring)."""
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.pooled_embedding is None:
            return temb
        if pooled_projections is None:
            raise ValueError("this UNet adds the pooled text vector (pooled_conditioning): pass pooled_projections")
        return temb + self.pooled_embedding(pooled_projections.to(temb.dtype))

    def stem(self, sample: torch.Tensor) -> torch.Tensor:
        """``conv_in``: the first feature map, the first skip connection."""
        # Channels-last: oneDNN/cuDNN run the (depthwise) convs faster on NHWC, and the
        # transformers' (B, C, H, W) <-> (B, HW, C) reshapes become views (CPU training
        # step of the tiny preset: ~10-20% faster, same numbers to float rounding). Not while
        # exporting: a graph has no strides, and symbolic strides triple torch.export's time.
        if not torch.compiler.is_exporting():
            sample = sample.contiguous(memory_format=torch.channels_last)
        return self.conv_in(sample)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        """GroupNorm, SiLU, ``conv_out``: the prediction from the last feature map."""
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()

    def layer_steps(self) -> list[tuple[str, nn.Module]]:
        """The layers between ``conv_in`` and the output head, in forward order, as ``(kind, module)``:
        ``"down"`` (a layer; its output is pushed as a skip), ``"downsample"`` (output pushed),
        ``"mid"``, ``"mid_res"``, ``"up"`` (the last skip is popped and concatenated to the input
        first), ``"upsample"``. ``forward`` runs them with :meth:`run_step` between :meth:`stem`
        and :meth:`output_head`; the Core ML export cuts this list into chunks (``export/coreml.py``)."""
        steps: list[tuple[str, nn.Module]] = []
        for i, layers in enumerate(self.down):
            steps += [("down", layer) for layer in layers]
            if i < len(self.downsamplers):
                steps.append(("downsample", self.downsamplers[i]))
        steps += [("mid", self.mid), ("mid_res", self.mid_res)]
        for i, layers in enumerate(self.up):
            steps += [("up", layer) for layer in layers]
            if i < len(self.upsamplers):
                steps.append(("upsample", self.upsamplers[i]))
        return steps

    def run_step(self, kind: str, module: nn.Module, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                 mask: torch.Tensor | None, skips: list[torch.Tensor]) -> torch.Tensor:
        """Run one step of :meth:`layer_steps` on ``h``, pushing to / popping from ``skips``."""
        if kind == "up":
            h = self._run(module, torch.cat([h, skips.pop()], dim=1), temb, context, mask)
        elif kind in ("down", "mid"):
            h = self._run(module, h, temb, context, mask)
        elif kind == "mid_res":
            h = module(h, temb)
        else:
            h = module(h)
        if kind in ("down", "downsample"):
            skips.append(h)
        return h

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_features: bool = False,
        return_dict: bool = True,
    ):
        """Predict the flow velocity (or DDPM noise) for ``sample`` (B, C, H, W).

        ``timestep`` is in [0, 1000] (``sigma * 1000`` for flow matching), a scalar or (B,).
        ``encoder_hidden_states`` (B, L, context_dim), ``pooled_projections`` (B, pooled_dim)
        (required with ``pooled_conditioning``, else not read),
        ``encoder_attention_mask`` optional (B, L) bool, True where a token is attended.
        H and W must be divisible by ``2 ** (len(block_channels) - 1)``.
        """
        factor = 2 ** (len(self.config.block_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(f"latent size {tuple(sample.shape[-2:])} must be divisible by {factor}")
        temb = self.conditioning(sample, timestep, pooled_projections)
        ctx, mask = encoder_hidden_states, encoder_attention_mask
        if mask is not None:  # the additive bias every cross-attention adds, made once
            mask = attention_bias(mask, temb.dtype)

        feats = None
        h = self.stem(sample)
        skips = [h]
        for kind, module in self.layer_steps():
            h = self.run_step(kind, module, h, temb, ctx, mask, skips)
            if kind in ("down", "mid", "up") and module.attn is not None:
                feats = h
        out = self.output_head(h)
        feats = feats if return_features else None
        if not return_dict:
            return (out, feats)
        return SnapGenUNetOutput(sample=out, features=feats)


# ----------------------------------------------------------------------------------------
# Presets: the Fig. 2 ladder, the two paper models, and a CPU-sized model for tests/demo.

#: The ladder models are the paper's ImageNet ablation models (sec. 3.1, "Evaluation
#: Metrics"; sup. H): one CLIP-L text encoder (768-wide tokens, through cross-attention
#: only; its pooled vector is not read) and an 8-channel autoencoder; Fig. 3 measures them
#: on a 128x128 latent.
_LADDER_A = dict(
    block_channels=(256, 512, 896), transformer_depth=(0, 2, 4), self_attention=(True, True, True),
    resblock="conv", ffn_mult=4.0, attention="mhsa", first_stage="resnet", qk_norm=False, rope=False,
    in_channels=8, out_channels=8, context_dim=768, pooled_dim=768, pooled_conditioning=False,
)
_STEPS = [
    ("ladder-a", "thin SDXL baseline", {}),
    ("ladder-b", "self-attention only in the lowest-resolution stage", dict(self_attention=(False, False, True))),
    ("ladder-c", "separable convs, expanded in the residual blocks", dict(resblock="sepconv", sepconv_expansion=2)),
    ("ladder-d1", "FFN expansion 4 -> 3 (gated)", dict(ffn_mult=3.0)),
    ("ladder-d2", "MQA instead of MHSA", dict(attention="mqa")),
    ("ladder-e", "stage 1: CA + FFN blocks instead of res blocks", dict(first_stage="transformer",
                                                                          first_stage_layers=1)),
    ("ladder-f", "QK RMSNorm + 2D RoPE", dict(qk_norm=True, rope=True)),
]

#: Paper's stated change of each ladder step against the previous one (sec. 3.1), in %;
#: (e) "smaller, faster, and more efficient" and (f) "negligible" overhead have no number.
PAPER_LADDER_DELTAS: dict[str, dict[str, float]] = {
    "ladder-b": {"macs": -17.0},
    "ladder-c": {"params": -15.0, "macs": -27.0},
    "ladder-d1": {"params": -12.0, "macs": -12.0},
    "ladder-d2": {"params": -16.0, "macs": -6.0},
}

#: What sec. 3.1 states without a number (tests/test_unet.py checks both): (e) "smaller, faster"
#: (Fig. 3 keeps no change that hurts a metric: fewer params and MACs), (f) "negligible" overhead.
PAPER_LADDER_CLAIMS: dict[str, str] = {"ladder-e": "< 0 (smaller, faster)", "ladder-f": "~ 0 (negligible)"}

LADDER: list[tuple[str, str]] = [(name, what) for name, what, _ in _STEPS]

UNET_PRESETS: dict[str, dict] = {}
_cfg: dict = dict(_LADDER_A)
for _name, _what, _change in _STEPS:
    _cfg = {**_cfg, **_change}
    UNET_PRESETS[_name] = dict(_cfg)

UNET_PRESETS["snapgen-imagenet"] = dict(UNET_PRESETS["ladder-f"])
UNET_PRESETS["snapgen-t2i"] = dict(UNET_PRESETS["ladder-f"], in_channels=16, out_channels=16,
                                   context_dim=2304, pooled_dim=2048)
UNET_PRESETS["tiny"] = dict(
    UNET_PRESETS["ladder-f"], block_channels=(32, 64, 128), transformer_depth=(0, 1, 1), layers_per_block=1,
    attention_head_dim=32, context_dim=64, pooled_dim=64, time_embed_dim=128, in_channels=4, out_channels=4,
    pooled_conditioning=True,
)

#: Parameter counts the paper reports for its two models.
PAPER_PARAMS = {"snapgen-t2i": 379e6, "snapgen-imagenet": 372e6}


def unet_config(preset: str, **overrides) -> dict:
    """The config dict of a named preset, with ``overrides`` applied."""
    return preset_config(UNET_PRESETS, "UNet", preset, **overrides)


def build_unet(preset: str = "snapgen-t2i", **overrides) -> SnapGenUNet:
    return SnapGenUNet(**unet_config(preset, **overrides))
