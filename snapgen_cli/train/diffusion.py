"""The denoising task that ``pretrain`` and ``finetune`` train (and ``distill`` extends).

A :class:`DiffusionTask` reads precomputed shards (``snapgen precompute``), noises the
latents with the recipe's objective -- rectified flow (sec. 3.3, Eq. 1-2; logit-normal
timesteps, shift 3) or DDPM (sup. H) -- and regresses the UNet's prediction onto the target.
Text conditioning is the SD3-style combination of the stored per-encoder features
(``core.text.combine``), each encoder dropped independently with ``p_drop = 0.464``
(sec. 4 "Hyper-parameters"). For class-conditional shards (ImageNet, sup. H) the text is
"a photo of <class name>" with a random synonym of the label each time.

All randomness of a sample (timestep, noise, encoder dropout, synonym) comes from that
sample's generator (``StepContext.generators``), so resume and multi-process runs are exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..core.decoder import TinyDecoder
from ..core.flow import make_objective
from ..core.pipeline import SnapGenPipeline, load_autoencoder
from ..core.text import TextEncoderStack, TextLayout, combine, parse_specs, sample_keep
from ..core.unet import SnapGenUNet, unet_config
from ..data.images import image_grid
from ..data.shards import ClassText, ShardDataset, encoder_features, encoder_specs, read_manifest
from ..errors import ConfigError
from ..files import find_model_dir
from .loop import LoopConfig, StepContext, TrainTask


class DiffusionConfig(LoopConfig):
    """Settings shared by ``pretrain`` and ``finetune`` (plus every loop setting)."""

    data: str | None = Field(None, description="precompute output dir (default: the previous stage's output)")
    resolution: int = Field(256, gt=0, description="which precomputed latents to train on (latents.<res>)")
    model: str = Field("snapgen-t2i", description="UNet preset when not initialising from a checkpoint")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="UNet config keys to override")
    init_from: str | None = Field(None, description='checkpoint/stage dir to start from; "previous" for the previous stage')
    init_weights: Literal["ema", "raw"] = "ema"
    objective: Literal["flow", "ddpm"] = "flow"
    shift: float = Field(3.0, gt=0, description="SD3 time shift (flow), training and inference")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    p_drop: float = Field(0.464, ge=0, le=1, description="per-encoder dropout probability (CFG)")
    decoder: str | None = Field(None, description="tiny decoder dir for sample grids and the saved pipeline")
    vae: str | None = Field(None, description="override the latent space's AutoencoderKL (default: from the shards)")
    resume: str | None = Field("auto", description='"auto": continue from the latest checkpoint in the output dir; a checkpoint path; null: start fresh')
    sample_prompts: list[str] = Field(default_factory=list)
    sample_steps: int = Field(28, gt=0)
    sample_guidance: float = Field(4.5, gt=0)


def _subdir(weights: str) -> tuple[str, ...]:
    """Where a training stage's output keeps the weights ``init_weights`` asks for (EMA: the
    pipeline's ``unet/``; ``model_ema/`` of other stages' outputs), preferred first."""
    return ("unet", "model_ema", "model") if weights == "ema" else ("model",)


def init_unet_dir(init_dir: Path, weights: str) -> Path:
    """The saved UNet a stage initialises from (a pipeline dir's ``unet/`` for EMA weights)."""
    return find_model_dir(init_dir, _subdir(weights), "init_from")


def fresh_unet_config(cfg: DiffusionConfig, latent_channels: int, layout: TextLayout) -> dict:
    """The config of a UNet trained from scratch: the preset, the data's latent channels and
    text widths, then ``model_overrides``."""
    return unet_config(cfg.model, in_channels=latent_channels, out_channels=latent_channels,
                       **layout.unet_kwargs(), **cfg.model_overrides)


def build_from_config(config: dict) -> SnapGenUNet:
    try:
        return SnapGenUNet(**config)
    except TypeError as exc:
        raise ConfigError(f"model_overrides: {exc}") from None


def check_unet_fits(config, latent_channels: int, layout: TextLayout, data_dir: Path) -> None:
    """The UNet's input channels and text widths must be the data's."""
    want = dict(context_dim=layout.context_dim, pooled_dim=layout.pooled_dim, in_channels=latent_channels)
    bad = {k: (config[k], v) for k, v in want.items() if config[k] != v}
    if bad:
        raise ConfigError(f"the UNet does not fit the data in {data_dir}: " +
                          ", ".join(f"{k}={m} but the shards need {d}" for k, (m, d) in bad.items()))


class DiffusionTask(TrainTask):
    main = "unet"
    ema_dir = "unet"  # the output dir is a SnapGenPipeline: its unet/ holds the EMA weights

    def __init__(self, cfg: DiffusionConfig, data_dir: Path, init_dir: Path | None, console=None):
        self.cfg, self.data_dir, self.console = cfg, Path(data_dir), console
        self.manifest = read_manifest(self.data_dir)
        self.key = f"latents.{cfg.resolution}"
        if cfg.resolution not in self.manifest["resolutions"]:
            raise ConfigError(f"resolution: {cfg.resolution} not precomputed in {self.data_dir} "
                              f"(has {self.manifest['resolutions']})")
        self.specs = parse_specs(encoder_specs(self.manifest, "student"), "encoders")
        if not self.specs:
            raise ConfigError(f"{self.data_dir}: the shards hold no text features (precompute with --encoders)")
        self.layout = TextLayout.from_specs(self.specs)
        self.class_text = ClassText(self.data_dir) if self.manifest.get("classes") else None
        self.objective = make_objective(cfg.objective, **self._objective_kwargs())
        self.unet = self._build_unet(init_dir)
        self.latent = dict(self.manifest["latent"], **({"vae": cfg.vae, "subfolder": None} if cfg.vae else {}))
        self.decoder = self._load_decoder()  # now: a bad --decoder / --vae fails before training, not after
        self._texts: TextEncoderStack | None = None

    def _load_decoder(self):
        """The pipeline's decoder: the tiny decoder (``decoder``) or the latent space's AutoencoderKL."""
        if self.cfg.decoder:
            return TinyDecoder.from_pretrained(find_model_dir(self.cfg.decoder, what="decoder"))
        if not self.latent.get("vae"):
            raise ConfigError(f"{self.data_dir}: the shards name no autoencoder; pass --decoder or --vae")
        return load_autoencoder(self.latent["vae"], self.latent.get("subfolder"))

    def _objective_kwargs(self) -> dict:
        c = self.cfg
        return dict(shift=c.shift, logit_mean=c.logit_mean, logit_std=c.logit_std) if c.objective == "flow" else {}

    def _build_unet(self, init_dir: Path | None) -> SnapGenUNet:
        channels = self.manifest["latent"]["channels"]
        if init_dir is not None:
            unet = SnapGenUNet.from_pretrained(init_unet_dir(init_dir, self.cfg.init_weights))
        else:
            unet = build_from_config(fresh_unet_config(self.cfg, channels, self.layout))
        check_unet_fits(unet.config, channels, self.layout, self.data_dir)
        return unet

    # -- TrainTask ------------------------------------------------------------------------

    def trainables(self):
        return {"unet": self.unet}

    def dataset(self):
        fields = [self.key] + (["label"] if self.class_text else
                               [k for k in self.manifest["tensors"] if k.split(".")[0] in self.layout.names])
        return ShardDataset(self.data_dir, fields=fields)

    def collate(self, items):
        return torch.utils.data.default_collate([{k: v for k, v in it.items() if k not in ("key", "caption")}
                                                 for it in items])

    def text_features(self, batch: dict, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        if self.class_text is None:
            return encoder_features(batch, self.manifest, "student")
        rows = [self.class_text.sample(batch["label"][i:i + 1].cpu(), generator=g) for i, g in enumerate(gens)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def condition(self, batch: dict, ctx: StepContext):
        """(context, pooled, mask) with per-encoder dropout, drawn from the per-sample generators."""
        feats = self.text_features(batch, ctx.generators)
        keep = sample_keep(self.layout.names, self.cfg.p_drop, ctx.generators)
        return combine(feats, self.layout, keep, device=ctx.device)

    def noised(self, batch: dict, ctx: StepContext):
        """(x0, t, x_t, target): Eq. 1-2 (flow) or DDPM, randomness from the sample generators."""
        x0 = batch[self.key].to(ctx.device, torch.float32)
        t = self.objective.sample_timesteps(len(x0), generator=ctx.generators, device=ctx.device)
        noise = ctx.randn(*x0.shape[1:])
        return x0, t, self.objective.noisy(x0, noise, t), self.objective.target(x0, noise, t)

    def loss(self, phase, batch, ctx):
        x0, t, xt, target = self.noised(batch, ctx)
        context, pooled, mask = self.condition(batch, ctx)
        pred = ctx.models["unet"](xt, self.objective.model_timestep(t), context, pooled, encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred.float(), target.float())  # Eq. 2
        return loss, {"task": loss.detach()}

    # -- pipeline and sample grids ---------------------------------------------------------

    def pipeline(self, unet: SnapGenUNet) -> SnapGenPipeline:
        """The text-to-image pipeline of ``unet`` with this stage's text encoders, sampler and decoder."""
        if self._texts is None:
            self._texts = TextEncoderStack(self.specs)
        pipe = SnapGenPipeline(unet=unet, scheduler=self.objective.scheduler(1), text_encoder=self._texts,
                               decoder=self.decoder, resolution=self.cfg.resolution, latent=self.latent)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pipeline(self, out_dir: Path) -> None:
        """Write ``out_dir`` as a pipeline dir (``SnapGenPipeline.from_pretrained(out_dir)``)
        around the EMA UNet the loop saved in ``out_dir/unet``."""
        self.pipeline(SnapGenUNet.from_pretrained(Path(out_dir) / self.ema_dir)).save_pretrained(out_dir)

    def sample_grid(self, model, step):
        if not self.cfg.sample_prompts:
            return None
        device = next(model.parameters()).device
        pipe = self.pipeline(model).to(device)
        was_training = model.training
        gens = [torch.Generator().manual_seed(i) for i in range(len(self.cfg.sample_prompts))]
        images = pipe(self.cfg.sample_prompts, num_inference_steps=self.cfg.sample_steps,
                      guidance_scale=self.cfg.sample_guidance, generator=gens).images
        model.train(was_training)
        return image_grid(images)
