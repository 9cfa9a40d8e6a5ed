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
from pydantic import Field

from ..config import PREVIOUS_OR_PATH, UNSET_IS_PREVIOUS
from ..core import denoiser
from ..core.decoder import TinyDecoder
from ..core.flow import make_objective
from ..core.losses import task_loss
from ..core.pipeline import SnapGenPipeline, load_autoencoder
from ..core.text import TextEncoderStack, TextLayout, combine, parse_specs, sample_keep
from ..data.images import image_grid
from ..data.shards import (
    ClassText,
    ShardDataset,
    encoder_features,
    encoder_names,
    encoder_specs,
    read_manifest,
)
from ..errors import ConfigError
from ..files import find_model_dir
from .loop import LoopConfig, StepContext, TrainTask


class DiffusionConfig(LoopConfig):
    """Settings shared by ``pretrain`` and ``finetune`` (plus every loop setting)."""

    data: str | None = Field(None, description="precompute output dir (default: the previous stage's output)",
                             json_schema_extra=UNSET_IS_PREVIOUS)
    resolution: int = Field(256, gt=0, description="which precomputed latents to train on (latents.<res>)")
    model: str = Field("snapgen-t2i", description="UNet preset (or an SD3 DiT preset: sd3-tiny, sd35-medium, sd35-large) "
                                                  "when not initialising from a checkpoint")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="UNet config keys to override")
    init_from: str | None = Field(None, description='checkpoint/stage dir to start from; "previous" for the previous stage',
                                  json_schema_extra=PREVIOUS_OR_PATH)
    init_weights: Literal["ema", "raw"] = "ema"
    objective: Literal["flow", "ddpm"] = "flow"
    shift: float = Field(3.0, gt=0, description="SD3 time shift (flow), training and inference")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    p_drop: float = Field(0.464, ge=0, le=1, description="per-encoder dropout probability (CFG)")
    text_role: Literal["student", "teacher"] = Field("student", description="which precomputed text features "
                                                     "condition the model (teacher: train a teacher on its own)")
    decoder: str | None = Field(None, description="tiny decoder dir for sample grids and the saved pipeline")
    vae: str | None = Field(None, description="override the latent space's AutoencoderKL (default: from the shards)")
    resume: str | None = Field("auto", description='"auto": continue from the latest checkpoint in the output dir; '
                                                   "a checkpoint path; another run's output dir (its latest "
                                                   "checkpoint); null: start fresh")
    sample_prompts: list[str] = Field(default_factory=list)
    sample_steps: int = Field(28, gt=0)
    sample_guidance: float = Field(4.5, gt=0)


def _subdir(weights: str) -> tuple[str, ...]:
    """Where a training stage's output keeps the weights ``init_weights`` asks for (EMA: the
    pipeline's ``unet/``; ``model_ema/`` of other stages' outputs), preferred first."""
    return ("unet", "model_ema", "model") if weights == "ema" else ("model",)


def init_unet_dir(init_dir: Path, weights: str) -> Path:
    """The saved denoiser a stage initialises from (a pipeline dir's ``unet/`` for EMA weights)."""
    return find_model_dir(init_dir, _subdir(weights), "init_from")


