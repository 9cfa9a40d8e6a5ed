"""GenEval and DPG-Bench (paper sec. 4.2, Table 3, sup. C): prompts in, images out in exactly
the layouts their official evaluators read, and the evaluators run as subprocesses.

**GenEval** (Ghosh et al., github.com/djghosh13/geneval): prompts come from its
``prompts/evaluation_metadata.jsonl`` (553 lines). Layout, as its README specifies::

    <outdir>/00000/metadata.jsonl     the prompt's line of evaluation_metadata.jsonl
    <outdir>/00000/samples/0000.png   4 samples per prompt
    <outdir>/00000/grid.png           optional

``evaluation/evaluate_images.py`` visits only all-digit folders, reads ``metadata.jsonl`` with
``json.load`` (one JSON object) and only ``samples/<digits>.png``. Its README names samples
with 4 digits, its ``generation/diffusers_generate.py`` with 5; both pass the evaluator's
``\\d+\\.png``; we follow the README. The metadata line is written verbatim (byte for byte,
plus a newline), the prompt folder index is the line's 0-based position in the file.
The evaluator asserts CUDA; ``summary_scores.py`` reads ``object_names.txt`` from its working
directory, so it runs in the folder that holds that file.

**DPG-Bench** (Hu et al., ELLA repo ``dpg_bench/``): one prompt per ``prompts/<item_id>.txt``.
``compute_dpg_bench.py`` lists *every* file of ``--image-root-path``, takes the question set
of ``basename.split('.')[0]`` and crops ``--pic-num`` tiles of size ``--resolution`` from a
2x2 grid, row-major: (0, 0), (r, 0), (0, r), (r, r). So each prompt gets one ``<item_id>.png``
of ``2r x 2r`` holding 4 images without padding, the folder holds nothing else, and its
result file goes elsewhere (``--res-path``). It runs under ``accelerate launch`` as the
repo's ``dist_eval.sh`` does.

Decisions where the benchmarks are silent: sample ``j`` of every prompt uses seed
``seed + j`` (GenEval's script also re-seeds identically per prompt), so any single image can
be regenerated or resumed on its own.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.images import image_grid
from ..errors import ConfigError, SnapgenError

GENEVAL_SAMPLES_PER_PROMPT = 4
GENEVAL_DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
GENEVAL_SAMPLE_RE = re.compile(r"\d+\.png")
DPG_PIC_NUM = 4
DPG_VQA_MODEL = "mplug"


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One benchmark prompt: ``key`` names its output (GenEval folder ``00000``, DPG file stem)."""

    key: str
    prompt: str
    tag: str = ""
    metadata_line: str = ""  # GenEval: the source line, verbatim


@dataclass(frozen=True)
class GenerationJob:
    """The samples to generate for one prompt: one seed per sample."""

    item: BenchmarkPrompt
    seeds: tuple[int, ...]


@dataclass
class Command:
    """An evaluator invocation: argv run in cwd."""

    argv: list[str]
    cwd: Path


# ----------------------------------------------------------------------------- reading prompts


