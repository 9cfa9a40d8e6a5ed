"""``snapgen precompute``: images + captions -> AE latent and text-embedding shards
(paper sec. 4 and sup. H: "we pre-compute both the image latent and the text embeddings,
which reduces the GPU memory and non-trivial computation time during training").

Decisions where the paper is silent:

* **Latents** are ``(latent_dist.mean - shift_factor) * scaling_factor`` of any diffusers
  ``AutoencoderKL`` (default the SD3 VAE: 16 channels, f = 8), i.e. the posterior mean,
  not a sample: deterministic (a resumed or re-run shard is bit-identical) and, for the SD3
  AE, the posterior std is tiny, so a frozen sample would only add fixed noise.
  ``latent="sample"`` draws one sample per image from a generator seeded by (seed, index).
* **Several resolutions** from one pass: each image is resized + cropped for every
  resolution separately; an image is kept only if it is usable at all of them (so shards stay
  aligned), and by default it must not need upsampling for the largest (``min_side``).
* **Text features** are stored as ``TextEncoderStack.encode`` returns them, for the union of the
  student's ``encoders`` and the teacher's ``teacher_encoders`` (an encoder in both, same spec,
  is encoded once). An empty caption is kept (a valid unconditional sample) and counted; a
  missing caption is stored as ``""`` and counted; a caption longer than an encoder's
  ``max_length`` is truncated by its tokenizer and counted. Class-conditional sources
  (ImageNet, sup. H) get ``class_text.safetensors``: the features of
  ``class_template.format(synonym)`` for every synonym of every class, so training can pick a
  random synonym each step; their per-sample shards hold no text.
* **Resume**: shard ``i`` always holds source indices ``[i*shard_size, (i+1)*shard_size)``; a
  shard is done when its record file exists and its checksum matches. A re-run skips done
  shards, redoes the rest, and writes ``manifest.json`` at the end. ``precompute.json`` pins the
  settings that change the output; resuming with different ones is refused.
* **Multi-process** (``accelerate launch``): process ``r`` of ``W`` encodes shards ``i % W == r``;
  the main process writes the manifest after a barrier.
* **Precision**: the AE and text encoders run in ``compute_dtype`` (fp32 default: SDXL-family
  AEs overflow in fp16); features are stored in ``dtype`` (fp16 default).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..core.text import EncoderSpec, TextEncoderStack, resolve_encoders
from ..data import shards
from ..data.images import DEFAULT_MAX_PIXELS, ImageSkipped, ImageStats, open_image, resize_crop, sample_rng, to_tensor
from ..data.sources import Sample, Source, open_source
from ..errors import ConfigError, SnapgenError
from .base import PlanItem, StageConfig, StageContext, atomic_write_json

SD3_VAE = "stabilityai/stable-diffusion-3-medium-diffusers"
RUN_CONFIG = "precompute.json"
# Settings that do not change the output; a resumed run may use other values.
_RUNTIME_ONLY = {"batch_size", "num_workers", "device", "compute_dtype"}


class Config(StageConfig):
    """Every setting of ``snapgen precompute`` (one flag each)."""

    source: str = Field(description="image folder, save_to_disk folder, WebDataset tar(s) or hub dataset name")
    source_kind: Literal["auto", "hf", "folder", "webdataset"] = "auto"
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = "text"
    label_column: str | None = None
    class_template: str = "a photo of {}"
    streaming: bool = False
    resolutions: list[int] = Field(default_factory=lambda: [256])
    crop: Literal["center", "random"] = "center"
    min_side: int | None = Field(None, description="skip images whose shorter side is smaller (default: max resolution)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    vae: str = SD3_VAE
    vae_subfolder: str | None = "vae"
    latent: Literal["mean", "sample"] = "mean"
    encoders: list[EncoderSpec] | str = "clip-l"
    teacher_encoders: list[EncoderSpec] | str | None = None
    batch_size: int = Field(32, gt=0)
    shard_size: int = Field(1024, gt=0)
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    compute_dtype: Literal["fp16", "bf16", "fp32"] = "fp32"
    max_samples: int | None = Field(None, gt=0)
    seed: int | None = None
    device: str = "auto"
    num_workers: int = Field(4, ge=0, description="threads decoding and resizing images")

    @field_validator("resolutions")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
        if not v or any(r <= 0 for r in v):
            raise ValueError(f"expected a non-empty list of positive resolutions, got {v}")
        return sorted(set(v))


def _specs(cfg: Config) -> tuple[list[EncoderSpec], list[str], list[str]]:
    """Union of student and teacher encoder specs (deduplicated by name) + each role's names."""
    student = resolve_encoders(cfg.encoders)
    teacher = resolve_encoders(cfg.teacher_encoders) if cfg.teacher_encoders else []
    merged: dict[str, EncoderSpec] = {}
    for spec in [*student, *teacher]:
        if spec.name in merged and merged[spec.name] != spec:
            raise ConfigError(f"teacher_encoders: {spec.name!r} names a different encoder than encoders' {spec.name!r}; "
                              "give it another name")
        merged[spec.name] = spec
    return list(merged.values()), [s.name for s in student], [s.name for s in teacher]


