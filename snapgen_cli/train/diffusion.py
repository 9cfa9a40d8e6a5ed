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

from ..core.flow import make_objective
from ..core.pipeline import PipelineSpec, SnapGenPipeline, image_grid
from ..core.text import TextLayout, combine, parse_specs
from ..core.unet import SnapGenUNet, unet_config
from ..data.shards import ClassText, ShardDataset, encoder_features, read_manifest
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
    return ("model_ema", "model") if weights == "ema" else ("model", "model_ema")


class DiffusionTask(TrainTask):
    main = "unet"

    def __init__(self, cfg: DiffusionConfig, data_dir: Path, init_dir: Path | None, console=None):
        self.cfg, self.data_dir, self.console = cfg, Path(data_dir), console
        self.manifest = read_manifest(self.data_dir)
        self.key = f"latents.{cfg.resolution}"
        if cfg.resolution not in self.manifest["resolutions"]:
            raise ConfigError(f"resolution: {cfg.resolution} not precomputed in {self.data_dir} "
                              f"(has {self.manifest['resolutions']})")
        specs_by_name = self.manifest["encoders"]["specs"]
        self.specs = parse_specs([specs_by_name[n] for n in self.manifest["encoders"]["student"]], "encoders")
        if not self.specs:
            raise ConfigError(f"{self.data_dir}: the shards hold no text features (precompute with --encoders)")
        self.layout = TextLayout.from_specs(self.specs)
        self.class_text = ClassText(self.data_dir) if self.manifest.get("classes") else None
        self.objective = make_objective(cfg.objective, **self._objective_kwargs())
        self.unet = self._build_unet(init_dir)

    def _objective_kwargs(self) -> dict:
        c = self.cfg
        return dict(shift=c.shift, logit_mean=c.logit_mean, logit_std=c.logit_std) if c.objective == "flow" else {}

    def _build_unet(self, init_dir: Path | None) -> SnapGenUNet:
        lat = self.manifest["latent"]
        if init_dir is not None:
            unet = SnapGenUNet.from_pretrained(find_model_dir(init_dir, _subdir(self.cfg.init_weights), "init_from"))
        else:
            cfg = unet_config(self.cfg.model, in_channels=lat["channels"], out_channels=lat["channels"],
                              **self.layout.unet_kwargs(), **self.cfg.model_overrides)
            try:
                unet = SnapGenUNet(**cfg)
            except TypeError as exc:
                raise ConfigError(f"model_overrides: {exc}") from None
        c = unet.config
        want = dict(context_dim=self.layout.context_dim, pooled_dim=self.layout.pooled_dim, in_channels=lat["channels"])
        bad = {k: (getattr(c, k), v) for k, v in want.items() if getattr(c, k) != v}
        if bad:
            raise ConfigError(f"the UNet does not fit the data in {self.data_dir}: " +
                              ", ".join(f"{k}={m} but the shards need {d}" for k, (m, d) in bad.items()))
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
        gens = ctx.generators
        feats = self.text_features(batch, gens)
        keep = {n: torch.stack([torch.rand((), generator=g) >= self.cfg.p_drop for g in gens])
                for n in self.layout.names}
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

    def pipeline_spec(self) -> PipelineSpec:
        lat = dict(self.manifest["latent"])
        if self.cfg.vae:
            lat.update(vae=self.cfg.vae, subfolder=None)
        return PipelineSpec(unet="model_ema", text_encoders=[s.model_dump(mode="json") for s in self.specs],
                            latent=lat, decoder=self.cfg.decoder,
                            objective=dict(name=self.cfg.objective, **self._objective_kwargs()),
                            resolution=self.cfg.resolution)

    def sample_grid(self, model, step):
        if not self.cfg.sample_prompts:
            return None
        if not hasattr(self, "_pipe"):
            from ..core.pipeline import load_latent_decoder
            from ..core.text import TextEncoderStack

            spec = self.pipeline_spec()
            texts = TextEncoderStack(self.specs)
            dec = load_latent_decoder(spec.latent, spec.decoder)
            self._pipe = SnapGenPipeline(model, texts, texts.layout, dec, spec.objective, spec.resolution,
                                         spec.latent["channels"], spec.latent.get("downsample", 8))
        self._pipe.unet = model
        device = next(model.parameters()).device
        self._pipe.texts.to(device)
        self._pipe.decoder.to(device)
        was_training = model.training
        images = self._pipe(self.cfg.sample_prompts, seed=0, steps=self.cfg.sample_steps,
                            guidance=self.cfg.sample_guidance)
        model.train(was_training)
        return image_grid(images)