def read_geneval_metadata(path: str | Path) -> list[BenchmarkPrompt]:
    """The prompts of a GenEval ``evaluation_metadata.jsonl``, one per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--geneval-prompts {str(path)!r}: no such file (GenEval's prompts/evaluation_metadata.jsonl)")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not a JSON line ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or "tag" not in meta:
            raise ConfigError(f"{path}:{lineno}: expected an object with 'tag' and 'prompt' keys")
        items.append(BenchmarkPrompt(f"{len(items):05d}", meta["prompt"], str(meta["tag"]), line.rstrip("\r")))
    if not items:
        raise ConfigError(f"--geneval-prompts {str(path)!r}: no prompts")
    return items


def read_dpg_prompts(folder: str | Path) -> list[BenchmarkPrompt]:
    """The prompts of a DPG-Bench ``prompts/`` folder (``<item_id>.txt``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--dpg-prompts {str(folder)!r}: no such directory (DPG-Bench's dpg_bench/prompts)")
    items = []
    for f in sorted(folder.glob("*.txt")):
        if "." in f.stem:
            raise ConfigError(f"{f}: DPG-Bench keys images by the name before the first '.'; rename the file")
        text = " ".join(f.read_text(encoding="utf-8").split())
        if not text:
            raise ConfigError(f"{f}: empty prompt")
        items.append(BenchmarkPrompt(f.stem, text))
    if not items:
        raise ConfigError(f"--dpg-prompts {str(folder)!r}: no <name>.txt prompt files")
    return items


def generation_jobs(items: Sequence[BenchmarkPrompt], n_samples: int = 4, seed: int = 0) -> list[GenerationJob]:
    """One job per prompt; sample ``j`` uses seed ``seed + j``."""
    if n_samples < 1:
        raise ConfigError(f"n_samples: expected a positive integer, got {n_samples}")
    seeds = tuple(seed + j for j in range(n_samples))
    return [GenerationJob(item, seeds) for item in items]


# ----------------------------------------------------------------------------- writing layouts


def geneval_sample_path(outdir: str | Path, item: BenchmarkPrompt, sample: int) -> Path:
    return Path(outdir) / item.key / "samples" / f"{sample:04d}.png"


def write_dpg_prompt(outdir: str | Path, item: BenchmarkPrompt, images: Sequence[Image.Image]) -> Path:
    """Write ``<outdir>/<key>.png``: the 4 samples as a 2x2 grid without padding (``2r x 2r``)."""
    if len(images) != DPG_PIC_NUM:
        raise SnapgenError(f"DPG-Bench prompt {item.key}: expected {DPG_PIC_NUM} images, got {len(images)}")
    w, h = images[0].size
    if w != h:
        raise SnapgenError(f"DPG-Bench prompt {item.key}: images must be square, got {w}x{h}")
    path = Path(outdir) / f"{item.key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=2).save(path)
    return path


# ----------------------------------------------------------------------------- validating layouts


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SnapgenError(f"{what}: {len(problems)} problem(s): " + "; ".join(problems[:5]) + more)


def check_geneval_layout(outdir: str | Path, items: Sequence[BenchmarkPrompt] | None = None,
                         n_samples: int = GENEVAL_SAMPLES_PER_PROMPT) -> dict:
    """Check ``outdir`` is what GenEval's ``evaluate_images.py`` reads; returns counts, raises
    :class:`SnapgenError` listing the problems. With ``items``, every prompt must be there with
    its metadata line verbatim."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise SnapgenError(f"GenEval images {str(outdir)!r}: no such directory")
    folders = sorted(p for p in outdir.iterdir() if p.is_dir() and p.name.isdigit())
    problems, n_images = [], 0
    for folder in folders:
        meta = folder / "metadata.jsonl"
        try:
            parsed = json.loads(meta.read_text(encoding="utf-8"))
            if not {"tag", "prompt"} <= set(parsed):
                problems.append(f"{meta}: no 'tag'/'prompt'")
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{meta}: unreadable as one JSON object ({e})")
        samples = sorted(p.name for p in (folder / "samples").glob("*") if GENEVAL_SAMPLE_RE.fullmatch(p.name))
        if len(samples) != n_samples:
            problems.append(f"{folder.name}: {len(samples)} samples, expected {n_samples}")
        n_images += len(samples)
    if items is not None:
        keys = {f.name for f in folders}
        for item in items:
            meta = outdir / item.key / "metadata.jsonl"
            if item.key not in keys:
                problems.append(f"prompt {item.key} ({item.prompt!r}) missing")
            elif meta.is_file() and meta.read_text(encoding="utf-8") != item.metadata_line + "\n":
                problems.append(f"{item.key}/metadata.jsonl differs from the source line")
        extra = keys - {i.key for i in items}
        if extra:
            problems.append(f"unexpected prompt folders {sorted(extra)[:3]}")
    if not folders:
        problems.append("no 00000-style prompt folders")
    _fail(f"GenEval layout {outdir}", problems)
    return {"prompts": len(folders), "images": n_images}


def check_dpg_layout(outdir: str | Path, resolution: int, items: Sequence[BenchmarkPrompt] | None = None) -> dict:
    """Check ``outdir`` is what DPG-Bench's ``compute_dpg_bench.py`` reads: only ``<key>.png``
    files, each a ``2*resolution`` square; with ``items``, one per prompt."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise SnapgenError(f"DPG-Bench images {str(outdir)!r}: no such directory")
    problems, keys = [], set()
    for f in sorted(outdir.iterdir()):
        if not f.is_file() or f.suffix != ".png" or "." in f.stem:
            problems.append(f"{f.name}: not a <key>.png file (the evaluator tries every entry)")
            continue
        keys.add(f.stem)
        try:
            with Image.open(f) as im:
                size = im.size
        except OSError as e:
            problems.append(f"{f.name}: unreadable ({e})")
            continue
        if size != (2 * resolution, 2 * resolution):
            problems.append(f"{f.name}: {size[0]}x{size[1]}, expected a 2x2 grid of {2 * resolution}x{2 * resolution}")
    if items is not None:
        missing = sorted({i.key for i in items} - keys)
        extra = sorted(keys - {i.key for i in items})
        if missing:
            problems.append(f"{len(missing)} prompt(s) without image, e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} image(s) without prompt, e.g. {extra[0]}")
    if not keys:
        problems.append("no images")
    _fail(f"DPG-Bench layout {outdir}", problems)
    return {"prompts": len(keys), "images": DPG_PIC_NUM * len(keys)}


# ----------------------------------------------------------------------------- official evaluators


def _require(path: Path, option: str, hint: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{option}: {str(path)!r} not found; {hint}")
    return path


def geneval_commands(geneval_repo: str | Path, image_dir: str | Path, results_file: str | Path,
                     detector_dir: str | Path, python: str = "python") -> list[Command]:
    """The two commands of GenEval's README: ``evaluate_images.py`` then ``summary_scores.py``.

    ``python`` is the interpreter of GenEval's own environment (mmdet 2.x, open_clip, CUDA).
    """
    repo = Path(geneval_repo).resolve()
    hint = "pass --geneval-repo PATH to a clone of https://github.com/djghosh13/geneval"
    evaluate = _require(repo / "evaluation" / "evaluate_images.py", "--geneval-repo", hint)
    summary = _require(repo / "evaluation" / "summary_scores.py", "--geneval-repo", hint)
    detector = Path(detector_dir).resolve()
    _require(detector / f"{GENEVAL_DETECTOR}.pth", "--geneval-detector",
             "download it with GenEval's evaluation/download_models.sh DIR and pass --geneval-detector DIR")
    names_dir = next((d for d in (repo / "evaluation", repo) if (d / "object_names.txt").is_file()), None)
    if names_dir is None:
        raise ConfigError(f"--geneval-repo {str(repo)!r}: no object_names.txt in evaluation/ or the repo root")
    results = str(Path(results_file).resolve())
    return [
        Command([python, str(evaluate), str(Path(image_dir).resolve()), "--outfile", results,
                 "--model-path", str(detector)], repo),
        Command([python, str(summary), results], names_dir),
    ]


def dpg_command(dpg_repo: str | Path, image_dir: str | Path, resolution: int, res_path: str | Path, *,
                num_processes: int = 1, python: str = "python") -> Command:
    """``compute_dpg_bench.py`` under ``accelerate launch``, as the repo's ``dist_eval.sh`` runs it.

    ``dpg_repo`` is the ELLA checkout (holding ``dpg_bench/``); the script reads
    ``./dpg_bench/dpg_bench.csv`` relative to it. ``python`` is the interpreter of its
    environment (modelscope, mPLUG-large).
    """
    repo = Path(dpg_repo).resolve()
    hint = "pass --dpg-repo PATH to a clone of https://github.com/TencentQQGYLab/ELLA (it holds dpg_bench/)"
    script = _require(repo / "dpg_bench" / "compute_dpg_bench.py", "--dpg-repo", hint)
    _require(repo / "dpg_bench" / "dpg_bench.csv", "--dpg-repo", hint)
    launch = [python, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
              str(num_processes), *(["--multi_gpu"] if num_processes > 1 else []), "--mixed_precision", "fp16"]
    return Command([*launch, str(script), "--image-root-path", str(Path(image_dir).resolve()),
                    "--resolution", str(resolution), "--pic-num", str(DPG_PIC_NUM),
                    "--vqa-model", DPG_VQA_MODEL, "--res-path", str(Path(res_path).resolve())], repo)


def run_command(cmd: Command) -> str:
    """Run ``cmd``; its stderr goes to ours (progress), its stdout is returned."""
    try:
        proc = subprocess.run(cmd.argv, cwd=cmd.cwd, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        raise ConfigError(f"cannot run {cmd.argv[0]!r} ({e}); pass the evaluator environment's python") from None
    if proc.returncode != 0:
        raise SnapgenError(f"evaluator failed (exit {proc.returncode}): {' '.join(cmd.argv)} "
                           f"in {cmd.cwd}; its output: {proc.stdout[-500:]!r}")
    return proc.stdout


def parse_geneval_summary(text: str) -> dict:
    """Scores printed by GenEval's ``summary_scores.py``: overall (mean over tasks) and per task."""
    overall = re.search(r"Overall score \(avg\. over tasks\):\s*([0-9.]+)", text)
    if overall is None:
        raise SnapgenError(f"GenEval summary: no 'Overall score' line in {text[-300:]!r}")
    tasks = {m[1]: int(m[2]) / int(m[3]) for m in re.finditer(r"^(\S+)\s+= [0-9.]+% \((\d+) / (\d+)\)", text, re.M)}
    out = {"overall": float(overall[1]), "tasks": tasks}
    for key, pattern in (("images", r"Total images: (\d+)"), ("prompts", r"Total prompts: (\d+)")):
        if m := re.search(pattern, text):
            out[key] = int(m[1])
    return out


def parse_dpg_summary(text: str) -> dict:
    """Scores printed (and appended to ``--res-path``) by DPG-Bench: overall and L1/L2 categories."""
    score = re.search(r"DPG-Bench score: ([0-9.eE+-]+)", text)
    if score is None:
        raise SnapgenError(f"DPG-Bench summary: no 'DPG-Bench score' line in {text[-300:]!r}")
    out: dict = {"overall": float(score[1]), "l1": {}, "l2": {}}
    section = None
    for line in text.splitlines():
        if line.startswith("L1 category scores"):
            section = "l1"
        elif line.startswith("L2 category scores"):
            section = "l2"
        elif section and line.startswith("\t") and ":" in line:
            name, value = line.strip().rsplit(":", 1)
            out[section][name.strip()] = float(value)
        else:
            section = None
    return out


def run_geneval(geneval_repo: str | Path, image_dir: str | Path, results_file: str | Path,
                detector_dir: str | Path, python: str = "python") -> dict:
    """Check the layout, run GenEval's evaluator and summary, return the parsed scores."""
    check_geneval_layout(image_dir)
    evaluate, summary = geneval_commands(geneval_repo, image_dir, results_file, detector_dir, python)
    run_command(evaluate)
    return parse_geneval_summary(run_command(summary))


def run_dpg(dpg_repo: str | Path, image_dir: str | Path, resolution: int, res_path: str | Path, *,
            num_processes: int = 1, python: str = "python") -> dict:
    """Check the layout, run DPG-Bench's evaluator, return the parsed scores."""
    check_dpg_layout(image_dir, resolution)
    if Path(res_path).resolve().parent == Path(image_dir).resolve():
        raise ConfigError("DPG-Bench --res-path must be outside the image folder (the evaluator reads every file there)")
    stdout = run_command(dpg_command(dpg_repo, image_dir, resolution, res_path, num_processes=num_processes,
                                     python=python))
    return parse_dpg_summary(stdout)