def _vae_location(cfg: Config) -> tuple[str, str | None]:
    """A local folder that holds ``config.json`` itself needs no subfolder."""
    local = Path(cfg.vae)
    if local.is_dir() and cfg.vae_subfolder and not (local / cfg.vae_subfolder).is_dir() and (local / "config.json").exists():
        return cfg.vae, None
    return cfg.vae, cfg.vae_subfolder


def load_vae(cfg: Config):
    from diffusers import AutoencoderKL

    path, sub = _vae_location(cfg)
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=sub)
    except Exception as e:  # noqa: BLE001 - offline hub, bad folder, wrong class: all a bad --vae
        where = f"{path!r}" + (f" (subfolder {sub!r})" if sub else "")
        raise ConfigError(f"vae: cannot load an AutoencoderKL from {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                          "pass --vae a local diffusers AutoencoderKL folder (and --vae-subfolder if it is nested)") from None


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    """The AE built on the meta device from its config when that config is on disk; no data read."""
    from diffusers import AutoencoderKL

    from ..core.measure import count_params

    path, sub = _vae_location(cfg)
    params, note = None, f"latents {cfg.latent} at {cfg.resolutions}, {cfg.dtype}"
    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder=sub, local_files_only=True))
        params = count_params(vae)
    except Exception as e:  # noqa: BLE001
        note += f"; config not available locally ({type(e).__name__}), resolved at run time"
    specs, student, teacher = _specs(cfg)
    out = [str(ctx.out_dir / "shard-*.safetensors"), str(ctx.out_dir / shards.MANIFEST)]
    return [PlanItem(f"AutoencoderKL {cfg.vae}", params, [cfg.source], out, note),
            *[PlanItem(f"text encoder {s.name} ({'teacher' if s.name in teacher and s.name not in student else 'student'})",
                       None, [s.path], [], f"max_length {s.max_length}") for s in specs]]


