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
3. **Shape** by template: a component's mask is compared with a circle, a square and an
   upright triangle inscribed in its bounding box; the best IoU names the shape and is the
   detection's *confidence* (GenEval's detector score); below ``MIN_CONFIDENCE`` the
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
noise of std 8/255 and a colour jitter; a blank (background-only) image scores 0.0;
uniform-noise images score 0.0 (no component survives the confidence threshold), so
"chance" on this suite is 0.
"""

from __future__ import annotations

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

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One detected object: pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive)."""

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


def segment(image: Image.Image | np.ndarray) -> np.ndarray:
    """Per-pixel palette index (into ``shapes.COLORS``), -1 for background (step 1)."""
    arr = _as_array(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    d = _PALETTE - bg  # (K, 3)
    norm2 = (d * d).sum(-1)
    x = arr - bg  # (H, W, 3)
    alpha = np.clip(x @ d.T / np.maximum(norm2, 1e-6), 0.0, 1.0)  # (H, W, K)
    residual = np.linalg.norm(x[..., None, :] - alpha[..., None] * d, axis=-1)
    # A colour too close to the background to be told from it cannot be read.
    valid = (alpha >= 0.5) & (residual <= MAX_RESIDUAL) & (norm2 >= (2 * MAX_RESIDUAL) ** 2)
    residual = np.where(valid, residual, np.inf)
    labels = residual.argmin(-1)
    return np.where(valid.any(-1), labels, -1)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape inscribed in an ``h`` x ``w`` box, sampled at pixel centres."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def _classify(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the best template for a component's box-cropped mask (step 3)."""
    ious = {s: (mask & t).sum() / (mask | t).sum() for s, t in _templates(*mask.shape).items()}
    shape = max(SHAPES, key=ious.__getitem__)
    return shape, float(ious[shape])


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """All objects in the image, ranked by confidence (steps 1-3)."""
    labels = segment(image)
    min_area = MIN_AREA * labels.size
    found = []
    for k, color in enumerate(COLORS):
        components, _ = ndimage.label(labels == k)
        for idx, sl in enumerate(ndimage.find_objects(components), start=1):
            mask = components[sl] == idx
            area = int(mask.sum())
            if area < min_area:
                continue
            shape, confidence = _classify(mask)
            if confidence >= MIN_CONFIDENCE:
                box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
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
        colored = tag in ("colors", "color_attr")
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
    images, specs = list(images), [as_spec(s) for s in specs]
    if len(images) != len(specs):
        raise ConfigError(f"alignment score: {len(images)} images but {len(specs)} specs; pass one spec per image")
    tally = {c: [0, 0] for c in CATEGORIES}
    for image, spec in zip(images, specs):
        tally[spec.category][0] += score_image(image, spec)
        tally[spec.category][1] += 1
    cats = {c: {"accuracy": k / n, "correct": k, "total": n} for c, (k, n) in tally.items() if n}
    return {
        "overall": float(np.mean([v["accuracy"] for v in cats.values()])) if cats else 0.0,
        "categories": cats,
        "correct": sum(v["correct"] for v in cats.values()),
        "total": len(specs),
    }


def score_folder(folder: str | Path) -> dict[str, Any]:
    """Score an imagefolder whose ``metadata.jsonl`` names ``file_name`` and a ``spec``
    (or only a ``text`` caption of the shapes grammar) per line."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"alignment folder {folder}: no metadata.jsonl; write one line per image with file_name and spec or text")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    images = [Image.open(folder / r["file_name"]) for r in rows]
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
        raise ConfigError(f"caption {text!r}: name a colour for every object or for none (and none in position prompts)")
    validate(spec)
    return spec
