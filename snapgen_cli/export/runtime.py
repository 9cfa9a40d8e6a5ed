"""Generation from a ``snapgen export`` folder on ONNX Runtime (``snapgen generate --backend onnxruntime``).

:class:`OnnxRuntimePipeline` is the :class:`~snapgen_cli.core.pipeline.SnapGenPipeline` itself with
its three models replaced by ONNX Runtime sessions of the exported artefacts: the prompt
encoding and its SD3-style combination (``core.text.combine``), the per-image noise, the
sampler with the pipeline's shift and sigmas and classifier-free guidance (``core.flow.sample``,
Eq. 3) and the conversion to 8-bit images are the same code as the PyTorch pipeline's, so the
same seed gives the same image up to the exported models' numerical differences (the parity
gate bounds them). The tokenizers run in Python (``transformers``), from the export folder.

Decisions: the image size defaults to the export resolution and may be any multiple of the
UNet's size multiple up to it (the exported graphs' dynamic axes); ``precision`` picks the fp32
or the fp16 ONNX variants of all three kinds of models at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..core.pipeline import SnapGenPipeline, images_to_pil
from ..core.text import EncoderSpec, TextLayout, tokenize
from ..core.unet import SnapGenUNetOutput
from ..errors import ConfigError, SnapgenError
from . import onnx as ox

MANIFEST = "export.json"
SUPPORTED_VERSIONS = (1,)


def read_manifest(path: str | Path) -> dict:
    """The ``export.json`` of an export folder; anything else is a one-line ConfigError."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ConfigError(f"{path}: no {MANIFEST} (point --checkpoint at the output dir of `snapgen export`)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not a valid export manifest ({exc}); export again") from None
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise ConfigError(f"{file}: manifest format {manifest.get('format_version')!r} is not one this snapgen reads "
                          f"({', '.join(map(str, SUPPORTED_VERSIONS))}); export again with this version")
    return manifest


def artefact(manifest: dict, root: Path, model: str, fmt: str = "onnx", precision: str = "fp32") -> Path:
    """The file of one exported model; a missing one names the export option that makes it."""
    for a in manifest["artefacts"]:
        if a["model"] == model and a["format"] == fmt and a["precision"] == precision:
            return Path(root) / a["path"]
    hint = " (export with --onnx-fp16)" if precision == "fp16" else ""
    made = sorted({f"{a['format']} {a['precision']} {a['model']}" for a in manifest["artefacts"]})
    raise ConfigError(f"{root}: the export holds no {fmt} {precision} {model!r}{hint}; exported: {', '.join(made)}")


class _Session:
    """An ONNX Runtime session standing in for a PyTorch component of the pipeline."""

    #: What the pipeline feeds it (the session casts to its own precision, fp32 or fp16).
    dtype = torch.float32

    def __init__(self, path: Path, device: str):
        self.session = ox.session(path, device)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def eval(self):  # SnapGenPipeline puts its components in eval mode
        return self

    def run(self, **inputs) -> dict[str, torch.Tensor]:
        outputs = ox.run(self.session, inputs)
        return {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in zip(self.output_names, outputs, strict=True)}


class OrtUNet(_Session):
    """The exported UNet with the SnapGen UNet's call (``core.denoiser.denoise`` calls it)."""

    def __init__(self, path: Path, device: str, in_channels: int):
        super().__init__(path, device)
        self.config = SimpleNamespace(in_channels=in_channels)

    def __call__(self, sample, timestep, encoder_hidden_states, pooled_projections, encoder_attention_mask=None,
                 return_features: bool = False):
        if return_features:
            raise SnapgenError("an exported UNet returns no feature maps (the export has only the velocity)")
        t = torch.as_tensor(timestep, dtype=torch.float32).expand(sample.shape[0])
        feed = dict(sample=sample.float(), timestep=t, encoder_hidden_states=encoder_hidden_states.float(),
                    pooled_projections=pooled_projections.float())
        if encoder_attention_mask is not None:
            feed["encoder_attention_mask"] = encoder_attention_mask.float()
        return SnapGenUNetOutput(sample=self.run(**feed)["velocity"].to(sample.dtype))


class OrtDecoder(_Session):
    """The exported decoder: normalised latents -> images in [0, 1] (scaling and shift folded in)."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.run(latents=latents.float())["image"]


class OrtTextEncoders:
    """The exported text encoders with ``TextEncoderStack``'s ``encode`` and ``layout``."""

    def __init__(self, manifest: dict, root: Path, precision: str, device: str):
        from transformers import AutoTokenizer

        encoders = manifest["text"]["encoders"]
        specs = [EncoderSpec.model_validate(e["spec"]) for e in encoders]
        self.layout = TextLayout(tuple(specs), {e["name"]: e["width"] for e in encoders},
                                 {e["name"]: e["pooled_width"] for e in encoders})
        self.specs = {s.name: s for s in specs}
        self.tokenizers, self.sessions = {}, {}
        for e in encoders:
            self.tokenizers[e["name"]] = AutoTokenizer.from_pretrained(root / e["tokenizer"])
            self.tokenizers[e["name"]].padding_side = "right"
            self.sessions[e["name"]] = _Session(artefact(manifest, root, f"text.{e['name']}", precision=precision),
                                                device)

    def eval(self):
        return self

    def encode(self, captions: list[str | None], names: list[str] | None = None) -> dict[str, torch.Tensor]:
        captions = ["" if c is None else c for c in captions]
        out: dict[str, torch.Tensor] = {}
        for n in names or list(self.sessions):
            ids, attn = tokenize(self.tokenizers[n], self.specs[n], captions)
            res = self.sessions[n].run(input_ids=ids, attention_mask=attn)
            out[f"{n}.tokens"], out[f"{n}.mask"] = res["tokens"], res["mask"] > 0.5
            if "pooled" in res:
                out[f"{n}.pooled"] = res["pooled"]
        return out


class OnnxRuntimePipeline(SnapGenPipeline):
    """``SnapGenPipeline`` on ONNX Runtime sessions of an export folder (module docstring)."""

    @classmethod
    def from_export(cls, path: str | Path, precision: str = "fp32", device: str = "cpu") -> OnnxRuntimePipeline:
        import diffusers

        root = Path(path)
        manifest = read_manifest(root)
        p, s = manifest["pipeline"], manifest["sampler"]
        scheduler = getattr(diffusers, s["scheduler_class"]).from_pretrained(root / s["scheduler"])
        unet = OrtUNet(artefact(manifest, root, "unet", precision=precision), device, int(p["latent"]["channels"]))
        pipe = cls(unet=unet, scheduler=scheduler, text_encoder=OrtTextEncoders(manifest, root, precision, device),
                   decoder=OrtDecoder(artefact(manifest, root, "decoder", precision=precision), device),
                   resolution=int(p["resolution"]), latent=dict(p["latent"]),
                   sampler=dict(num_inference_steps=s["steps"], guidance_scale=s["guidance"]))
        pipe.size_multiple = int(p["size_multiple"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latent_size(self, size: int | None) -> int:
        size = size or self.config.resolution
        if size % self.size_multiple or size > self.config.resolution:
            raise ConfigError(f"--size: the exported models take multiples of {self.size_multiple} up to the export "
                              f"resolution {self.config.resolution}, got {size}")
        return super().latent_size(size)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        return images_to_pil(self.decoder(latents))
