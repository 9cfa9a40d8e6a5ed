"""What ``train-decoder`` trains (paper sec. 3.2, "Training of the Decoder"; Table 2; sup. B).

* :class:`TinyDecoderTask` -- the paper's setting: the SD3 encoder (any diffusers
  ``AutoencoderKL``) frozen, the :class:`~snapgen_cli.core.decoder.TinyDecoder` trained on
  random 256^2 patches to reconstruct them from their latents with MSE + LPIPS + an
  adversarial loss, no KL (:class:`~snapgen_cli.core.losses.DecoderLoss`).
* :class:`AutoencoderTask` -- **not in the paper**: a small ``AutoencoderKL`` (encoder and
  decoder) trained jointly with the same loss plus a small KL term, for domains with no
  pretrained encoder and for the CPU demo, where the SD3 weights cannot be downloaded. Its
  output is the frozen encoder a later ``train-decoder`` run (and ``precompute``/``generate``)
  uses; :func:`latent_statistics` gives it SD-style ``scaling_factor``/``shift_factor``.

Both are two-phase :class:`~snapgen_cli.train.loop.TrainTask` s (``generator`` then
``discriminator`` on every micro-batch, each trainable with its own AdamW). Decisions where
the paper is silent:

* **Patches** are random ``patch_size`` crops of the images at their native resolution (a
  decoder that serves 1024^2 generation must learn native-scale detail; ``resize`` first
  resizes the shorter side instead, and an image smaller than the patch is resized up to
  it). The crop offsets come from the loop's per-sample generators, so a resumed or
  multi-process run crops exactly as an uninterrupted one; the dataset therefore yields
  whole images (uint8) and the crop happens in :meth:`ReconstructionTask.loss`.
* **Latents** are encoded on the fly by the frozen encoder; by default the posterior *mean*,
  as ``precompute`` stores it (``latent = "sample"`` draws a posterior sample from the same
  per-sample generators). Reading precomputed latent shards instead is not implemented:
  precompute stores fixed centre crops, while decoder training wants fresh random patches.
* **Before ``adv_start_step``** the discriminator is not run and not updated (its phase
  returns a constant zero loss, so AdamW sees no gradient and applies no weight decay).
  The generator's adversarial term calls the *unwrapped* discriminator: its parameters are
  frozen during that phase, so no DDP gradient synchronisation is involved.
* **Joint autoencoder** (``AutoencoderTask``): posterior samples are decoded; the KL term is
  the diagonal-Gaussian KL summed over latent elements divided by the number of image
  elements -- i.e. the ratio of LDM's ``sum(KL) / sum(pixel loss)`` weighting, so
  ``kl_weight`` keeps LDM's meaning (1e-6 in its KL-f8 config) with our per-pixel-mean MSE.
  The ``tiny-ae`` preset keeps the SD3 latent geometry (16 channels, f = 8) so the tiny
  decoder and UNet presets fit it unchanged; it has no attention (speed) and no quant convs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core.baselines import SD3_VAE_CONFIG
from ..core.losses import DecoderLoss
from ..core.latents import downsampling_factor
from ..data.images import ImageSkipped, open_image, resize_crop, to_tensor
from ..data.sources import Source
from ..errors import ConfigError, SnapgenError
from ..eval.metrics import ReconstructionMetrics, list_images
from .loop import StepContext, TrainTask

# ------------------------------------------------------------------------------ autoencoders

_AE_BASE = dict(in_channels=3, out_channels=3, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.0, shift_factor=0.0)

#: ``AutoencoderKL`` presets for ``mode = "autoencoder"``: ``block_out_channels`` (one entry per
#: x2 downsampling + 1) and the latent width; f = 2 ** (len(block_out_channels) - 1).
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # 0.97M parameters, 16 channels, f = 8, 0.31 G MACs per 64^2 image (encode + decode): the
    # demo's autoencoder; 16 channels at full resolution keep it fast on a CPU.
    "tiny-ae": dict(latent_channels=16, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                    mid_block_add_attention=False, sample_size=256),
    # The SD3 autoencoder's layout (83.8M parameters), from scratch, for a new image domain.
    "sd3-ae": {k: v for k, v in SD3_VAE_CONFIG.items() if k not in ("down_block_types", "up_block_types")},
}


def autoencoder_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """The full ``AutoencoderKL`` config of a preset with ``overrides`` applied."""
    if preset not in AUTOENCODER_PRESETS:
        raise ConfigError(f"autoencoder: unknown preset {preset!r}; choose one of {', '.join(AUTOENCODER_PRESETS)}")
    cfg = {**_AE_BASE, **copy.deepcopy(AUTOENCODER_PRESETS[preset]), **overrides}
    n = len(cfg["block_out_channels"])
    cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
    cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    return cfg


def build_autoencoder(preset: str = "tiny-ae", **overrides: Any) -> AutoencoderKL:
    try:
        return AutoencoderKL(**autoencoder_config(preset, **overrides))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"autoencoder_overrides: {exc}") from None


# ------------------------------------------------------------------------------ data


class ImageDataset(Dataset):
    """The images of a :class:`~snapgen_cli.data.sources.Source` (folder or ``datasets``) as
    uint8 tensors (3, H, W) whose shorter side is at least ``min_side``.

    ``resize``: resize the shorter side to this first (``None``: native resolution). An image
    that cannot be used (see ``data/images.py``) is replaced by the next usable one, the same
    way on every epoch and process (so runs stay exact), with a warning naming it.
    """

    def __init__(self, source: Source, min_side: int, resize: int | None = None):
        n = source.num_samples
        if n is None:
            raise ConfigError("data: a streaming source has no length; train-decoder needs a map-style dataset "
                              "(an image folder or a save_to_disk folder)")
        if n == 0:
            raise ConfigError(f"data: no images in {source.describe().get('path', source)}")
        self.source, self.n, self.min_side, self.resize = source, n, min_side, resize
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> Image.Image:
        sample = next(self.source.iter_range(index, index + 1))
        if sample.image is None:
            raise ImageSkipped("no_image")
        img = open_image(sample.image)
        short = self.resize or min(img.size)
        return resize_shorter(img, max(short, self.min_side))

    def __getitem__(self, index: int) -> Tensor:
        for i in ((index + k) % self.n for k in range(self.n)):
            try:
                img = self.image(i)
            except ImageSkipped as e:
                if i not in self.skipped:
                    self.skipped[i] = e.reason
                    warnings.warn(f"data: image {i} skipped ({e}); the next usable image is used instead",
                                  stacklevel=2)
                continue
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        raise SnapgenError("data: no usable image in the training data (every one was skipped)")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased) so that the shorter side is ``size``; a no-op if it is."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC,
                      reducing_gap=None)


def random_patches(images: Sequence[Tensor], size: int, generators: Sequence[torch.Generator]) -> Tensor:
    """One random ``size`` x ``size`` crop per uint8 image, offsets drawn from its generator;
    returned as float (B, 3, size, size) in [-1, 1]."""
    crops = []
    for img, gen in zip(images, generators, strict=True):
        h, w = img.shape[-2:]
        top = int(torch.randint(h - size + 1, (), generator=gen))
        left = int(torch.randint(w - size + 1, (), generator=gen))
        crops.append(img[:, top:top + size, left:left + size])
    return torch.stack(crops).float().div_(127.5).sub_(1.0)


def load_patches(files: Sequence[str | Path], size: int) -> Tensor:
    """Images resized (shorter side) and centre-cropped to ``size``: (N, 3, size, size) in [-1, 1]."""
    out = []
    for f in files:
        try:
            img = open_image(Path(f))
        except ImageSkipped as e:
            raise ConfigError(f"eval image {str(f)!r} cannot be used ({e}); remove it from the folder") from None
        out.append(to_tensor(resize_crop(img, size)[0]))
    return torch.stack(out)


# ------------------------------------------------------------------------------ reconstruction


def encode(vae: AutoencoderKL, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Raw latents of images in [-1, 1]: the posterior mean, or a sample if ``generators``."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean if generators is None else dist.sample(generator=list(generators))


@torch.no_grad()
def reconstruct(decoder: nn.Module, vae: AutoencoderKL, images: Tensor) -> Tensor:
    """``decoder.decode(encoder(images))`` (posterior mean), images in [-1, 1]. ``decoder`` is a
    :class:`TinyDecoder` or an ``AutoencoderKL`` (the same ``decode`` contract: raw latents)."""
    z = encode(vae, images)
    return decoder.decode(z.to(decoder.dtype)).sample.float()


@torch.no_grad()
def evaluate_decoder(decoder: nn.Module, vae: AutoencoderKL, folder: str | Path, resolution: int, *,
                     lpips: bool = False, lpips_net: str = "alex", batch_size: int = 8) -> dict[str, float]:
    """PSNR / SSIM (/ LPIPS) of ``decoder`` reconstructing the latents ``vae``'s encoder makes of
    the images in ``folder`` (recursive; shorter side resized to ``resolution``, centre crop):
    Table 2's comparison, e.g. the tiny decoder vs ``decoder=vae`` (its own decoder).

    Returns ``{"psnr", "ssim", ["lpips",] "n_images", "resolution"}``; PSNR is per image, then averaged.
    """
    factor = downsampling_factor(vae.config)
    if resolution % factor:
        raise ConfigError(f"eval_resolution: {resolution} is not a multiple of the autoencoder's factor {factor}")
    files = list_images(folder, "eval_images")
    metrics = ReconstructionMetrics(lpips=lpips, lpips_net=lpips_net, device=vae.device,
                                    lpips_off="eval_lpips = false")
    for i in range(0, len(files), batch_size):
        x = load_patches(files[i:i + batch_size], resolution)
        y = reconstruct(decoder, vae, x)
        metrics.update(x.add(1).div(2), y.add(1).div(2))
    return metrics.compute() | {"resolution": resolution}


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, batches: Sequence[Tensor]) -> tuple[float, float]:
    """SD-style latent normalisation of an autoencoder: ``(shift, scale)`` = (mean, 1 / std) of
    its posterior-mean latents over ``batches`` of images in [-1, 1] (SD3: 0.0609, 1.5305)."""
    z = torch.cat([encode(vae, b).float().flatten() for b in batches])
    std = float(z.std())
    if not math.isfinite(std) or std == 0:
        raise SnapgenError(f"latent statistics: std {std} of the encoder's latents; the encoder is degenerate")
    return float(z.mean()), 1.0 / std


def comparison_grid(originals: Tensor, reconstructions: Tensor) -> Image.Image:
    """Originals on the top row, reconstructions below; tensors in [-1, 1]."""
    rows = torch.cat([torch.cat(list(originals), -1), torch.cat(list(reconstructions), -1)], -2)
    arr = rows.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------ tasks


class ReconstructionTask(TrainTask):
    """Two phases on every micro-batch: ``generator`` (the main model reconstructs random patches,
    loss :class:`DecoderLoss`) and ``discriminator`` (real patches vs the generator's output)."""

    def __init__(self, data: Dataset, objective: DecoderLoss, discriminator: nn.Module, patch_size: int,
                 previews: Tensor | None = None, sample_latents: bool = False):
        self.data, self.objective, self.discriminator = data, objective, discriminator
        self.patch_size, self.previews, self.sample_latents = patch_size, previews, sample_latents
        self._fake: tuple[tuple[int, int], Tensor, Tensor] | None = None

    def phases(self) -> dict[str, tuple[str, ...]]:
        return {"generator": (self.main,), "discriminator": ("discriminator",)}

    def dataset(self) -> Dataset:
        return self.data

    def collate(self, items: list[Tensor]) -> list[Tensor]:
        return items

    def frozen(self) -> dict[str, nn.Module]:
        return {"objective": self.objective}  # moves LPIPS to the device

    def reconstruction(self, target: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(reconstruction, extra loss, extra logs) of the patches ``target``."""
        raise NotImplementedError

    def loss(self, phase: str, batch: list[Tensor], ctx: StepContext):
        if phase == "generator":
            target = random_patches(batch, self.patch_size, ctx.generators).to(ctx.device)
            recon, extra, logs = self.reconstruction(target, ctx)
            disc = ctx.accelerator.unwrap_model(ctx.models["discriminator"])
            loss, terms = self.objective(recon, target, disc=disc, step=ctx.step)
            self._fake = ((ctx.step, ctx.micro), target, recon.detach())
            return loss + extra, {**terms, **logs}
        if self._fake is None or self._fake[0] != (ctx.step, ctx.micro):
            raise SnapgenError("the discriminator phase must follow the generator phase on the same micro-batch")
        _, real, fake = self._fake
        self._fake = None
        if not self.objective.adversarial_active(ctx.step):
            return torch.zeros((), device=ctx.device, requires_grad=True), {}
        return self.objective.discriminator_loss(ctx.models["discriminator"], real, fake)

    def encoder_for(self, model: nn.Module) -> AutoencoderKL:
        raise NotImplementedError

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        if self.previews is None:
            return None
        x = self.previews.to(model.device)
        return comparison_grid(x, reconstruct(model, self.encoder_for(model), x))


class TinyDecoderTask(ReconstructionTask):
    """The paper's decoder training: frozen encoder ``vae``, trainable ``decoder`` + ``discriminator``."""

    main = "decoder"

    def __init__(self, decoder: nn.Module, vae: AutoencoderKL, **kw: Any):
        super().__init__(**kw)
        self.decoder, self.vae = decoder, vae

    def trainables(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder, "discriminator": self.discriminator}

    def frozen(self) -> dict[str, nn.Module]:
        return {**super().frozen(), "vae": self.vae}

    def encoder_for(self, model: nn.Module) -> AutoencoderKL:
        return self.vae

    def reconstruction(self, target, ctx):
        with torch.no_grad():
            z = encode(self.vae, target, ctx.generators if self.sample_latents else None)
        return ctx.models["decoder"](z.float()), target.new_zeros(()), {}


class AutoencoderTask(ReconstructionTask):
    """Joint ``AutoencoderKL`` training (not in the paper, see the module docstring): the decoder
    loss on posterior samples plus ``kl_weight`` x the per-pixel KL."""

    main = "autoencoder"

    def __init__(self, autoencoder: AutoencoderKL, kl_weight: float, **kw: Any):
        super().__init__(**kw)
        self.autoencoder, self.kl_weight = autoencoder, kl_weight

    def trainables(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder, "discriminator": self.discriminator}

    def encoder_for(self, model: nn.Module) -> AutoencoderKL:
        return model

    def reconstruction(self, target, ctx):
        # Through the (possibly DDP-wrapped) forward, so gradients are synchronised; the
        # posterior's moments, which forward() does not return, are read with a hook.
        ae = ctx.accelerator.unwrap_model(ctx.models["autoencoder"])
        moments: list[Tensor] = []
        layer = ae.quant_conv if ae.quant_conv is not None else ae.encoder
        hook = layer.register_forward_hook(lambda m, i, out: moments.append(out))
        try:
            recon = ctx.models["autoencoder"](target, sample_posterior=True, generator=list(ctx.generators)).sample
        finally:
            hook.remove()
        kl = DiagonalGaussianDistribution(moments[0]).kl().mean() / target[0].numel()
        return recon, self.kl_weight * kl, {"kl": kl.detach()}


__all__ = ["AUTOENCODER_PRESETS", "AutoencoderTask", "ImageDataset", "ReconstructionTask", "TinyDecoderTask",
           "autoencoder_config", "build_autoencoder", "comparison_grid", "encode",
           "evaluate_decoder", "latent_statistics", "load_patches", "random_patches",
           "reconstruct", "resize_shorter"]