class _Encoder:
    """Turns a list of samples into one shard's tensors (images -> latents, captions -> text)."""

    def __init__(self, cfg: Config, vae, text: TextEncoderStack | None, seed: int, device: torch.device):
        self.cfg, self.vae, self.text, self.seed, self.device = cfg, vae, text, seed, device
        self.dtype = shards.DTYPES[cfg.dtype]
        self.min_side = max(cfg.resolutions) if cfg.min_side is None else cfg.min_side
        vc = vae.config
        self.shift = float(getattr(vc, "shift_factor", None) or 0.0)
        self.scale = float(vc.scaling_factor)
        self.factor = 2 ** (len(vc.block_out_channels) - 1)
        bad = [r for r in cfg.resolutions if r % self.factor]
        if bad:
            raise ConfigError(f"resolutions: {bad} are not multiples of the AE's downsampling factor {self.factor}")
        self.pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers else None

    def _prepare(self, sample: Sample) -> tuple[Sample, dict | None, ImageStats]:
        stats = ImageStats()
        try:
            if sample.image is None:
                raise ImageSkipped("no_image")
            img = open_image(sample.image, max_pixels=self.cfg.max_pixels, min_side=self.min_side, stats=stats)
        except ImageSkipped as e:
            stats.skipped[e.reason] += 1
            return sample, None, stats
        rng = sample_rng(self.seed, sample.index)
        views = {r: resize_crop(img, r, crop=self.cfg.crop, rng=rng) for r in self.cfg.resolutions}
        return sample, {r: (to_tensor(v), c) for r, (v, c) in views.items()}, stats

    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor, indices: list[int]) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean
        if self.cfg.latent == "sample":
            noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
                                 for i in indices]).to(z)
            z = z + dist.std * noise
        return ((z - self.shift) * self.scale).to("cpu", self.dtype)

    def text_features(self, captions: list[str]) -> dict[str, torch.Tensor]:
        feats: dict[str, list[torch.Tensor]] = {}
        for i in range(0, max(len(captions), 1), self.cfg.batch_size):
            batch = captions[i:i + self.cfg.batch_size] or [""]
            for k, v in self.text.encode(batch).items():
                feats.setdefault(k, []).append(v.to("cpu", self.dtype if v.is_floating_point() else v.dtype))
        return {k: torch.cat(v)[:len(captions)] for k, v in feats.items()}

    def encode_shard(self, samples: list[Sample], advance) -> tuple[dict[str, torch.Tensor], list[Sample], ImageStats, dict]:
        stats, kept, views = ImageStats(), [], []
        prepared = self.pool.map(self._prepare, samples) if self.pool else map(self._prepare, samples)
        for sample, view, s in prepared:
            stats.merge(s)
            if view is not None:
                kept.append(sample)
                views.append(view)
        out: dict[str, torch.Tensor] = {
            "index": torch.tensor([s.index for s in kept], dtype=torch.int64),
            "original_size": torch.tensor([list(v[self.cfg.resolutions[0]][1].original) for v in views],
                                          dtype=torch.int32).reshape(-1, 2)}
        if any(s.label is not None for s in samples):
            out["label"] = torch.tensor([-1 if s.label is None else s.label for s in kept], dtype=torch.int64)
        for r in self.cfg.resolutions:
            lat = [self._latents(torch.stack([v[r][0] for v in views[i:i + self.cfg.batch_size]]),
                                 [s.index for s in kept[i:i + self.cfg.batch_size]])
                   for i in range(0, len(views), self.cfg.batch_size)]
            h = r // self.factor
            out[f"latents.{r}"] = torch.cat(lat) if lat else torch.zeros(0, self.vae.config.latent_channels, h, h, dtype=self.dtype)
            out[f"crop.{r}"] = torch.tensor([[v[r][1].top, v[r][1].left] for v in views], dtype=torch.int32).reshape(-1, 2)
        caption_stats: dict[str, int] = {}
        if self.text is not None and samples and self._has_captions:
            captions = [s.caption or "" for s in kept]
            caption_stats = {"missing": sum(s.caption is None for s in kept),
                             "empty": sum(s.caption == "" for s in kept),
                             "truncated": sum(self.text.count_truncated(captions).values())}
            out.update(self.text_features(captions))
        advance(len(samples))
        return out, kept, stats, {k: v for k, v in caption_stats.items() if v}

    _has_captions = True


def _check_run_config(cfg: Config, out: Path, state: PartialState) -> None:
    """Pin the output-changing settings; refuse to resume into a folder made with others."""
    pinned = cfg.model_dump(mode="json", exclude=_RUNTIME_ONLY)
    path = out / RUN_CONFIG
    if state.is_main_process and not path.exists():
        atomic_write_json(path, pinned)
    state.wait_for_everyone()
    previous = json.loads(path.read_text())
    if diff := sorted(k for k in set(previous) | set(pinned) if previous.get(k) != pinned.get(k)):
        raise ConfigError(f"out: {out} holds shards made with other settings ({', '.join(diff)} differ); "
                          "use a new --out, or the same settings to resume")


