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
* **Text features** are stored as ``TextEncoderStack.encode`` returns them, for the student's
  ``encoders`` and the teacher's ``teacher_encoders``; a teacher encoder is stored as
  ``teacher_<name>`` unless the student has the identical spec (then it is encoded once and
  shared). ``manifest["encoders"]`` lists each role's ``[name, stored name]`` pairs in spec order
  (``data.shards.encoder_features`` undoes the renaming). An empty caption is kept (a valid
  unconditional sample) and counted; a missing caption is stored as ``""`` and counted; a
  caption longer than an encoder's ``max_length`` is truncated by its tokenizer and counted.
  Class-conditional sources (ImageNet, sup. H) get ``class_text.safetensors``: the features
  of ``class_template.format(synonym)`` for every synonym of every class, so training can
  pick a random synonym each step; their per-sample shards hold no text. Class names come
  from ``class_names`` (``--class-names FILE``), a ``ClassLabel``, string labels or class
  folders (``data.sources``); a ``label_column`` whose labels have no names, a label outside
  the names, or text encoders with neither captions nor labels to encode are errors (exit 2)
  before anything is written: a run never ends with no text when text was asked for.
* **Resume**: shard ``i`` always holds source indices ``[i*shard_size, (i+1)*shard_size)``; a
  shard is done when its record file exists and its checksum matches. A re-run skips done
  shards, redoes the rest, and writes ``manifest.json`` at the end; a resumed run's shard files
  are byte-identical to an uninterrupted run's (``data.shards``: canonical header metadata).
  ``precompute.json`` pins the settings that change the output and the shard format; resuming
  with different ones, or into older shards, is refused.
* **Multi-process** (``accelerate launch``): process ``r`` of ``W`` encodes shards ``i % W == r``;
  the main process writes the manifest after a barrier.
* **Precision**: the AE runs in ``vae_dtype`` (fp32 default: SDXL-family AEs overflow in
  fp16), each text encoder in its spec's ``dtype``; features are stored in ``dtype`` (fp16
  default; labels, indices, crops and masks keep their integer/bool types).
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..config import RUNTIME_KEYS, StageSettings
from ..core.latents import downsampling_factor, latent_scale_shift, normalize_latents
from ..core.measure import count_params, resolve_device
from ..core.text import EncoderSpec, TextEncoderStack, parse_specs, spec_set
from ..data import shards
from ..data.images import DEFAULT_MAX_PIXELS, ImageSkipped, ImageStats, open_image, resize_crop, sample_rng, to_tensor
from ..data.sources import Sample, Source, open_source
from ..errors import ConfigError
from ..files import atomic_write_json, atomic_write_text, model_location
from .base import PlanItem, StageContext, vae_config

SD3_VAE = "stabilityai/stable-diffusion-3-medium-diffusers"
RUN_CONFIG = "precompute.json"
SKIPPED_FILE = "skipped.jsonl"
# Settings that do not change the output; a resumed run may use other values.
_RUNTIME_ONLY = {"batch_size", "num_workers", "device", "streaming", *RUNTIME_KEYS}


#: Runs in every process of a distributed launch (each encodes its share of the shards; stages/base.py).
EVERY_PROCESS = True


