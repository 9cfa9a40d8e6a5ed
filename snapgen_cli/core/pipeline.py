"""Text -> image with a trained SnapGen UNet: a ``diffusers.DiffusionPipeline``.

A training stage's output directory (``pretrain``, ``finetune``, ...) is a diffusers
pipeline directory, loaded with one call, ``SnapGenPipeline.from_pretrained(dir)``::

    model_index.json   the components' classes, the training resolution and the latent space
    unet/              the EMA weights of the efficient UNet (sec. 3.1; EMA: sup. G), or of an
                       SD3 DiT trained as a distillation teacher (``core/denoiser.py``)
    scheduler/         the sampler: FlowMatchEulerDiscreteScheduler with the time shift
                       (rectified flow, Eq. 3) or HeunDiscreteScheduler (DDPM, sup. H)
    text_encoder/      the text-encoder stack (core/text.py), saved by reference
    decoder/           the tiny decoder (sec. 3.2) or the latent space's AutoencoderKL

``snapgen generate``, ``eval`` and the training stages' sample grids all go through it.

Decisions where the paper is silent:

* **Text encoders by reference.** ``text_encoder/config.json`` holds the encoder specs (hub
  ids or local paths, layers, lengths), not their weights: Gemma-2-2b alone would add 5 GB
  to every stage directory. Loading the pipeline loads the encoders from those locations.
* **The latent space** (the autoencoder the shards were encoded with, its channels, its
  downsampling and ``scaling_factor`` / ``shift_factor``) is the pipeline config ``latent``;
  the ``recon`` metric encodes with that autoencoder.
* **Seeds.** Image ``i`` starts from noise drawn by its own generator (``generator`` is one
  ``torch.Generator`` per image, diffusers' convention; the stages seed image ``i`` with
  ``seed + i``), so the same seed gives the same image whatever the batch size -- up to
  float rounding: kernels may round differently for another batch size (~1e-7 here), which
  can move a pixel by one 8-bit level.
* **Encoder subsets.** ``encoders=[...]`` keeps only those text encoders; the others are
  treated as dropped (zeros), exactly as in training's per-encoder dropout (sec. 4), so any
  subset works with the same UNet.
* **Unconditional branch** for CFG: every encoder dropped (zero context and pooled vector),
  batched with the conditional branch into one UNet call (``core.flow.guided``).
* **Fast path** (:meth:`SnapGenPipeline.fast_path`, ``--dtype`` / ``--compile``; issue 17): the
  UNet and decoder in bf16 and compiled (CUDA graphs) by default on CUDA, fp32 and eager
  elsewhere; the decisions are in ``core/speed.py``. The UNet runs in its own dtype while the
  sampler's state stays fp32 (inputs cast in, predictions cast back out).
* **Timings**: each call records ``last_timings`` -- text encoding, denoising and decoding
  seconds apart (the device synchronised at each boundary), which ``snapgen generate`` reports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import ConfigError
from ..files import find_model_dir, model_location
from .decoder import TinyDecoder, latents_to_images
from .denoiser import denoise
from .flow import Guidance, objective_from_scheduler, sample
from .measure import synchronize
from .speed import DTYPE_NAMES, compile_default, compile_module, inference_dtype
from .text import TextEncoderStack, combine, unconditional
from .unet import SnapGenUNet

MODEL_INDEX = "model_index.json"


class SnapGenPipeline(DiffusionPipeline):
    """SnapGen text-to-image: text-encoder stack -> efficient UNet with the flow sampler and
    classifier-free guidance -> tiny decoder (or the autoencoder's decoder)."""

    model_cpu_offload_seq = "text_encoder->unet->decoder"

    def __init__(self, unet: SnapGenUNet | SD3Transformer2DModel, scheduler: SchedulerMixin, text_encoder: TextEncoderStack,
                 decoder: TinyDecoder | AutoencoderKL, resolution: int = 1024, latent: dict | None = None,
                 sampler: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, decoder=decoder)
        latent = dict(latent or {})
        latent.setdefault("channels", unet.config.in_channels)
        latent.setdefault("downsample", 8)
        self.register_to_config(resolution=int(resolution), latent=latent, sampler=sampler)
        self.unet.eval()
        self.decoder.eval()
        self.last_timings: dict[str, float] = {}
        self._compile_mode: str | None = None  # set by fast_path

    def fast_path(self, dtype: str = "auto", compile: bool | None = None) -> dict[str, Any]:
        """Switch the UNet and decoder to the fast inference path on their current device (module
        docstring; call after ``.to(device)``): ``dtype`` (``auto``, ``fp32``, ``bf16``, ``fp16``),
        ``compile`` (``None``: on for CUDA). On CUDA the conv weights go channels-last and the
        compiled modules use CUDA graphs. Returns :attr:`speed_settings`."""
        device = self.unet.device
        dt, comp = inference_dtype(dtype, device), compile_default(compile, device)
        cuda = device.type == "cuda"
        for module in (self.unet, self.decoder):
            # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules even when there are none
            torch.nn.Module.to(module, dtype=dt)
            if cuda:
                torch.nn.Module.to(module, memory_format=torch.channels_last)
        if comp:
            mode = "reduce-overhead" if cuda else "default"
            compile_module(self.unet, mode)
            # An AutoencoderKL decodes through its ``decoder`` submodule; the tiny decoder is one module.
            compile_module(self.decoder if isinstance(self.decoder, TinyDecoder) else self.decoder.decoder, mode)
            self._compile_mode = mode
        return self.speed_settings

    @property
    def speed_settings(self) -> dict[str, Any]:
        """``{"dtype", "compile", "compile_mode"}`` of the UNet as it runs now."""
        return {"dtype": DTYPE_NAMES.get(self.unet.dtype, str(self.unet.dtype)),
                "compile": self._compile_mode is not None, "compile_mode": self._compile_mode}

    def _mark_step(self) -> None:
        """Tell CUDA graphs a new inference step begins (the previous outputs are no longer read)."""
        if self._compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    # -- conditioning ---------------------------------------------------------------------

    @property
    def layout(self):
        return self.text_encoder.layout

    def encode_prompt(self, prompts: list[str], encoders: list[str] | None = None):
        """``(context, pooled, mask)`` of ``prompts``; only ``encoders`` (default all) are used."""
        if encoders:
            unknown = set(encoders) - set(self.layout.names)
            if unknown:
                raise ConfigError(f"--encoders: unknown {sorted(unknown)}; this model's encoders: {self.layout.names}")
        feats = self.text_encoder.encode(prompts, names=encoders or None)
        return combine(feats, self.layout, device=self._execution_device)

    # -- sampling -------------------------------------------------------------------------

    #: Sampling defaults of a pipeline that records none (the paper's 28 steps, CFG 4.5).
    DEFAULT_STEPS, DEFAULT_GUIDANCE = 28, 4.5

    def sampler_settings(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """``(steps, guidance)``: the given ones, else what the model was trained to sample with:
        what ``step-distill`` saved (``sampler`` in ``model_index.json``: e.g. 4 steps without
        CFG), else 28 and 4.5."""
        s = self.config.get("sampler") or {}
        return (int(s.get("num_inference_steps", self.DEFAULT_STEPS)) if steps is None else steps,
                float(s.get("guidance_scale", self.DEFAULT_GUIDANCE)) if guidance is None else guidance)

    @property
    def sampler_defaults(self) -> tuple[int, float]:
        """``(steps, guidance)`` the model was trained to sample with (:meth:`sampler_settings`)."""
        return self.sampler_settings()

    @property
    def objective(self):
        return objective_from_scheduler(self.scheduler)

    def latent_size(self, size: int | None) -> int:
        size = size or self.config.resolution
        f = int(self.config.latent["downsample"])
        if size % (f * 4):
            raise ConfigError(f"--size: expected a multiple of {f * 4}, got {size}")
        return size // f

    @torch.no_grad()
    def sample_latents(self, cond, generator: list[torch.Generator], steps: int, guidance: Guidance,
                       size: int | None = None) -> torch.Tensor:
        """Normalised latents for a batch of conditions, one generator per sample."""
        lat = self.latent_size(size)
        device = self._execution_device
        noise = randn_tensor((len(generator), self.config.latent["channels"], lat, lat), generator=generator,
                             device=device)
        uncond = unconditional(self.layout, len(generator), device=device)
        dt = self.unet.dtype  # the sampler's state stays in the noise's fp32; the UNet runs in its dtype
        cond, uncond = (tuple(v.to(dt) if v.is_floating_point() else v for v in c) for c in (cond, uncond))

        def model_fn(x, t, c):
            self._mark_step()
            # t contiguous: a guided step concatenates it, an unguided one gets an expanded view; one
            # layout spares a compiled UNet a recompilation for the other
            return denoise(self.unet, x.to(dt), t.contiguous(), c)[0].to(x.dtype)

        with self.progress_bar(total=steps) as bar:
            return sample(model_fn, noise, steps, cond, uncond, guidance, self.objective, on_step=bar.update)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        self._mark_step()
        return images_to_pil(latents_to_images(self.decoder, latents.to(self.decoder.device)))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, size: int | None = None,
                 guidance: Guidance | None = None, encoders: list[str] | None = None, batch_size: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Images for ``prompt`` (a string or a list).

        ``generator``: one per image (image ``i`` draws its noise from ``generator[i]``), or one
        for all; ``guidance`` (a :class:`~snapgen_cli.core.flow.Guidance`, e.g. an interval or the
        varied CFG of sup. H) overrides ``guidance_scale``; ``size`` is the image side in pixels
        (default: the training resolution); ``batch_size`` splits the prompts into UNet batches
        (default: one batch); ``output_type``: ``"pil"`` or ``"latent"`` (normalised latents).
        ``num_inference_steps`` / ``guidance_scale``: default :attr:`sampler_defaults`.
        """
        num_inference_steps, guidance_scale = self.sampler_settings(num_inference_steps, guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not isinstance(generator, list):  # one generator (or none): it seeds one generator per image
            seed = int(torch.randint(2**31, (), generator=generator))
            generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        if len(generator) != len(prompts):
            raise ConfigError(f"generator: {len(generator)} generators for {len(prompts)} prompts (one per image)")
        g = guidance or Guidance(scale=float(guidance_scale))
        step = batch_size or len(prompts)
        images: list = []
        device = self._execution_device
        times = dict.fromkeys(("text_encoding_s", "denoising_s", "decoding_s"), 0.0)
        clock = time.perf_counter()

        def lap(key: str) -> None:
            nonlocal clock
            synchronize(device)
            now = time.perf_counter()
            times[key] += now - clock
            clock = now

        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            cond = self.encode_prompt(chunk, encoders)
            lap("text_encoding_s")
            z = self.sample_latents(cond, generator[start:start + len(chunk)], num_inference_steps, g, size)
            lap("denoising_s")
            images += [z.cpu()] if output_type == "latent" else self.decode_latents(z)
            lap("decoding_s")
        self.last_timings = times
        out = torch.cat(images) if output_type == "latent" else images
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [0, 1] -> 8-bit PIL images (rounded to the nearest level)."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def pipeline_config(path: str | Path) -> dict:
    """The ``model_index.json`` of a pipeline dir; a dir without one is a ConfigError."""
    path = Path(path)
    if not (path / MODEL_INDEX).is_file():
        raise ConfigError(f"{path}: no {MODEL_INDEX} (point --checkpoint at the output dir of "
                          "pretrain/finetune/distill/step-distill, or a saved SnapGenPipeline)")
    return dict(SnapGenPipeline.load_config(path))


def _decoder_override(decoder: str | None, vae: str | None):
    if decoder:
        return TinyDecoder.from_pretrained(find_model_dir(decoder, what="decoder"))
    return load_autoencoder(vae) if vae else None


def load_decoder(path: str | Path, *, decoder: str | None = None, vae: str | None = None):
    """Only the decoder of the pipeline at ``path`` (or the ``decoder`` / ``vae`` override)."""
    _, cls_name = pipeline_config(path)["decoder"]
    override = _decoder_override(decoder, vae)
    if override is not None:
        return override.eval()
    cls = TinyDecoder if cls_name == TinyDecoder.__name__ else AutoencoderKL
    return cls.from_pretrained(Path(path) / "decoder").eval()


def load_pipeline(path: str | Path, *, decoder: str | None = None, vae: str | None = None,
                  device: str | torch.device = "cpu", dtype: str = "fp32", compile: bool | None = False
                  ) -> SnapGenPipeline:
    """``SnapGenPipeline.from_pretrained(path)`` with the CLI's overrides and one-line errors:
    ``decoder`` (a tiny decoder dir) or ``vae`` (an ``AutoencoderKL`` dir or hub id) replaces the
    pipeline's decoder; ``dtype`` / ``compile``: :meth:`SnapGenPipeline.fast_path` (``"auto"`` /
    ``None``: the device's defaults; the defaults here leave the pipeline as saved, fp32 eager)."""
    pipeline_config(path)
    override = _decoder_override(decoder, vae)
    overrides: dict[str, Any] = {} if override is None else {"decoder": override}
    pipe = SnapGenPipeline.from_pretrained(path, **overrides)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    pipe.fast_path(dtype, compile)
    return pipe


def load_autoencoder(path: str | Path, subfolder: str | None = None, *, torch_dtype: torch.dtype | None = None,
                     option: str = "--vae", hint: str = "") -> AutoencoderKL:
    """An ``AutoencoderKL`` from a local dir or a hub id (+ subfolder; a local dir holding
    ``config.json`` itself needs none); any failure is one ConfigError line naming ``option``."""
    path, subfolder = model_location(str(path), subfolder)
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 - offline hub, bad folder, wrong class: all a bad option value
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{option.lstrip('-')}: cannot load an AutoencoderKL from {where}: {reason}; pass {option} a "
                          f"local diffusers AutoencoderKL dir (and its subfolder if it is nested){hint}") from None
