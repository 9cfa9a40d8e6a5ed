"""Text -> image with a trained SnapGen UNet: text stack, sampler, decoder.

A training stage's output directory is a *pipeline directory*: its weights
(``model_ema/`` and ``model/``) plus ``pipeline.json``, which records everything needed to
generate from it -- the text encoder specs whose features the UNet was trained on, the
latent space (the autoencoder, its ``scaling_factor`` / ``shift_factor``), an optional tiny
decoder (sec. 3.2) that replaces the autoencoder's decoder, the objective (flow with its
shift, or DDPM) and the training resolution. ``generate``, ``eval`` and the training
stages' sample grids all go through :class:`SnapGenPipeline`.

Decisions where the paper is silent:

* **Seeds.** Image ``i`` of a call starts from noise drawn by its own generator seeded with
  ``seed + i``, so the same seed gives the same image whatever the batch size -- up to
  float rounding: CPU/GPU kernels may round differently for another batch size (~1e-7
  here), which can move a pixel by one 8-bit level.
* **Encoder subsets.** ``encoders=[...]`` keeps only those text encoders; the others are
  treated as dropped (zeros), exactly as in training's per-encoder dropout (sec. 4), so any
  subset works with the same UNet.
* **Unconditional branch** for CFG: every encoder dropped (zero context and pooled vector).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ConfigError
from ..files import atomic_write_json, find_model_dir
from .decoder import TinyDecoder, latents_to_images
from .flow import Guidance, make_objective, sample
from .text import EncoderSpec, TextEncoderStack, TextLayout, combine, parse_specs, unconditional
from .unet import SnapGenUNet

PIPELINE_FILE = "pipeline.json"


@dataclass
class PipelineSpec:
    """What ``pipeline.json`` holds (paths are absolute or relative to the pipeline dir)."""

    unet: str = "model_ema"
    text_encoders: list[dict] = field(default_factory=list)
    latent: dict = field(default_factory=dict)  # vae, subfolder, channels, downsample, scaling/shift
    decoder: str | None = None
    objective: dict = field(default_factory=lambda: {"name": "flow", "shift": 3.0})
    resolution: int = 256

    def save(self, directory: Path) -> None:
        atomic_write_json(Path(directory) / PIPELINE_FILE, self.__dict__)

    @classmethod
    def load(cls, directory: Path) -> PipelineSpec:
        path = Path(directory) / PIPELINE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory}: no {PIPELINE_FILE} (point --checkpoint at the output dir of "
                              "pretrain/finetune/distill/step-distill)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid pipeline file ({exc})") from None


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    q = Path(p)
    return str(q if q.is_absolute() or not (base / q).exists() else base / q)


def load_latent_decoder(latent: dict, decoder: str | None, base: Path = Path(".")):
    """The tiny decoder at ``decoder`` if given, else the latent space's ``AutoencoderKL``."""
    if decoder:
        return TinyDecoder.from_pretrained(find_model_dir(_resolve(base, decoder), what="decoder"))
    from diffusers import AutoencoderKL

    vae = _resolve(base, latent.get("vae"))
    if not vae:
        raise ConfigError("no decoder: pass --decoder (a tiny decoder dir) or --vae (an AutoencoderKL)")
    try:
        return AutoencoderKL.from_pretrained(vae, subfolder=latent.get("subfolder") or None)
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ConfigError(f"vae {vae!r}: cannot load ({first}); pass --vae with a local AutoencoderKL dir, "
                          "or --decoder with a tiny decoder dir") from None


class SnapGenPipeline:
    """UNet + text encoders + decoder, with the objective's sampler and CFG."""

    def __init__(self, unet: SnapGenUNet, texts: TextEncoderStack | None, layout: TextLayout, decoder,
                 objective: dict, resolution: int, latent_channels: int, downsample: int = 8):
        self.unet, self.texts, self.layout, self.decoder = unet.eval(), texts, layout, decoder.eval()
        self.objective = make_objective(objective.get("name", "flow"),
                                        **{k: v for k, v in objective.items() if k != "name"})
        self.resolution, self.latent_channels, self.downsample = resolution, latent_channels, downsample

    @classmethod
    def from_dir(cls, directory: str | Path, *, decoder: str | None = None, vae: str | None = None,
                 unet_subdir: str | None = None, text_encoders: list[dict | EncoderSpec] | None = None,
                 device: str | torch.device = "cpu") -> SnapGenPipeline:
        base = Path(directory)
        spec = PipelineSpec.load(base)
        unet_dir = find_model_dir(base, prefer=(unet_subdir or spec.unet, "model_ema", "model"))
        unet = SnapGenUNet.from_pretrained(unet_dir)
        specs = parse_specs(text_encoders or spec.text_encoders, "text_encoders")
        latent = dict(spec.latent, **({"vae": vae, "subfolder": None} if vae else {}))
        dec = load_latent_decoder(latent, decoder or (None if vae else spec.decoder), base)
        texts = TextEncoderStack(specs)
        pipe = cls(unet, texts, texts.layout, dec, spec.objective, spec.resolution,
                   latent.get("channels", unet.config.in_channels), latent.get("downsample", 8))
        return pipe.to(device)

    def to(self, device) -> SnapGenPipeline:
        self.unet.to(device)
        self.decoder.to(device)
        if self.texts is not None:
            self.texts.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def condition(self, prompts: list[str], encoders: list[str] | None = None):
        """(context, pooled, mask) of ``prompts``; only ``encoders`` (default all) are used."""
        if self.texts is None:
            raise ConfigError("this pipeline has no text encoders loaded")
        if encoders:
            unknown = set(encoders) - set(self.layout.names)
            if unknown:
                raise ConfigError(f"--encoder: unknown {sorted(unknown)}; this model's encoders: {self.layout.names}")
        feats = self.texts.encode(prompts, names=encoders or None)
        return combine(feats, self.layout, device=self.device)

    @torch.no_grad()
    def latents(self, cond, seeds: list[int], steps: int, guidance: Guidance, size: int | None = None) -> torch.Tensor:
        """Sample normalised latents for a batch of conditions (one seed per sample)."""
        size = size or self.resolution
        if size % (self.downsample * 4):
            raise ConfigError(f"--size: expected a multiple of {self.downsample * 4}, got {size}")
        lat = size // self.downsample
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((len(seeds), self.latent_channels, lat, lat), generator=gens, device=self.device)
        uncond = unconditional(self.layout, len(seeds), device=self.device)

        def model_fn(x, t, c):
            return self.unet(x, t, c[0], c[1], encoder_attention_mask=c[2]).sample

        return sample(model_fn, noise, steps, cond, uncond, guidance, self.objective)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        images = latents_to_images(self.decoder, latents.to(next(self.decoder.parameters()).dtype))
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def __call__(self, prompts: list[str], seed: int = 0, steps: int = 28, guidance: Guidance | float = 4.5,
                 size: int | None = None, batch_size: int = 8, encoders: list[str] | None = None,
                 return_latents: bool = False) -> Any:
        """Images for ``prompts``; image ``i`` uses seed ``seed + i``."""
        g = guidance if isinstance(guidance, Guidance) else Guidance(scale=float(guidance))
        images, lats = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            z = self.latents(self.condition(chunk, encoders), [seed + start + i for i in range(len(chunk))], steps, g, size)
            lats.append(z.cpu())
            images += self.decode(z)
        return (images, torch.cat(lats)) if return_latents else images


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images pasted row-major into one grid image."""
    if not images:
        raise ValueError("no images for the grid")
    cols = cols or min(len(images), 8)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
