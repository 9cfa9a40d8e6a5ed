"""A deterministic GenEval-style alignment scorer for the coloured-shapes data set.

GenEval (supplement I; Ghosh et al. 2023) detects objects with Mask2Former, names their
colours with CLIP and checks each prompt's requirements with fixed rules. At toy scale
the objects are coloured shapes (:mod:`snapgen_cli.data.shapes`), so detection needs no
learned model:

1. **Colour segmentation.** The background colour is the median of the image's border.
   Each pixel is read as a mix ``bg + alpha * (c - bg)`` of the background and one palette
   colour ``c`` (anti-aliased, blurred and faded pixels are such mixes): it takes the
   colour whose mixing line it lies closest to, if it lies within ``MAX_RESIDUAL`` of it
   and at least half-way to the colour (``alpha >= 0.5``); otherwise it is background.
2. **Objects** are the 4-connected components of each colour, minus those smaller than
   ``MIN_AREA`` of the image.
3. **Shape** by template: a component's soft mask (its colour's ``alpha`` within ``_PAD``
   px of it) is compared with a circle, a square and an upright triangle, each placed
   with the mask's area and centroid (which blur does not change) and drawn with 4x4
   sub-pixel coverage. The best soft IoU names the shape, gives the detection's box and
   is its *confidence* (GenEval's detector score); below ``MIN_CONFIDENCE`` the
   component is not an object. Detections are ranked by confidence, at most
   ``MAX_OBJECTS`` per shape, like GenEval's.
4. **Rules.** :func:`evaluate` is GenEval's ``evaluate``: a spec becomes GenEval's
   metadata (:func:`geneval_metadata`: ``include``/``exclude`` clauses with count, colour
   and position), counting is exact (include N, exclude N + 1), colours are checked on the
   top-ranked objects of a shape, positions with GenEval's box rule
   (:func:`snapgen_cli.data.shapes.relative_position`, threshold 0.1). The overall score
   is the mean of the per-category accuracies, as GenEval reports it.

Measured floors (tests/test_alignment.py): rendered ground truth scores 1.0 in every
category at 32, 64 and 128 px, also after a Gaussian blur of sigma 0.7 px plus Gaussian
noise of std 8 (0-255 scale) and a colour jitter; a blank (background-only) image scores 0.0;
uniform-noise images score 0.0 (no component survives the confidence threshold). A
model that draws valid samples but ignores the prompt's content scores about 0.18
overall (ground-truth images scored against another prompt of the same category, 600
samples at 32 and at 64 px: single_object 0.38, two_object 0.46, counting 0.06, colors
0.04, position 0.12, color_attr 0.02); that is this suite's chance level.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.shapes import (
    CAPTION_PREFIX,
    CATEGORIES,
    COLOR_CATEGORIES,
    COLORS,
    NUMBERS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Box,
    ShapeObject,
    ShapeSpec,
    relative_position,
    validate,
)
from ..errors import ConfigError

MAX_RESIDUAL = 64.0  # RGB units (0-255) off a colour's mixing line
MIN_AREA = 0.004  # fraction of the image
MIN_CONFIDENCE = 0.6  # template IoU
MAX_OBJECTS = 16  # per shape, GenEval's default

_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / box area
_SUB = 4  # template supersampling
_PAD = 2  # px around a component that still belong to its soft mask
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is its fitted template's ``(x0, y0, x1, y1)`` in pixels."""

    shape: str
    color: str
    box: Box
    area: int
    confidence: float


# ---------------------------------------------------------------------------- detection


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ConfigError(f"alignment image: expected a PIL image or an HxWx3 uint8 array, got shape {arr.shape}")
    return arr


