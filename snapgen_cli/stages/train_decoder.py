"""``snapgen train-decoder``: the tiny decoder against a frozen encoder (paper sec. 3.2, Table 2).

``mode = "decoder"`` (the paper): the encoder of ``vae`` (any diffusers ``AutoencoderKL``, a
hub id or a local dir; default SD3's) is frozen and the :class:`TinyDecoder` (``decoder``
preset + ``decoder_overrides``; its ``latent_channels``, ``scaling_factor`` and
``shift_factor`` come from the VAE's config) is trained on random ``patch_size`` patches with
MSE + LPIPS + an adversarial loss, no KL, against a PatchGAN discriminator with its own
AdamW (``lr_overrides.discriminator``); the adversarial terms start at ``adv_start_step``.

``mode = "autoencoder"`` (**a deviation from the paper**, for domains with no pretrained
encoder and for the CPU demo, which cannot download SD3): a small ``AutoencoderKL``
(``autoencoder`` preset, ``tiny-ae`` by default) is trained jointly with the same loss plus
``kl_weight`` x KL, then its ``scaling_factor`` / ``shift_factor`` are set SD-style (1/std and
mean of its latents over ``latent_stats_batches`` batches) in the saved configs, so that
``precompute``, ``generate`` and a following ``mode = "decoder"`` run (``vae = "previous"``)
load it as the VAE.

Both write ``model/`` and ``model_ema/`` (``save_pretrained``; later stages prefer the EMA),
``discriminator/``, ``losses.jsonl``, ``samples/`` (input patches above their
reconstructions), ``checkpoints/`` and, with ``eval_images``, ``eval.json``: PSNR / SSIM
(/ LPIPS) of the trained model's reconstructions next to the VAE decoder's own on the same
held-out images (Table 2's comparison; the paper uses COCO val2017).

Defaults follow the paper where it speaks (256^2 patches, batch 256, 1M iterations, EMA
0.999 as in the rest of its training). Decisions where it is silent:

* ``batch_size`` is per process: under ``accelerate launch`` with P processes use
  ``batch_size = 256 / P`` for the paper's global batch (the LR scales with the global batch).
* AdamW lr 1e-4 for the decoder and the discriminator at a global batch of 256, betas
  (0.5, 0.9) (the usual GAN-autoencoder setting of taming / LDM), weight decay 0.01.
* Adversarial: hinge loss, constant weight 0.1, switched on after 50k steps (5% of the run,
  as LDM's KL-f8 autoencoder) so the reconstruction terms first get the decoder close.
* LPIPS on by default (AlexNet trunk); with no cached trunk the run stops with a clear error
  that says where to put it or to set ``lpips_weight = 0``. Evaluation reports LPIPS when
  ``eval_lpips`` (default: when training uses it).
* An unusable training image (corrupt, truncated, ...) is replaced by the next usable one,
  with a warning; the summary lists them (``skipped_images``) when the data is read in the
  training process (``num_workers = 0``; worker processes only warn).
* Evaluation runs on the EMA weights, images resized (shorter side) and centre-cropped to
  ``eval_resolution`` (default ``patch_size``), latents = posterior means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveFloat, field_validator

from ..config import PREVIOUS_OR_PATH

from ..core.baselines import SD3_VAE_HUB
from ..core.decoder import TinyDecoder, build_decoder
from ..core.losses import ADV_LOSSES, LPIPS_NETS, DecoderLoss
from ..core.discriminator import PatchDiscriminator, build_discriminator
from ..core.latents import downsampling_factor
from ..core.measure import count_params
from ..data.sources import open_source
from ..errors import ConfigError
from ..eval.metrics import list_images
from ..files import atomic_write_json, find_model_dir
from ..train.decoder_task import (AutoencoderTask, ImageDataset, TinyDecoderTask, build_autoencoder,
                                  evaluate_decoder, latent_statistics, load_patches, random_patches)
from ..train.loop import LoopConfig, process_state, sample_generators, save_module, train
from .base import PlanItem, StageContext, is_main_process, seeded, vae_config, wait_for_everyone

SD3_VAE, SD3_VAE_SUBFOLDER = SD3_VAE_HUB
EVAL_FILE = "eval.json"


#: Runs in every process of a distributed launch (the loop splits each global batch; stages/base.py).
EVERY_PROCESS = True


class Config(LoopConfig):
    """Every setting of ``snapgen train-decoder`` (plus the shared loop's)."""

    mode: Literal["decoder", "autoencoder"] = Field(
        "decoder", description='"decoder": tiny decoder vs a frozen encoder (paper); "autoencoder": a small '
                               "AutoencoderKL trained jointly (not in the paper: no-encoder domains, CPU demo)")
    data: str = Field(description="training images: an image folder (recursive) or a datasets save_to_disk folder")
    data_kind: Literal["auto", "hf", "folder"] = "auto"
    split: str = "train"
    image_column: str = "image"
    patch_size: int = Field(256, gt=0, description="random square patches (paper: 256)")
    resize: int | None = Field(None, gt=0, description="resize the shorter side to this before cropping (default: native)")
    vae: str = Field(SD3_VAE, description='the frozen encoder: hub id, AutoencoderKL dir, "previous" or "@stage"',
                     json_schema_extra=PREVIOUS_OR_PATH)
    vae_subfolder: str | None = SD3_VAE_SUBFOLDER
    latent: Literal["mean", "sample"] = Field("mean", description="posterior mean (as precompute stores) or a sample")
    decoder: str = Field("snapgen-decoder", description="tiny decoder preset (mode=decoder)")
    decoder_overrides: dict[str, Any] = Field(default_factory=dict)
    autoencoder: str = Field("tiny-ae", description="AutoencoderKL preset (mode=autoencoder)")
    autoencoder_overrides: dict[str, Any] = Field(default_factory=dict)
    kl_weight: float = Field(1e-6, ge=0, description="KL weight, LDM scale (mode=autoencoder)")
    latent_stats_batches: int = Field(8, gt=0, description="batches (of up to 32 patches) for scaling/shift_factor "
                                                            "(mode=autoencoder)")
    discriminator: str = "patchgan"
    discriminator_overrides: dict[str, Any] = Field(default_factory=dict)
    mse_weight: float = Field(1.0, ge=0)
    l1_weight: float = Field(0.0, ge=0)
    lpips_weight: float = Field(1.0, ge=0, description="0: no LPIPS (no weights needed)")
    lpips_net: Literal[LPIPS_NETS] = "alex"
    adv_weight: float = Field(0.1, ge=0)
    adv_loss: Literal[ADV_LOSSES] = "hinge"
    adv_start_step: int = Field(50_000, ge=0, description="no discriminator before this step")
    r1_gamma: float = Field(0.0, ge=0)
    eval_images: str | None = Field(None, description="held-out image folder for PSNR/SSIM/LPIPS after training")
    eval_resolution: int | None = Field(None, gt=0, description="eval crop size (default: patch_size)")
    eval_lpips: bool | None = Field(None, description="LPIPS in the evaluation (default: when lpips_weight > 0)")
    sample_count: int = Field(8, gt=0, description="patches in each sample grid")
    resume: str | None = Field("auto", description='"auto": continue from the latest checkpoint; a checkpoint '
                                                   "path; another run's output dir (its latest checkpoint); "
                                                   "null: start fresh")
    # The shared loop's settings, with this stage's defaults.
    steps: int = Field(1_000_000, gt=0, description="paper: 1M iterations")
    batch_size: int = Field(256, gt=0, description="per process (paper: 256 in all)")
    lr: float = Field(1e-4, gt=0, description="learning rate at a global batch of lr_reference_batch")
    lr_reference_batch: int = Field(256, gt=0)
    lr_overrides: dict[str, PositiveFloat] = Field(default_factory=lambda: {"discriminator": 1e-4})
    betas: tuple[float, float] = (0.5, 0.9)
    sample_every: int = Field(5000, ge=0)

    @field_validator("vae_subfolder", mode="before")
    @classmethod
    def _none_word(cls, v):
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v


# ------------------------------------------------------------------------------ models


def _local_vae_dir(path: Path, subfolder: str | None) -> Path:
    if subfolder and (path / subfolder / "config.json").is_file():
        return path / subfolder
    return find_model_dir(path, what="vae")  # an AutoencoderKL dir, or an autoencoder stage's output


def _vae_source(cfg: Config, ctx: StageContext) -> Path | str:
    """A local AutoencoderKL dir, or a hub id (``vae_subfolder`` applies to hub ids)."""
    if cfg.vae == "previous" or cfg.vae.startswith("@"):
        try:
            where = ctx.resolve_input(cfg.vae)
        except ValueError as exc:
            raise ConfigError(f"vae: {exc}") from None
        if where is None:
            raise ConfigError('vae: "previous" but no stage runs before this one; pass vae a path or hub id')
        return _local_vae_dir(where, None)
    local = Path(cfg.vae).expanduser()
    return _local_vae_dir(local, cfg.vae_subfolder) if local.exists() else cfg.vae


def load_vae(cfg: Config, ctx: StageContext):
    from ..core.pipeline import load_autoencoder

    src = _vae_source(cfg, ctx)
    return load_autoencoder(src, cfg.vae_subfolder if isinstance(src, str) else None, option="vae",
                            hint=' (e.g. a train-decoder run with mode = "autoencoder")')


def _vae_config(cfg: Config, ctx: StageContext) -> dict[str, Any] | None:
    """The encoder's config without loading weights (for ``plan``); ``None`` if not known yet."""
    try:
        src = _vae_source(cfg, ctx)
    except ConfigError:  # an earlier stage's output that a dry run has not written
        src = ctx.resolve_input(cfg.vae) if cfg.vae == "previous" or cfg.vae.startswith("@") else None
        if src is None:
            return None
    return vae_config(str(src), cfg.vae_subfolder if isinstance(src, str) else None, ctx)


def build_tiny_decoder(cfg: Config, vae_config: dict[str, Any]) -> TinyDecoder:
    """The tiny decoder preset, reading the latent space (channels, scale, shift) from the VAE."""
    latent = dict(latent_channels=vae_config["latent_channels"], scaling_factor=vae_config["scaling_factor"],
                  shift_factor=vae_config.get("shift_factor") or 0.0)
    try:
        decoder = build_decoder(cfg.decoder, **{**latent, **cfg.decoder_overrides})
    except TypeError as exc:
        raise ConfigError(f"decoder_overrides: {exc}") from None
    f = downsampling_factor(vae_config)
    if decoder.upsampling_factor != f:
        raise ConfigError(f"decoder: {cfg.decoder!r} upsamples by {decoder.upsampling_factor} but the vae downsamples "
                          f"by {f}; set decoder_overrides.block_out_channels / layers_per_block with "
                          f"{f.bit_length()} entries")
    return decoder


def _discriminator(cfg: Config) -> PatchDiscriminator:
    try:
        return build_discriminator(cfg.discriminator, **cfg.discriminator_overrides)
    except TypeError as exc:
        raise ConfigError(f"discriminator_overrides: {exc}") from None


def _objective(cfg: Config) -> DecoderLoss:
    return DecoderLoss(mse_weight=cfg.mse_weight, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                       lpips_net=cfg.lpips_net, adv_weight=cfg.adv_weight, adv_loss=cfg.adv_loss,
                       adv_start_step=cfg.adv_start_step, r1_gamma=cfg.r1_gamma)


def _check_sizes(cfg: Config, factor: int) -> None:
    for key, size in (("patch_size", cfg.patch_size), ("eval_resolution", cfg.eval_resolution)):
        if size is not None and size % factor:
            raise ConfigError(f"{key}: {size} is not a multiple of the autoencoder's downsampling factor {factor}")


# ------------------------------------------------------------------------------ plan


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    """The models built on the meta device from their configs; no weights or data read."""
    outputs = [str(ctx.out_dir / "model_ema"), str(ctx.out_dir / "model")]
    outputs += [str(ctx.out_dir / EVAL_FILE)] if cfg.eval_images else []
    notes = (f"{cfg.patch_size}px patches, {cfg.steps} steps x {cfg.batch_size}; mse {cfg.mse_weight}, "
             f"lpips {cfg.lpips_weight}, adv {cfg.adv_weight} from step {cfg.adv_start_step}")
    with torch.device("meta"):
        disc = PlanItem(f"discriminator:{cfg.discriminator}", count_params(_discriminator(cfg)),
                        outputs=[str(ctx.out_dir / "discriminator")])
        if cfg.mode == "autoencoder":
            ae = build_autoencoder(cfg.autoencoder, **cfg.autoencoder_overrides)
            _check_sizes(cfg, downsampling_factor(ae.config))
            return [PlanItem(f"AutoencoderKL:{cfg.autoencoder} (joint, + KL {cfg.kl_weight})", count_params(ae),
                             [cfg.data], outputs, notes, provides={"vae_config": dict(ae.config)}), disc]
        vae_config = _vae_config(cfg, ctx)
        if vae_config is None:
            return [PlanItem(f"encoder AutoencoderKL {cfg.vae} (frozen)", None, [cfg.vae], [],
                             "config not available yet; resolved at run time"),
                    PlanItem(f"tiny decoder:{cfg.decoder}", None, [cfg.data], outputs, notes), disc]
        _check_sizes(cfg, downsampling_factor(vae_config))
        from diffusers import AutoencoderKL

        encoder = count_params(AutoencoderKL.from_config(vae_config).encoder)
        decoder = count_params(build_tiny_decoder(cfg, vae_config))
    return [PlanItem(f"encoder AutoencoderKL {cfg.vae} (frozen)", encoder, [cfg.vae], [],
                     f"{vae_config['latent_channels']} latent channels, f={downsampling_factor(vae_config)}"),
            PlanItem(f"tiny decoder:{cfg.decoder}", decoder, [cfg.data], outputs, notes), disc]


# ------------------------------------------------------------------------------ run


def _dataset(cfg: Config) -> ImageDataset:
    source = open_source(cfg.data, kind=cfg.data_kind, split=cfg.split, image_column=cfg.image_column,
                         caption_column=None)
    return ImageDataset(source, min_side=cfg.patch_size, resize=cfg.resize)


def _previews(cfg: Config, data: ImageDataset) -> torch.Tensor:
    """Fixed patches for the sample grids: held-out images if given, else training images."""
    if cfg.eval_images:
        return load_patches(list_images(cfg.eval_images, "eval_images")[:cfg.sample_count], cfg.patch_size)
    n = min(cfg.sample_count, len(data))
    return random_patches([data[i] for i in range(n)], cfg.patch_size, sample_generators(cfg.seed, 0, range(n)))


def _set_latent_statistics(cfg: Config, data: ImageDataset, out_dir: Path) -> dict[str, dict[str, float]]:
    """SD-style ``shift_factor`` / ``scaling_factor`` of each saved autoencoder, from the latents of
    ``latent_stats_batches`` batches of up to 32 patches (first images, crops from generators seeded by ``seed``)."""
    from diffusers import AutoencoderKL

    b = min(cfg.batch_size, 32)
    batches = []
    for k in range(cfg.latent_stats_batches):
        idx = [(k * b + j) % len(data) for j in range(b)]
        batches.append(random_patches([data[i] for i in idx], cfg.patch_size,
                                      sample_generators(cfg.seed, 0, range(k * b, (k + 1) * b))))
    factors = {}
    for sub in ("model_ema", "model"):
        ae = AutoencoderKL.from_pretrained(out_dir / sub).to(process_state().device).eval()
        shift, scale = latent_statistics(ae, batches)
        ae.register_to_config(shift_factor=shift, scaling_factor=scale)
        save_module(ae, out_dir / sub)
        factors[sub] = {"shift_factor": shift, "scaling_factor": scale}
    return factors


def _evaluate(cfg: Config, model: torch.nn.Module, vae, out_dir: Path, name: str) -> dict[str, Any]:
    """Table 2's comparison on ``eval_images``: ``name`` (EMA weights) vs the VAE's own decoder."""
    lpips = cfg.eval_lpips if cfg.eval_lpips is not None else cfg.lpips_weight > 0
    kw = dict(resolution=cfg.eval_resolution or cfg.patch_size, lpips=lpips, lpips_net=cfg.lpips_net)
    result = {name: evaluate_decoder(model, vae, cfg.eval_images, **kw), "images": str(cfg.eval_images)}
    if vae is not model:
        result["vae_decoder"] = evaluate_decoder(vae, vae, cfg.eval_images, **kw)
    atomic_write_json(out_dir / EVAL_FILE, result)
    return result


def run(cfg: Config, ctx: StageContext) -> dict:
    out = Path(ctx.out_dir)
    process_state()  # before train()'s Accelerator: a CPU launch is seen as one (loop.process_state)
    cfg = seeded(cfg, ctx)  # model initialisation follows the run's seed
    data = _dataset(cfg)
    objective = _objective(cfg)  # fails early (clear ConfigError) when LPIPS weights are missing
    common = dict(data=data, objective=objective, discriminator=_discriminator(cfg), patch_size=cfg.patch_size,
                  previews=_previews(cfg, data) if cfg.sample_every else None)
    if cfg.mode == "autoencoder":
        ae = build_autoencoder(cfg.autoencoder, **cfg.autoencoder_overrides)
        _check_sizes(cfg, downsampling_factor(ae.config))
        task = AutoencoderTask(ae, cfg.kl_weight, **common)
        vae = None
    else:
        vae = load_vae(cfg, ctx).eval().requires_grad_(False)
        _check_sizes(cfg, downsampling_factor(vae.config))
        decoder = build_tiny_decoder(cfg, dict(vae.config))
        task = TinyDecoderTask(decoder, vae, sample_latents=cfg.latent == "sample", **common)
    summary = {"mode": cfg.mode, **train(task, cfg, out, resume=cfg.resume, console=ctx.console)}
    if data.skipped:
        summary["skipped_images"] = {str(i): reason for i, reason in sorted(data.skipped.items())}
    if is_main_process():  # the others wait (through base's long-timeout group) while it evaluates
        if cfg.mode == "autoencoder":
            summary["latent_factors"] = _set_latent_statistics(cfg, data, out)
        if cfg.eval_images:
            summary["eval"] = _eval_saved(cfg, out, vae)
    wait_for_everyone()
    return summary


def _eval_saved(cfg: Config, out: Path, vae) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    device = process_state().device
    if cfg.mode == "autoencoder":
        ae = AutoencoderKL.from_pretrained(out / "model_ema").to(device).eval()
        return _evaluate(cfg, ae, ae, out, "autoencoder")
    decoder = TinyDecoder.from_pretrained(out / "model_ema").to(device).eval()
    return _evaluate(cfg, decoder, vae.to(device), out, "tiny_decoder")