class TextRole:
    """One role's text features in the shards (``"student"`` or ``"teacher"``, see precompute):
    its encoder specs in order, their layout, and the stored tensor names."""

    def __init__(self, manifest: dict, role: str, data_dir: Path):
        self.role, self.names = role, encoder_names(manifest, role)
        self.specs = parse_specs(encoder_specs(manifest, role), f"{role} encoders")
        if not self.specs:
            flag = "--encoders" if role == "student" else "--teacher-encoders"
            raise ConfigError(f"{data_dir}: the shards hold no {role} text features (precompute with {flag})")
        self.layout = TextLayout.from_specs(self.specs)

    def fields(self, manifest: dict) -> list[str]:
        return [k for k in manifest["tensors"] if k.split(".")[0] in self.names.values()]

    def features(self, stored: dict, manifest: dict) -> dict[str, torch.Tensor]:
        """The role's features under its spec names (``combine``'s input)."""
        return encoder_features(stored, manifest, self.role)


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
        self.class_text = ClassText(self.data_dir) if self.manifest.get("classes") else None
        self.text = TextRole(self.manifest, cfg.text_role, self.data_dir)
        self.specs, self.layout = self.text.specs, self.text.layout
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

    def _build_unet(self, init_dir: Path | None):
        channels = self.manifest["latent"]["channels"]
        if init_dir is not None:
            unet = denoiser.load(init_unet_dir(init_dir, self.cfg.init_weights))
        else:
            unet = denoiser.build(denoiser.fresh_config(self.cfg.model, channels, self.layout, self.cfg.model_overrides))
        denoiser.check_fits(unet.config, channels, self.layout, self.data_dir)
        return unet

    # -- TrainTask ------------------------------------------------------------------------

    def trainables(self):
        return {"unet": self.unet}

    def text_roles(self) -> list[TextRole]:
        """The text features a batch must carry (distillation adds the teacher's)."""
        return [self.text]

    def dataset(self):
        fields = [self.key] + (["label"] if self.class_text else
                               list(dict.fromkeys(f for r in self.text_roles() for f in r.fields(self.manifest))))
        return ShardDataset(self.data_dir, fields=fields)

    def collate(self, items):
        return torch.utils.data.default_collate([{k: v for k, v in it.items() if k not in ("key", "caption")}
                                                 for it in items])

    def text_features(self, batch: dict, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """The stored text features of the batch (class-conditional data: one random synonym of
        each label's class, drawn from the sample's generator)."""
        if self.class_text is None:
            return batch
        rows = [self.class_text.sample(batch["label"][i:i + 1].cpu(), generator=g) for i, g in enumerate(gens)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def condition(self, batch: dict, ctx: StepContext, stored: dict | None = None, keep: dict | None = None):
        """(context, pooled, mask) with per-encoder dropout (sec. 4), drawn from the per-sample
        generators; ``stored`` / ``keep``: features and flags already drawn for this batch."""
        stored = self.text_features(batch, ctx.generators) if stored is None else stored
        keep = sample_keep(self.layout.names, self.cfg.p_drop, ctx.generators) if keep is None else keep
        return combine(self.text.features(stored, self.manifest), self.layout, keep, device=ctx.device)

    def noised(self, batch: dict, ctx: StepContext):
        """(x0, t, x_t, target): Eq. 1-2 (flow) or DDPM, randomness from the sample generators."""
        x0 = batch[self.key].to(ctx.device, torch.float32)
        t = self.objective.sample_timesteps(len(x0), generator=ctx.generators, device=ctx.device)
        noise = ctx.randn(*x0.shape[1:])
        return x0, t, self.objective.noisy(x0, noise, t), self.objective.target(x0, noise, t)

    def forward_macs(self) -> int:
        """MACs of one denoiser forward for one sample at this stage's resolution and text layout
        (:func:`~snapgen_cli.core.denoiser.forward_macs`; the loop's MFU). Only the trained
        denoiser's: a frozen distillation teacher's forward is not counted."""
        lat = self.cfg.resolution // int(self.latent.get("downsample", 8))
        return denoiser.forward_macs(self.unet.config, lat, self.layout)

    def loss(self, phase, batch, ctx):
        x0, t, xt, target = self.noised(batch, ctx)
        context, pooled, mask = self.condition(batch, ctx)
        pred, _ = denoiser.denoise(ctx.models["unet"], xt, self.objective.model_timestep(t), (context, pooled, mask))
        loss = task_loss(pred, target).mean()  # Eq. 2
        return loss, {"task": loss.detach()}

    # -- pipeline and sample grids ---------------------------------------------------------

    def pipeline(self, unet) -> SnapGenPipeline:
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
        self.pipeline(denoiser.load(Path(out_dir) / self.ema_dir)).save_pretrained(out_dir)

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