def _pending(source: Source, size: int, out: Path, rank: int, world: int):
    """(shard id, samples) of this process's shards that are not done yet, in order."""
    todo = lambda sid: sid % world == rank and shards.completed_shard(out, sid) is None  # noqa: E731
    n = source.num_samples
    if n is not None:
        for sid in range(math.ceil(n / size)):
            if todo(sid):
                yield sid, list(source.iter_range(sid * size, (sid + 1) * size))
        return
    done = {r["id"] for r in shards.shard_records(out)}
    first = next(s for s in itertools.count(rank, world) if s not in done)
    for sid, group in itertools.groupby(source.iter_range(first * size), key=lambda s: s.index // size):
        if todo(sid):
            yield sid, list(group)


def _class_text(enc: _Encoder, names: list[list[str]], template: str, out: Path) -> dict:
    """Text features of ``template.format(synonym)`` for every class synonym (sup. H)."""
    classes: dict = {"names": names, "template": template, "file": None, "sha256": None}
    if enc.text is None:
        return classes
    owner = [c for c, syns in enumerate(names) for _ in syns]
    prompts = [template.format(s) for syns in names for s in syns]
    tensors = {**enc.text_features(prompts), "class": torch.tensor(owner, dtype=torch.int64)}
    rec = shards.write_tensors(out / shards.CLASS_TEXT, tensors, {"prompts": prompts})
    return {**classes, "file": rec["file"], "sha256": rec["sha256"], "num_prompts": len(prompts)}


def _progress(ctx: StageContext, enabled: bool) -> Progress:
    speed = TextColumn("{task.fields[rate]}")
    return Progress(TextColumn("precompute"), BarColumn(), MofNCompleteColumn(), speed, TimeElapsedColumn(),
                    console=ctx.console, disable=not enabled, transient=False)


def run(cfg: Config, ctx: StageContext) -> dict:
    """Encode the source into ``ctx.out_dir``; return the summary (counts, skips, out dir)."""
    t0 = time.perf_counter()
    state = PartialState()
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    source = open_source(cfg.source, kind=cfg.source_kind, split=cfg.split, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, label_column=cfg.label_column, streaming=cfg.streaming,
                         max_samples=cfg.max_samples)
    specs, student, teacher = _specs(cfg)
    _check_run_config(cfg, out, state)
    from ..core.measure import resolve_device

    device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
    compute = shards.DTYPES[cfg.compute_dtype]
    vae = load_vae(cfg).to(device, compute).eval().requires_grad_(False)
    needs_text = bool(specs) and (source.has_captions or source.label_names is not None)
    text = TextEncoderStack(specs, device=device, dtype=compute) if needs_text else None
    enc = _Encoder(cfg, vae, text, seed, device)
    enc._has_captions = source.has_captions

    with _progress(ctx, state.is_main_process) as bar:
        task = bar.add_task("precompute", total=source.num_samples, rate="")
        t_start, seen = time.perf_counter(), [0]

        def advance(n: int) -> None:
            seen[0] += n
            bar.update(task, advance=n, rate=f"{seen[0] / max(time.perf_counter() - t_start, 1e-9):.1f} samples/s")

        for sid, samples in _pending(source, cfg.shard_size, out, state.process_index, state.num_processes):
            tensors, kept, stats, captions = enc.encode_shard(samples, advance)
            record = {"start": sid * cfg.shard_size, "stop": sid * cfg.shard_size + len(samples),
                      "num_samples": len(kept), "skipped": dict(stats.skipped), "converted": dict(stats.converted),
                      "captions": captions,
                      "tensors": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                                  for k, v in tensors.items()}}
            shards.write_shard(out, sid, tensors, keys=[s.key for s in kept],
                               captions=[s.caption or "" for s in kept] if source.has_captions else None, record=record)
    state.wait_for_everyone()
    if state.is_main_process:
        records = shards.shard_records(out)
        shards.check_contiguous(records, cfg.shard_size, source.num_samples)
        classes = _class_text(enc, source.label_names, cfg.class_template, out) if source.label_names else None
        vc = vae.config
        manifest = {
            "format": shards.FORMAT_VERSION, "created_by": "snapgen precompute",
            "num_samples": sum(r["num_samples"] for r in records), "num_shards": len(records),
            "source_samples": records[-1]["stop"] if records else 0, "shard_size": cfg.shard_size,
            "source": source.describe(), "resolutions": cfg.resolutions, "crop": cfg.crop,
            "latent": {"vae": cfg.vae, "subfolder": _vae_location(cfg)[1], "mode": cfg.latent,
                       "channels": vc.latent_channels, "downsample": enc.factor, "scaling_factor": enc.scale,
                       "shift_factor": enc.shift, "dtype": cfg.dtype},
            "encoders": {"student": student if needs_text else [], "teacher": teacher if needs_text else [],
                         "specs": [s.model_dump(mode="json") for s in specs] if needs_text else []},
            "tensors": records[0]["tensors"] if records else {},
            "skipped": shards.sum_counts(records, "skipped"), "converted": shards.sum_counts(records, "converted"),
            "captions": shards.sum_counts(records, "captions"), "classes": classes,
            "shards": [{k: r[k] for k in ("id", "file", "start", "stop", "num_samples", "sha256", "bytes")} for r in records],
            "config": cfg.model_dump(mode="json"),
        }
        atomic_write_json(out / shards.MANIFEST, manifest)
    state.wait_for_everyone()
    manifest = shards.read_manifest(out)
    seconds = time.perf_counter() - t0
    return {"out_dir": str(out), "num_samples": manifest["num_samples"], "num_shards": manifest["num_shards"],
            "source_samples": manifest["source_samples"], "skipped": manifest["skipped"],
            "converted": manifest["converted"], "captions": manifest["captions"], "seconds": round(seconds, 2)}
