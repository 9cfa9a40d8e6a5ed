"""Export wrappers: each model of a saved :class:`~snapgen_cli.core.pipeline.SnapGenPipeline`
as an ``nn.Module`` with fixed, named tensor inputs and outputs (issue 15; paper sec. 3.2,
"Discussion of Total On-Device Latency": the UNet, the tiny decoder and the text encoders run
on the device, the sampler loop and the tokenizer around them).

==============  ============================================================  =====================
model           inputs (fp32 unless noted)                                    outputs (fp32)
==============  ============================================================  =====================
``unet``        ``sample`` (B, C, h, w), ``timestep`` (B,) = sigma * 1000,    ``velocity`` (B, C, h, w)
                ``encoder_hidden_states`` (B, L, D), ``pooled_projections``
                (B, P) [, ``encoder_attention_mask`` (B, L), 1 = attended]
``decoder``     ``latents`` (B, C, h, w): the *normalised* latents the          ``image`` (B, 3, 8h, 8w)
                sampler returns                                               in [0, 1]
``text.<name>`` ``input_ids``, ``attention_mask`` (B, max_length) int64,      ``tokens`` (B, L, W),
                from :func:`core.text.tokenize`                               ``mask`` (B, L) 1/0
                                                                              [, ``pooled`` (B, P)]
==============  ============================================================  =====================

Decisions:

* **Every wrapper computes exactly what the pipeline computes** (``core.denoiser.denoise``,
  ``core.decoder.latents_to_images``, ``_Encoder.features``), tested at >= 60 dB (in fact
  bit-identical on CPU). The decoder folds the latent space's ``1 / scaling_factor`` and
  ``shift_factor`` and the [-1, 1] -> [0, 1] mapping in, so a runtime feeds it the sampler's
  output as is. The combination of the encoders' features (``core.text.combine``, SD3's way)
  stays outside: it is slicing and zero padding, and keeping it out lets a runtime use any
  subset of the encoders (sec. 4, "Model Details").
* **The attention mask** is an input only where the UNet needs it: a SnapGen UNet whose text
  stack has an encoder with ``padding="mask"``. It is float (Core ML takes no bool inputs) and
  becomes ``mask > 0.5`` inside. An SD3 DiT takes none (SD3 attends to every token).
* **RoPE from precomputed float tables** (sec. 3.1, Fig. 2f). The UNet computes its 2D RoPE
  tables from integer positions (``core.blocks.rope_2d``); Core ML's converter fails on that
  graph (an int32 ``matmul``) and ``torch.export`` cannot key the UNet's per-size table cache
  with symbolic sizes. The wrapper therefore computes each table once, for the largest latent
  it accepts, with the same ``rope_2d``, and hands every ``Transformer2D`` the top-left
  ``h x w`` slice: the angle of a position does not depend on the table's size, so the slice
  equals ``rope_2d(h, w)`` bit for bit (tested). Installing the tables replaces the wrapped
  UNet's ``Transformer2D._rope`` methods (the model keeps computing the same numbers).
* **Dynamic axes** (ONNX): batch and, for the UNet and the decoder, the latent height and width
  up to the export resolution (the RoPE tables' size); multiples of the UNet's downsampling
  factor. Core ML gets fixed shapes (``example_inputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..core.blocks import Transformer2D, rope_2d
from ..core.decoder import latents_to_images
from ..core.denoiser import denoise, is_dit
from ..core.measure import count_params
from ..core.text import tokenize

#: Prompts the text encoders' parity inputs are tokenized from (cycled to the batch size): the
#: empty prompt (CFG's all-padding row), a short and a long one (truncated at 16 tokens and up).
PARITY_PROMPTS = ("a photo of a red circle left of a blue square", "",
                  "a tiger wearing a tuxedo, colour photo of a corgi made of transparent glass standing on the "
                  "riverside in Yosemite National Park, golden hour, highly detailed")


@dataclass
class Exportable:
    """One model ready for export: the wrapper, its tensor names and how to make its inputs.

    ``make_inputs(batch, resolution, seed)`` gives fixed seeded inputs (image ``resolution`` in
    pixels; the text encoders ignore it); ``dynamic_shapes(max_resolution)`` gives
    ``torch.export`` dims, one dict per input (``None`` for no dynamic axis)."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[[int, int, int], tuple[torch.Tensor, ...]]
    dynamic_shapes: Callable[[int], tuple]
    params: int
    meta: dict = field(default_factory=dict)

    def inputs(self, batch: int, resolution: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """The named inputs (the form Core ML's ``export_coreml`` takes)."""
        return dict(zip(self.input_names, self.make_inputs(batch, resolution, seed), strict=True))

    @torch.no_grad()
    def reference(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The wrapper's fp32 outputs, in ``output_names`` order: what the gate compares against."""
        out = self.module(*inputs.values())
        return list(out) if isinstance(out, (tuple, list)) else [out]


def _latent_dims(factor: int, max_latent: int):
    from torch.export import Dim

    h, w = Dim("h", min=1, max=max(1, max_latent // factor)), Dim("w", min=1, max=max(1, max_latent // factor))
    return factor * h, factor * w


def _batch_dim():
    from torch.export import Dim

    return Dim("batch", min=1, max=1024)


class UNetExport(nn.Module):
    """The denoiser (SnapGen UNet or SD3 DiT) as ``(sample, timestep, context, pooled[, mask]) -> velocity``."""

    def __init__(self, unet: nn.Module, *, use_mask: bool, max_latent: int):
        super().__init__()
        self.unet = unet.eval()
        self.use_mask = use_mask and not is_dit(unet)
        self._install_rope_tables(max_latent)

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, encoder_attention_mask=None):
        mask = None if encoder_attention_mask is None else encoder_attention_mask > 0.5
        return denoise(self.unet, sample, timestep, (encoder_hidden_states, pooled_projections, mask))[0]

    def _install_rope_tables(self, max_latent: int) -> None:
        mods = [m for m in self.unet.modules() if isinstance(m, Transformer2D) and m.use_rope]
        if not mods:
            return
        # each block's feature size relative to the latent: one probe pass at the smallest latent
        probe = 2 ** (len(self.unet.config.block_channels) - 1)
        seen: dict[int, int] = {}

        def record(i, _module, args):
            seen.setdefault(i, args[0].shape[-1])  # returns None: the inputs pass unchanged

        hooks = [m.register_forward_pre_hook(partial(record, i)) for i, m in enumerate(mods)]
        c = self.unet.config
        try:
            with torch.no_grad():
                self.unet(torch.zeros(1, c.in_channels, probe, probe), torch.zeros(1), torch.zeros(1, 1, c.context_dim),
                          torch.zeros(1, c.pooled_dim))
        finally:
            for h in hooks:
                h.remove()
        tables: dict[tuple, str] = {}
        for i, m in enumerate(mods):
            size = max(1, max_latent * seen[i] // probe)
            key = (size, m.head_dim, m.rope_theta)
            if key not in tables:
                tables[key] = f"rope_{len(tables)}"
                cos, sin = rope_2d(size, size, m.head_dim, m.rope_theta)
                self.register_buffer(f"{tables[key]}_cos", cos.view(size, size, -1), persistent=False)
                self.register_buffer(f"{tables[key]}_sin", sin.view(size, size, -1), persistent=False)
            m._rope = partial(self._rope_slice, tables[key])

    def _rope_slice(self, name: str, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope_2d(h, w)`` as the top-left slice of the precomputed table (bit-identical)."""
        cos, sin = getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin")
        return cos[:h, :w].reshape(h * w, -1), sin[:h, :w].reshape(h * w, -1)


class DecoderExport(nn.Module):
    """Normalised latents -> image in [0, 1] (``latents_to_images``: scaling and shift folded in)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder.eval()

    def forward(self, latents):
        return latents_to_images(self.decoder, latents)


class TextEncoderExport(nn.Module):
    """One encoder of the stack: token ids + attention mask -> ``tokens``, ``mask`` (float) [, ``pooled``]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder.eval()
        self.name = encoder.spec.name
        self.has_pooled = encoder.spec.pooled != "none"

    def forward(self, input_ids, attention_mask):
        f = self.encoder.features(input_ids, attention_mask)
        out = [f[f"{self.name}.tokens"].float(), f[f"{self.name}.mask"].float()]
        return tuple(out + ([f[f"{self.name}.pooled"].float()] if self.has_pooled else []))


def _uses_mask(pipe) -> bool:
    return any(s.padding == "mask" for s in pipe.layout.specs)


def unet_exportable(pipe, max_resolution: int) -> Exportable:
    """The pipeline's denoiser with RoPE tables up to ``max_resolution`` pixels."""
    f = int(pipe.config.latent["downsample"])
    module = UNetExport(pipe.unet, use_mask=_uses_mask(pipe), max_latent=max_resolution // f)
    c, layout = pipe.unet.config, pipe.layout
    channels = int(pipe.config.latent["channels"])
    factor = int(c.patch_size) if is_dit(pipe.unet) else 2 ** (len(c.block_channels) - 1)
    names = ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    names += ["encoder_attention_mask"] if module.use_mask else []

    def make(batch: int, resolution: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        lat = resolution // f
        x = torch.randn(batch, channels, lat, lat, generator=g)
        t = 1000.0 * torch.rand(batch, generator=g)
        ctx = torch.randn(batch, layout.seq_len, layout.context_dim, generator=g)
        pooled = torch.randn(batch, layout.pooled_dim, generator=g)
        if not module.use_mask:
            return x, t, ctx, pooled
        mask = torch.ones(batch, layout.seq_len)
        mask[1::2, layout.seq_len // 2:] = 0.0  # every other row padded after its first half
        return x, t, ctx, pooled, mask

    def dynamic(max_res: int):
        b = _batch_dim()
        h, w = _latent_dims(factor, max_res // f)
        dims = [{0: b, 2: h, 3: w}, {0: b}, {0: b}, {0: b}]
        return tuple(dims + ([{0: b}] if module.use_mask else []))

    return Exportable("unet", module, names, ["velocity"], make, dynamic, count_params(pipe.unet),
                      meta=dict(latent_channels=channels, downsample=f, size_multiple=f * factor,
                                seq_len=layout.seq_len, context_dim=layout.context_dim, pooled_dim=layout.pooled_dim))


def decoder_exportable(pipe) -> Exportable:
    f = int(pipe.config.latent["downsample"])
    channels = int(pipe.config.latent["channels"])

    def make(batch: int, resolution: int, seed: int):
        lat = resolution // f
        return (torch.randn(batch, channels, lat, lat, generator=torch.Generator().manual_seed(seed)),)

    def dynamic(max_res: int):
        h, w = _latent_dims(1, max_res // f)
        return ({0: _batch_dim(), 2: h, 3: w},)

    return Exportable("decoder", DecoderExport(pipe.decoder), ["latents"], ["image"], make, dynamic,
                      count_params(pipe.decoder), meta=dict(latent_channels=channels, downsample=f,
                                                            decoder_class=type(pipe.decoder).__name__))


def _text_dynamic(max_res: int) -> tuple:
    b = _batch_dim()
    return {0: b}, {0: b}


def text_exportables(pipe) -> list[Exportable]:
    """One exportable per encoder of the pipeline's text stack, in spec order."""
    items = []
    for name, enc in pipe.text_encoder.encoders.items():
        module = TextEncoderExport(enc)

        def make(batch: int, resolution: int, seed: int, enc=enc):
            prompts = [PARITY_PROMPTS[(seed + i) % len(PARITY_PROMPTS)] for i in range(batch)]
            return tokenize(enc.tokenizer, enc.spec, prompts)

        outputs = ["tokens", "mask"] + (["pooled"] if module.has_pooled else [])
        items.append(Exportable(f"text.{name}", module, ["input_ids", "attention_mask"], outputs, make,
                                _text_dynamic, count_params(enc.model),
                                meta=dict(encoder=name, max_length=enc.spec.max_length)))
    return items