class Config(StageSettings):
    """Every setting of ``snapgen precompute`` (one flag each)."""

    source: str = Field(description="image folder, save_to_disk folder, WebDataset tar(s) or hub dataset name")
    source_kind: Literal["auto", "hf", "folder", "webdataset"] = "auto"
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = "text"
    label_column: str | None = Field(None, description="class labels (class-conditional pretraining, sup. H): a "
                                                        "column, or any name for class folders <class>/<image>")
    class_names: str | None = Field(None, description="JSON file naming the label column's classes: a list (entry "
                                                       "i: class id i) or object (label -> names); an entry is a "
                                                       "name or comma-separated synonyms")
    class_template: str = Field("a photo of {}", description="class text; {} is a random synonym each time")
    streaming: bool = False
    resolutions: list[int] = Field(default_factory=lambda: [256])
    crop: Literal["center", "random"] = "center"
    min_side: int | None = Field(None, description="skip images with a shorter side below (default: max resolution)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    vae: str = SD3_VAE
    vae_subfolder: str | None = "vae"
    latent: Literal["mean", "sample"] = "mean"
    encoders: list[EncoderSpec] | str = Field("student", description="a named set (core.text.SPEC_SETS) or specs")
    teacher_encoders: list[EncoderSpec] | str | None = Field(None, description="e.g. 'teacher' (SD3.5) for distill")
    text_max_length: int | None = Field(None, gt=0, description="token length of every encoder, student and teacher "
                                                                 "(default: each spec's own); short captions need few")
    batch_size: int = Field(32, gt=0)
    shard_size: int = Field(1024, gt=0)
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    vae_dtype: Literal["fp16", "bf16", "fp32"] = "fp32"
    max_samples: int | None = Field(None, gt=0)
    seed: int | None = None
    device: str = "auto"
    num_workers: int = Field(4, ge=0, description="threads decoding and resizing images")

    @field_validator("caption_column", "label_column", "vae_subfolder", mode="before")
    @classmethod
    def _none_word(cls, v):
        """``--caption-column none`` (flags cannot spell null): no captions, e.g. for ImageNet."""
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v

    @field_validator("class_template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        if v.count("{}") != 1 or v.replace("{}", "").count("{") or v.replace("{}", "").count("}"):
            raise ValueError(f"expected a text with one {{}} for the class name, e.g. 'a photo of {{}}', got {v!r}")
        return v

    @field_validator("resolutions")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
        if not v or any(r <= 0 for r in v):
            raise ValueError(f"expected a non-empty list of positive resolutions, got {v}")
        return sorted(set(v))


def _resolve(value: list[EncoderSpec] | str | None, key: str) -> list[EncoderSpec]:
    if not value or value == "none":
        return []
    return spec_set(value) if isinstance(value, str) else parse_specs(value, key)


def _specs(cfg: Config) -> tuple[list[EncoderSpec], list[EncoderSpec], dict[str, str]]:
    """Student specs, teacher specs renamed to their stored names, and teacher name -> stored name.

    A teacher encoder identical to a student one is encoded once and shared; any other teacher
    encoder is stored as ``teacher_<name>`` (SD3.5's CLIP-L is not the student's CLIP-L file)."""
    def length(specs: list[EncoderSpec]) -> list[EncoderSpec]:
        return [s.model_copy(update={"max_length": cfg.text_max_length}) for s in specs] if cfg.text_max_length else specs

    student = length(_resolve(cfg.encoders, "encoders"))
    by_name = {s.name: s for s in student}
    teacher, stored = [], {}
    for spec in length(_resolve(cfg.teacher_encoders, "teacher_encoders")):
        stored[spec.name] = spec.name if by_name.get(spec.name) == spec else f"teacher_{spec.name}"
        teacher.append(spec.model_copy(update={"name": stored[spec.name]}))
    return student, teacher, stored


class _Texts:
    """The student's and the teacher's :class:`TextEncoderStack` behind one ``encode``; each
    stack keeps its own layout checks, the teacher's encodes only what it does not share."""

    def __init__(self, student: list[EncoderSpec], teacher: list[EncoderSpec], device: torch.device):
        self.groups: list[tuple[TextEncoderStack, list[str]]] = []
        if student:
            self.groups.append((TextEncoderStack(student).to(device), [s.name for s in student]))
        own = [s.name for s in teacher if s.name.startswith("teacher_")]
        if own:
            self.groups.append((TextEncoderStack(teacher).to(device), own))

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {k: v for stack, names in self.groups for k, v in stack.encode(captions, names).items()}

    def count_truncated(self, captions: list[str]) -> int:
        """Captions longer than some encoder's ``max_length`` tokens (its tokenizer truncates them)."""
        long = [False] * len(captions)
        for stack, names in self.groups if captions else ():
            for e in (stack.encoders[n] for n in names):
                ids = e.tokenizer(captions, truncation=False)["input_ids"]
                long = [was or len(t) > e.spec.max_length for was, t in zip(long, ids)]
        return sum(long)


def _vae_location(cfg: Config) -> tuple[str, str | None]:
    return model_location(cfg.vae, cfg.vae_subfolder)


def load_vae(cfg: Config):
    from ..core.pipeline import load_autoencoder

    return load_autoencoder(cfg.vae, cfg.vae_subfolder, torch_dtype=shards.DTYPES[cfg.vae_dtype])


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    """The AE built on the meta device from its config when that config is known (on disk, from
    an earlier stage's plan, or SD3's public config); no data read. Provides the latent
    channels and the student's encoder specs to the training stages' plans."""
    from diffusers import AutoencoderKL

    params, note = None, f"latents {cfg.latent} at {cfg.resolutions}, {cfg.dtype}"
    config = vae_config(*_vae_location(cfg), ctx)
    if config is not None:
        with torch.device("meta"):
            params = count_params(AutoencoderKL.from_config(config))
    else:
        note += "; the autoencoder's config is not available locally, resolved at run time"
    student, teacher, teacher_names = _specs(cfg)
    out = [str(ctx.out_dir / "shard-*.safetensors"), str(ctx.out_dir / shards.MANIFEST)]
    texts = [(s, "student") for s in student] + [(s, "teacher") for s in teacher if s.name.startswith("teacher_")]
    renamed = {v: k for k, v in teacher_names.items()}
    provides = {"latent_channels": config["latent_channels"] if config else None, "resolutions": cfg.resolutions,
                "text_encoders": {"student": [s.model_dump(mode="json") for s in student],
                                  "teacher": [{**s.model_dump(mode="json"), "name": renamed[s.name]} for s in teacher]}}
    return [PlanItem(f"AutoencoderKL {cfg.vae}", params, [cfg.source], out, note, provides=provides),
            *[PlanItem(f"text encoder {s.name} ({role}, {s.kind})", None, [s.path], [], f"max_length {s.max_length}")
              for s, role in texts]]


class _ShardEncoder:
    """Turns one shard's samples into its tensors: images -> latents, captions -> text features."""

    def __init__(self, cfg: Config, vae, text: _Texts | None, *, has_captions: bool, num_classes: int | None,
                 seed: int, device: torch.device):
        self.cfg, self.vae, self.text, self.seed, self.device = cfg, vae, text, seed, device
        self.has_captions, self.has_labels, self.num_classes = has_captions, num_classes is not None, num_classes
        self.dtype = shards.DTYPES[cfg.dtype]
        self.min_side = max(cfg.resolutions) if cfg.min_side is None else cfg.min_side
        self.scale, self.shift = latent_scale_shift(vae)
        self.factor = downsampling_factor(vae.config)
        if bad := [r for r in cfg.resolutions if r % self.factor]:
            raise ConfigError(f"resolutions: {bad} are not multiples of the AE's downsampling factor {self.factor}")
        self.pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers else None

    def _prepare(self, sample: Sample) -> tuple[Sample, dict | None, ImageStats]:
        """Decode + validate one image, then resize + crop it for every resolution."""
        stats = ImageStats()
        try:
            if sample.image is None:
                raise ImageSkipped("no_image")
            img = open_image(sample.image, max_pixels=self.cfg.max_pixels, min_side=self.min_side, stats=stats)
        except ImageSkipped as e:
            stats.skip(e, key=sample.key, index=sample.index)
            return sample, None, stats
        rng = sample_rng(self.seed, sample.index)
        views = {r: resize_crop(img, r, crop=self.cfg.crop, rng=rng) for r in self.cfg.resolutions}
        return sample, {r: (to_tensor(v), c) for r, (v, c) in views.items()}, stats

    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """SD3 normalisation of the AE posterior: ``(z - shift_factor) * scaling_factor``."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean
        if self.cfg.latent == "sample":
            gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in indices]
            z = z + dist.std * torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z)
        return normalize_latents(self.vae, z).to("cpu", self.dtype)

    def _latents_at(self, res: int, kept: list[Sample], views: list[dict]) -> torch.Tensor:
        b = self.cfg.batch_size
        lat = [self._latents(torch.stack([v[res][0] for v in views[i:i + b]]), [s.index for s in kept[i:i + b]])
               for i in range(0, len(views), b)]
        h = res // self.factor
        return torch.cat(lat) if lat else torch.zeros(0, self.vae.config.latent_channels, h, h, dtype=self.dtype)

    def text_features(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each distinct caption encoded once, in batches (captions repeat a lot in class
        templates and short-caption sets); an empty list gives empty tensors of the right shapes."""
        unique = list(dict.fromkeys(captions))
        feats: dict[str, list[torch.Tensor]] = {}
        for i in range(0, max(len(unique), 1), self.cfg.batch_size):
            for k, v in self.text.encode(unique[i:i + self.cfg.batch_size] or [""]).items():
                feats.setdefault(k, []).append(v.to("cpu", self.dtype if v.is_floating_point() else v.dtype))
        row = {c: i for i, c in enumerate(unique)}
        index = torch.tensor([row[c] for c in captions], dtype=torch.long)
        return {k: torch.cat(v)[index] for k, v in feats.items()}

    def _check_labels(self, samples: list[Sample]) -> None:
        """Every kept sample has a label among the named classes (a streamed source is checked here)."""
        n = self.num_classes
        if bad := next((s for s in samples if s.label is None or not 0 <= s.label < n), None):
            raise ConfigError(f"label_column {self.cfg.label_column!r}: sample {bad.key!r} (index {bad.index}) has "
                              f"label {bad.label}, but {n} classes are named (ids 0-{n - 1}); label every sample "
                              "and name every class (--class-names)")

    def encode_shard(self, samples: list[Sample]) -> tuple[dict[str, torch.Tensor], list[Sample], ImageStats, dict]:
        """(tensors, kept samples, image stats, caption stats) of one shard."""
        stats, kept, views = ImageStats(), [], []
        for sample, view, s in (self.pool.map if self.pool else map)(self._prepare, samples):
            stats.merge(s)
            if view is not None:
                kept.append(sample)
                views.append(view)
        sizes = [list(v[self.cfg.resolutions[0]][1].original) for v in views]
        out = {"index": torch.tensor([s.index for s in kept], dtype=torch.int64),
               "original_size": torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2)}
        if self.has_labels:
            self._check_labels(kept)
            out["label"] = torch.tensor([-1 if s.label is None else s.label for s in kept], dtype=torch.int64)
        for r in self.cfg.resolutions:
            out[f"latents.{r}"] = self._latents_at(r, kept, views)
            crops = [[v[r][1].top, v[r][1].left] for v in views]
            out[f"crop.{r}"] = torch.tensor(crops, dtype=torch.int32).reshape(-1, 2)
        caption_stats: dict[str, int] = {}
        if self.text is not None and self.has_captions:
            captions = [s.caption or "" for s in kept]
            caption_stats = {"missing": sum(s.caption is None for s in kept),
                             "empty": sum(s.caption == "" for s in kept),
                             "truncated": self.text.count_truncated(captions)}
            out.update(self.text_features(captions))
        return out, kept, stats, {k: v for k, v in caption_stats.items() if v}


def _check_run_config(cfg: Config, seed: int, out: Path, state: PartialState) -> None:
    """Pin the output-changing settings; refuse to resume into a folder made with others."""
    pinned = {**cfg.model_dump(mode="json", exclude=_RUNTIME_ONLY), "seed": seed, "format": shards.FORMAT_VERSION}
    path = out / RUN_CONFIG
    if state.is_main_process:
        for name in ("shard-", f"{shards.MANIFEST}.", f"{shards.CLASS_TEXT}.", f"{RUN_CONFIG}."):
            for stray in out.glob(f".{name}*"):  # temp files of atomic writes cut short by a crash
                stray.unlink()
        if not path.exists():
            atomic_write_json(path, pinned)
    state.wait_for_everyone()
    previous = json.loads(path.read_text())
    if previous.get("format") != shards.FORMAT_VERSION:
        raise ConfigError(f"out: {out} holds shards of format {previous.get('format', '2 or older')}, this snapgen "
                          f"writes {shards.FORMAT_VERSION}; use a new --out")
    if diff := sorted(k for k in set(previous) | set(pinned) if previous.get(k) != pinned.get(k)):
        raise ConfigError(f"out: {out} holds shards made with other settings ({', '.join(diff)} differ); "
                          "use a new --out, or the same settings to resume")


def _pending(source: Source, size: int, out: Path, rank: int, world: int):
    """(shard id, samples) of this process's shards that are not done yet, in order."""
    done = {r["id"] for r in shards.shard_records(out)
            if r["id"] % world == rank and shards.completed_shard(out, r["id"]) is not None}
    todo = lambda sid: sid % world == rank and sid not in done  # noqa: E731
    n = source.num_samples
    if n is not None:
        for sid in filter(todo, range(math.ceil(n / size))):
            yield sid, list(source.iter_range(sid * size, (sid + 1) * size))
        return
    first = next(filter(todo, itertools.count(rank, world)))  # streaming: start reading there
    for sid, group in itertools.groupby(source.iter_range(first * size), key=lambda s: s.index // size):
        if todo(sid):
            yield sid, list(group)


def _class_text(enc: _ShardEncoder, names: list[list[str]], names_from: str, template: str, out: Path) -> dict:
    """Text features of ``template.format(synonym)`` for every class synonym (sup. H)."""
    classes: dict = {"names": names, "names_from": names_from, "template": template, "file": None, "sha256": None}
    if enc.text is None:
        return classes
    owner = [c for c, syns in enumerate(names) for _ in syns]
    prompts = [template.format(s) for syns in names for s in syns]
    tensors = {**enc.text_features(prompts), "class": torch.tensor(owner, dtype=torch.int64)}
    rec = shards.write_tensors(out / shards.CLASS_TEXT, tensors, {"prompts": prompts})
    return {**classes, "file": rec["file"], "sha256": rec["sha256"], "num_prompts": len(prompts)}


def _write_shard(enc: _ShardEncoder, out: Path, sid: int, samples: list[Sample], size: int) -> None:
    tensors, kept, stats, captions = enc.encode_shard(samples)
    record = {"start": sid * size, "stop": sid * size + len(samples), "num_samples": len(kept),
              "skipped": dict(stats.skipped), "skipped_files": stats.skipped_files,
              "converted": dict(stats.converted), "captions": captions,
              "tensors": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in tensors.items()}}
    shards.write_shard(out, sid, tensors, keys=[s.key for s in kept], record=record,
                       captions=[s.caption or "" for s in kept] if enc.has_captions else None)


def _write_skipped(out: Path, records: list[dict]) -> str:
    """``skipped.jsonl`` beside the manifest: one line per skipped source record (key, index,
    reason, detail), in source order; returns its file name."""
    lines = [json.dumps(s, sort_keys=True) + "\n" for r in records for s in r.get("skipped_files", [])]
    atomic_write_text(out / SKIPPED_FILE, "".join(lines))
    return SKIPPED_FILE


def _bytes_per_sample(tensors: dict, student: list[EncoderSpec], teacher: list[EncoderSpec]) -> dict[str, int]:
    """What one sample costs in the shards, by part: latents, the student's text features, the
    teacher's own (those it does not share with the student; T5-XXL's 256 x 4096 fp16 tokens
    alone are 2 MiB) and the rest; ``total``."""
    owners = {s.name: "student_text" for s in student} | {s.name: "teacher_text" for s in teacher
                                                        if s.name.startswith("teacher_")}
    parts: dict[str, int] = {"latents": 0, "student_text": 0, "teacher_text": 0, "other": 0}
    for key, info in tensors.items():
        n = math.prod(info["shape"]) * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()
        part = "latents" if key.startswith("latents.") else owners.get(key.split(".")[0], "other")
        parts[part] += n
    return {**parts, "total": sum(parts.values())}


def _write_manifest(cfg: Config, out: Path, source: Source, enc: _ShardEncoder, student: list[EncoderSpec],
                    teacher: list[EncoderSpec], teacher_names: dict[str, str]) -> None:
    records = shards.shard_records(out)
    shards.check_contiguous(records, cfg.shard_size, source.num_samples)
    text = enc.text is not None
    manifest = {
        "format": shards.FORMAT_VERSION, "created_by": "snapgen precompute",
        "num_samples": sum(r["num_samples"] for r in records), "num_shards": len(records),
        "source_samples": records[-1]["stop"] if records else 0, "shard_size": cfg.shard_size,
        "source": source.describe(), "resolutions": cfg.resolutions, "crop": cfg.crop,
        "latent": {"vae": cfg.vae, "subfolder": _vae_location(cfg)[1], "mode": cfg.latent,
                   "channels": enc.vae.config.latent_channels, "downsample": enc.factor,
                   "scaling_factor": enc.scale, "shift_factor": enc.shift, "dtype": cfg.dtype},
        "encoders": {"student": [[s.name, s.name] for s in student] if text else [],
                     "teacher": [list(pair) for pair in teacher_names.items()] if text else [],
                     "specs": {s.name: s.model_dump(mode="json") for s in [*student, *teacher]} if text else {}},
        "tensors": records[0]["tensors"] if records else {},
        "bytes_per_sample": _bytes_per_sample(records[0]["tensors"] if records else {}, student, teacher),
        "bytes": sum(r["bytes"] for r in records),
        "skipped": shards.sum_counts(records, "skipped"), "skipped_list": _write_skipped(out, records),
        "converted": shards.sum_counts(records, "converted"),
        "captions": shards.sum_counts(records, "captions"),
        "classes": (_class_text(enc, source.label_names, source.names_from, cfg.class_template, out)
                    if source.label_names else None),
        "shards": [{k: r[k] for k in ("id", "file", "start", "stop", "num_samples", "sha256", "bytes")}
                   for r in records],
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out / shards.MANIFEST, manifest)


class _Rate(ProgressColumn):
    """Samples per second since the start (rich's ``task.speed`` keeps only the last 30 s of
    updates and needs two of them: with shards slower than that it showed 0.0)."""

    def render(self, task) -> Text:
        if not task.completed or not task.elapsed:
            return Text("- samples/s")
        return Text(f"{task.completed / task.elapsed:.1f} samples/s")


def _check_text(cfg: Config, source: Source, wants_text: bool) -> None:
    """Refuse a labelled source without class names, and text encoders with nothing to encode."""
    if cfg.label_column is not None and source.label_names is None:
        raise ConfigError(f"label_column {cfg.label_column!r}: the labels of {cfg.source} are integers with no class "
                          "names; pass --class-names FILE, a JSON list whose entry i names class id i (a name or "
                          'comma-separated synonyms, e.g. ["tench, Tinca tinca", "goldfish"])')
    if wants_text and not source.has_captions and cfg.label_column is None:
        raise ConfigError("encoders: text encoders are set but the source gives no text (--caption-column none and "
                          "no --label-column); pass a caption column, a label column, or --encoders none")


def run(cfg: Config, ctx: StageContext) -> dict:
    """Encode the source into ``ctx.out_dir``; return the summary (counts, skips, out dir)."""
    t0 = time.perf_counter()
    # CPU-only processes started by `accelerate launch --multi_gpu` (torchrun) need cpu=True to form a group.
    state = PartialState(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()))
    out = Path(ctx.out_dir)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    source = open_source(cfg.source, kind=cfg.source_kind, split=cfg.split, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, label_column=cfg.label_column, streaming=cfg.streaming,
                         max_samples=cfg.max_samples, class_names=cfg.class_names)
    student, teacher, teacher_names = _specs(cfg)
    _check_text(cfg, source, bool(student or teacher))
    out.mkdir(parents=True, exist_ok=True)
    _check_run_config(cfg, seed, out, state)

    device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
    vae = load_vae(cfg).to(device).eval().requires_grad_(False)
    needs_text = bool(student or teacher) and (source.has_captions or source.label_names is not None)
    enc = _ShardEncoder(cfg, vae, _Texts(student, teacher, device) if needs_text else None,
                        has_captions=source.has_captions,
                        num_classes=None if cfg.label_column is None else len(source.label_names),
                        seed=seed, device=device)
    with Progress(TextColumn("precompute"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                  console=ctx.console, disable=not state.is_main_process) as bar:
        task = bar.add_task("precompute", total=source.num_samples)
        for sid, samples in _pending(source, cfg.shard_size, out, state.process_index, state.num_processes):
            _write_shard(enc, out, sid, samples, cfg.shard_size)
            bar.advance(task, len(samples))
    state.wait_for_everyone()
    if state.is_main_process:
        _write_manifest(cfg, out, source, enc, student, teacher, teacher_names)
    state.wait_for_everyone()
    m = shards.read_manifest(out)
    classes = m["classes"] and {"num_classes": len(m["classes"]["names"]), "names_from": m["classes"].get("names_from"),
                                "num_prompts": m["classes"].get("num_prompts", 0)}
    return {"out_dir": str(out), **{k: m[k] for k in ("num_samples", "num_shards", "source_samples", "bytes_per_sample",
                                                        "bytes", "skipped",
                                                        "converted", "captions")},
            "classes": classes, "seconds": round(time.perf_counter() - t0, 2)}