def _unmix(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: per-pixel palette index (-1: background) and per-colour mixing weights."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    d = _PALETTE - bg  # (K, 3)
    norm2 = (d * d).sum(-1)
    x = arr - bg  # (H, W, 3)
    alpha = np.clip(x @ d.T / np.maximum(norm2, 1e-6), 0.0, 1.0)  # (H, W, K)
    residual = np.linalg.norm(x[..., None, :] - alpha[..., None] * d, axis=-1)
    # A colour too close to the background to be told from it cannot be read.
    valid = (alpha >= 0.5) & (residual <= MAX_RESIDUAL) & (norm2 >= (2 * MAX_RESIDUAL) ** 2)
    labels = np.where(valid, residual, np.inf).argmin(-1)
    return np.where(valid.any(-1), labels, -1), alpha


def _template_box(shape: str, mass: float, cx: float, cy: float) -> Box:
    """The box of ``shape`` with area ``mass`` and centroid ``(cx, cy)``."""
    side = float(np.sqrt(mass / _FILL[shape]))
    top = cy - (2 / 3 if shape == "triangle" else 1 / 2) * side  # a triangle's centroid is 2/3 down
    return (cx - side / 2, top, cx + side / 2, top + side)


def _coverage(shape: str, box: Box, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Fraction of each pixel of the window ``[y0, y0 + h) x [x0, x0 + w)`` inside the shape."""
    sub = (np.arange(_SUB) + 0.5) / _SUB
    ys = (y0 + np.arange(h)[:, None] + sub[None, :]).ravel()
    xs = (x0 + np.arange(w)[:, None] + sub[None, :]).ravel()
    v = (ys[:, None] - box[1]) / (box[3] - box[1])
    u = (xs[None, :] - box[0]) / (box[2] - box[0])
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside &= np.abs(u - 0.5) <= v / 2
    return inside.reshape(h, _SUB, w, _SUB).mean(axis=(1, 3))


def _fit_shape(weight: np.ndarray, y0: int, x0: int) -> tuple[str, float, Box]:
    """Step 3: the shape whose template, matched to the weight's mass and centroid (both
    unchanged by blur), has the highest soft IoU with it; returns (shape, IoU, box)."""
    mass = float(weight.sum())
    ys, xs = np.indices(weight.shape)
    cy = y0 + 0.5 + float((ys * weight).sum()) / mass
    cx = x0 + 0.5 + float((xs * weight).sum()) / mass
    best = ("", -1.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        box = _template_box(shape, mass, cx, cy)
        t = _coverage(shape, box, y0, x0, *weight.shape)
        iou = float(np.minimum(weight, t).sum() / np.maximum(weight, t).sum())
        best = max(best, (shape, iou, box), key=lambda b: b[1])
    return best


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """All objects in the image, ranked by confidence (steps 1-3)."""
    arr = _as_array(image)
    labels, alpha = _unmix(arr)
    h, w = labels.shape
    min_area = MIN_AREA * labels.size
    found = []
    for k, color in enumerate(COLORS):
        components, _ = ndimage.label(labels == k)
        for idx, sl in enumerate(ndimage.find_objects(components), start=1):
            area = int((components[sl] == idx).sum())
            if area < min_area:
                continue
            # The component's soft mask: its colour's weight within _PAD px of it.
            y0, x0 = max(sl[0].start - _PAD, 0), max(sl[1].start - _PAD, 0)
            window = (slice(y0, min(sl[0].stop + _PAD, h)), slice(x0, min(sl[1].stop + _PAD, w)))
            near = ndimage.binary_dilation(components[window] == idx, iterations=_PAD)
            shape, confidence, box = _fit_shape(alpha[window][..., k] * near, y0, x0)
            if confidence >= MIN_CONFIDENCE:
                found.append(Detection(shape, color, box, area, confidence))
    return sorted(found, key=lambda d: -d.confidence)


# ---------------------------------------------------------------------------- GenEval rules


def geneval_metadata(spec: ShapeSpec) -> dict[str, Any]:
    """GenEval's evaluation metadata (``tag``, ``include``, ``exclude``) for a spec."""
    objs, tag = spec.objects, spec.category
    meta: dict[str, Any] = {"tag": tag, "prompt": spec.caption, "include": [], "exclude": []}
    if tag == "counting":
        n = len(objs)
        meta["include"] = [{"class": objs[0].shape, "count": n}]
        meta["exclude"] = [{"class": objs[0].shape, "count": n + 1}]
    elif tag == "position":  # "A <rel> B": B is group 0, A is placed relative to it
        meta["include"] = [
            {"class": objs[1].shape, "count": 1},
            {"class": objs[0].shape, "count": 1, "position": [spec.relation, 0]},
        ]
    else:
        colored = tag in COLOR_CATEGORIES
        meta["include"] = [
            {"class": o.shape, "count": 1, **({"color": o.color} if colored else {})} for o in objs
        ]
    return meta


def _failure(req: dict[str, Any], found: list[Detection], groups: list[list[Detection] | None]) -> str | None:
    """Why one include clause fails on its top-``count`` objects ``found``, or None."""
    cls, count = req["class"], req["count"]
    if len(found) < count:
        return f"expected {cls}>={count}, found {len(found)}"
    if "color" in req and sum(d.color == req["color"] for d in found) < count:
        return f"expected {req['color']} {cls}>={count}, found {[d.color for d in found]}"
    if "position" in req:
        rel, target = req["position"]
        if groups[target] is None:
            return f"no target for {cls} to be {rel}"
        for a in found:
            for b in groups[target]:
                actual = relative_position(a.box, b.box)
                if rel not in actual:
                    return f"expected {cls} {rel} target, found {' and '.join(sorted(actual)) or 'no relation'}"
    return None


def evaluate(detections: Sequence[Detection], metadata: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's ``evaluate``: include clauses ANDed, exclude clauses ORed; colour and
    position checked on the top-``count`` objects of a class. Returns (correct, reason)."""
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if len(by_class.setdefault(d.shape, [])) < MAX_OBJECTS:
            by_class[d.shape].append(d)
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        found = by_class.get(req["class"], [])[: req["count"]]
        reason = _failure(req, found, groups)
        groups.append(found if reason is None else None)
        reasons += [reason] if reason else []
    for req in metadata.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def as_spec(spec: ShapeSpec | dict[str, Any] | str) -> ShapeSpec:
    """A spec from a :class:`ShapeSpec`, its dict form, or a caption (via :func:`parse_caption`)."""
    if isinstance(spec, ShapeSpec):
        return spec
    if isinstance(spec, str):
        return parse_caption(spec)
    return ShapeSpec.from_dict(spec)


def score_image(image: Image.Image | np.ndarray, spec: ShapeSpec | dict[str, Any] | str) -> bool:
    """Whether ``image`` satisfies the prompt ``spec`` under GenEval's rules."""
    return evaluate(detect(image), geneval_metadata(as_spec(spec)))[0]


def score(
    images: Iterable[Image.Image | np.ndarray], specs: Iterable[ShapeSpec | dict[str, Any] | str]
) -> dict[str, Any]:
    """GenEval-style report: ``{"overall", "categories": {cat: {"accuracy", "correct",
    "total"}}, "correct", "total"}``; ``overall`` is the mean over the categories present."""
    tally = {c: [0, 0] for c in CATEGORIES}
    try:
        for image, spec in zip(images, specs, strict=True):
            spec = as_spec(spec)
            tally[spec.category][0] += score_image(image, spec)
            tally[spec.category][1] += 1
    except ValueError as e:
        raise ConfigError(f"alignment score: images and specs differ in number ({e}); pass one spec per image") from e
    cats = {c: {"accuracy": k / n, "correct": k, "total": n} for c, (k, n) in tally.items() if n}
    return {
        "overall": float(np.mean([v["accuracy"] for v in cats.values()])) if cats else 0.0,
        "categories": cats,
        "correct": sum(v["correct"] for v in cats.values()),
        "total": sum(v["total"] for v in cats.values()),
    }


def score_folder(folder: str | Path) -> dict[str, Any]:
    """Score an imagefolder whose ``metadata.jsonl`` names ``file_name`` and a ``spec``
    (or only a ``text`` caption of the shapes grammar) per line."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(
            f"alignment folder {folder}: no metadata.jsonl; write one line per image with file_name and spec or text"
        )
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    images = (Image.open(folder / r["file_name"]) for r in rows)
    return score(images, [r["spec"] if r.get("spec") else r["text"] for r in rows])


# ---------------------------------------------------------------------------- captions


_NUM = {w: n for n, w in NUMBERS.items()}
_NP = rf"an? (?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)})"
_PATTERNS = {
    "counting": re.compile(rf"({'|'.join(_NUM)}) ({'|'.join(SHAPES)})s"),
    "position": re.compile(rf"{_NP} ({'|'.join(RELATIONS)}) {_NP}"),
    "pair": re.compile(rf"{_NP} and {_NP}"),
    "single": re.compile(_NP),
}


def parse_caption(text: str) -> ShapeSpec:
    """The prompt-only spec (no boxes; colours only where named) of a caption of the
    shapes grammar; the inverse of ``caption`` up to :meth:`ShapeSpec.prompt_only`."""
    body = " ".join(text.strip().lower().rstrip(".").split())
    body = body.removeprefix(CAPTION_PREFIX)
    for kind, pattern in _PATTERNS.items():
        m = pattern.fullmatch(body)
        if m:
            break
    else:
        raise ConfigError(f"caption {text!r}: not in the shapes grammar (e.g. {CAPTION_PREFIX}a red circle)")
    g = m.groups()
    if kind == "counting":
        spec = ShapeSpec("counting", (ShapeObject(g[1]),) * _NUM[g[0]])
    elif kind == "position":
        spec = ShapeSpec("position", (ShapeObject(g[1], g[0]), ShapeObject(g[4], g[3])), g[2])
    elif kind == "pair":
        spec = ShapeSpec("color_attr" if g[0] else "two_object", (ShapeObject(g[1], g[0]), ShapeObject(g[3], g[2])))
    else:
        spec = ShapeSpec("colors" if g[0] else "single_object", (ShapeObject(g[1], g[0]),))
    if spec != spec.prompt_only() or (kind == "pair" and bool(g[0]) != bool(g[2])):
        raise ConfigError(
            f"caption {text!r}: name a colour for every object or for none (and none in position prompts)"
        )
    validate(spec)
    return spec


CHANCE_SAMPLES = 600  # renders behind a chance level: standard error about 0.02 per category


def chance_level(n: int = CHANCE_SAMPLES, resolution: int = 64, seed: int = 0) -> dict:
    """This suite's chance level, measured: ground-truth renders of ``ShapesDataset`` scored
    against the prompt of the *next* sample of the same category -- a model that draws valid
    pictures but ignores what the prompt asks for. Uses at least ``CHANCE_SAMPLES`` renders
    (the first ``n`` are the evaluated prompts), so a small prompt set still gets a stable
    figure. Returns :func:`score`'s dict (computed once per process for each setting)."""
    return copy.deepcopy(_chance_level(max(n, CHANCE_SAMPLES), resolution, seed))


@functools.lru_cache(maxsize=8)
def _chance_level(n: int, resolution: int, seed: int) -> dict:
    from collections import defaultdict

    from ..data.shapes import ShapesDataset

    ds = ShapesDataset(n, resolution=resolution, seed=seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i in range(len(ds)):
        by_category[ds.spec(i).category].append(i)
    images, specs = [], []
    for idx in by_category.values():
        for k, i in enumerate(idx):
            images.append(ds[i]["image"])
            specs.append(ds.spec(idx[(k + 1) % len(idx)]))
    return score(images, specs)
