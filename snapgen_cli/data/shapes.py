"""Captioned coloured shapes: the built-in, procedurally generated data set of the toy scale.

The embedded demo (DESIGN.md, "The embedded default") trains on these images and is judged
by :mod:`snapgen_cli.eval.alignment`, a GenEval-style scorer (supplement I) that needs no
learned detector. Captions follow GenEval's prompt templates, one per task, over a
vocabulary of shapes (GenEval's object classes) and colours:

=============  ==============================================  =====================================
category       caption                                         what GenEval checks
=============  ==============================================  =====================================
single_object  ``a photo of a circle``                         one circle
two_object     ``a photo of a circle and a square``            a circle and a square
counting       ``a photo of three triangles``                  exactly three triangles
colors         ``a photo of a red circle``                     the circle is red
position       ``a photo of a square left of a triangle``      the square is left of the triangle
color_attr     ``a photo of a red square and a blue circle``   the square is red, the circle blue
=============  ==============================================  =====================================

Decisions (the paper is silent; GenEval's own choices where it has them):

* **Colours only where the task is about colour.** As in GenEval, the single-object,
  two-object, counting and position captions name no colour; their objects get random
  colours. So the caption alone says what is checked, and :func:`~snapgen_cli.eval.
  alignment.parse_caption` recovers the category and the requirements from it.
* **Vocabulary.** Shapes circle, square, triangle (upright, isosceles), each filling a
  square box, so a box-relative template tells them apart. Five saturated colours chosen
  far apart along their directions from the light grey background (the scorer reads a
  pixel as a mix of background and one colour, which anti-aliased or blurred edges are).
* **Layout.** Boxes are normalised to [0, 1] so one spec renders at any resolution;
  objects keep ``EDGE_MARGIN`` from the border and ``GAP`` between boxes (counting and
  position stay well defined). Position layouts show the named relation, and only it, under
  GenEval's rule at any threshold up to twice GenEval's, so they survive blur. Counting
  uses 2-4 objects, like GenEval. Two-object, position and colour-attribution samples use
  two different shapes; colour attribution also two different colours.
* **Rendering** draws at 4x and box-downsamples (anti-aliased edges, like a generated
  image's), deterministic to the byte for a given spec and resolution.
* **Sampling.** Sample ``i`` of a data set draws from ``numpy.random.default_rng([seed,
  i])`` (random access, order-free) and categories cycle, so every category is equally
  represented.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import ConfigError, SnapgenError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (20, 180, 40),
    "blue": (25, 60, 225),
    "yellow": (245, 215, 20),
    "purple": (170, 30, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_CATEGORIES: tuple[str, ...] = ("colors", "color_attr")  # the tasks whose prompts name colours
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
CAPTION_PREFIX = "a photo of "

EDGE_MARGIN = 0.06
GAP = 0.06
POSITION_THRESHOLD = 0.1  # GenEval's default
MIN_RESOLUTION = 32
# Seed offsets of the data sets ``snapgen shapes-data`` writes from one run seed, so that no
# two of them share a random stream: the captioned training set uses the run seed itself.
HOLDOUT_SEED_OFFSET = 1_000_003  # held-out images (decoder PSNR)
CLASSES_SEED_OFFSET = 2_000_003  # class-conditional pretraining set
EVAL_PROMPT_SEED = 3_000_017  # `snapgen eval`'s default alignment prompts: a stream no training set draws from
_SUPERSAMPLE = 4
_MAX_LAYOUT_TRIES = 10_000
# Box side (fraction of the image) by number of objects.
_SIZE_RANGE = {1: (0.30, 0.45), 2: (0.24, 0.34), 3: (0.22, 0.30), 4: (0.22, 0.28)}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels or normalised; y grows down)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a spec: a shape, its colour and its normalised box.

    ``color`` and ``box`` are ``None`` in a spec parsed from a caption where the caption
    does not say them (see :func:`ShapeSpec.prompt_only`).
    """

    shape: str
    color: str | None = None
    box: Box | None = None


@dataclass(frozen=True)
class ShapeSpec:
    """The structured truth of one sample: GenEval category, objects and relation.

    For ``position``, ``objects[0] <relation> objects[1]`` ("a square left of a triangle").
    """

    category: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        return caption(self)

    def prompt_only(self) -> ShapeSpec:
        """The spec as far as its caption tells it: no boxes, colours only where named."""
        keep_color = self.category in COLOR_CATEGORIES
        objects = tuple(ShapeObject(o.shape, o.color if keep_color else None) for o in self.objects)
        return ShapeSpec(self.category, objects, self.relation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "objects": [
                {"shape": o.shape, "color": o.color, "box": None if o.box is None else list(o.box)}
                for o in self.objects
            ],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeSpec:
        """Parse and validate a spec dict (as written in ``metadata.jsonl``)."""
        try:
            objects = tuple(
                ShapeObject(o["shape"], o.get("color"), None if o.get("box") is None else tuple(o["box"]))
                for o in d["objects"]
            )
            spec = cls(d["category"], objects, d.get("relation"))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"shape spec {d!r}: expected keys category, objects[shape, color, box], relation ({e})") from e
        validate(spec)
        return spec


def validate(spec: ShapeSpec) -> None:
    """Raise :class:`ConfigError` naming the bad field of a spec."""

    def check(value: Any, allowed: Sequence[Any], what: str) -> None:
        if value not in allowed:
            raise ConfigError(f"shape spec {what}: expected one of {list(allowed)}, got {value!r}")

    check(spec.category, CATEGORIES, "category")
    want = {"single_object": (1,), "colors": (1,), "counting": tuple(NUMBERS)}.get(spec.category, (2,))
    check(len(spec.objects), want, f"{spec.category}: number of objects")
    for i, o in enumerate(spec.objects):
        check(o.shape, SHAPES, f"objects[{i}].shape")
        check(o.color, COLORS if spec.category in COLOR_CATEGORIES else (None, *COLORS), f"objects[{i}].color")
    n_shapes = len({o.shape for o in spec.objects})
    if spec.category == "counting":
        if n_shapes != 1:
            raise ConfigError("shape spec counting: all objects must have the same shape")
    elif len(spec.objects) == 2 and n_shapes != 2:
        raise ConfigError(f"shape spec {spec.category}: the two objects must have different shapes")
    check(spec.relation, RELATIONS if spec.category == "position" else (None,), "relation")


# ---------------------------------------------------------------------------- captions


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _phrase(o: ShapeObject, with_color: bool) -> str:
    return _with_article(f"{o.color} {o.shape}" if with_color else o.shape)


def caption(spec: ShapeSpec) -> str:
    """GenEval's prompt template for the spec's category (see the module table)."""
    objs = spec.objects
    colored = spec.category in COLOR_CATEGORIES
    if spec.category == "counting":
        body = f"{NUMBERS[len(objs)]} {objs[0].shape}s"
    elif spec.category == "position":
        body = f"{_phrase(objs[0], False)} {spec.relation} {_phrase(objs[1], False)}"
    else:
        body = " and ".join(_phrase(o, colored) for o in objs)
    return CAPTION_PREFIX + body


# ---------------------------------------------------------------------------- geometry


def relative_position(a: Box, b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relation of box ``a`` to box ``b`` (``evaluate_images.relative_position``).

    Centre offset shrunk per axis by ``threshold`` times the summed box sizes, then
    normalised by the raw offset's length; a component beyond 0.5 names the relation.
    """
    boxes = np.array([a, b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r, holds in rels.items() if holds}


def _apart(a: Box, b: Box) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _layout(rng: np.random.Generator, n: int, relation: str | None = None) -> list[Box]:
    """``n`` square boxes inside the margin, pairwise ``GAP`` apart (rejection sampling)."""
    lo, hi = _SIZE_RANGE[n]
    for _ in range(_MAX_LAYOUT_TRIES):
        boxes: list[Box] = []
        for s in rng.uniform(lo, hi, size=n):
            x0, y0 = rng.uniform(EDGE_MARGIN, 1 - EDGE_MARGIN - s, size=2)
            boxes.append((float(x0), float(y0), float(x0 + s), float(y0 + s)))
        if not all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            continue
        # Relations only vanish as the threshold grows: this shows `relation` alone for
        # every threshold up to twice GenEval's.
        if relation is None or (
            relative_position(boxes[0], boxes[1], 0.0) == {relation}
            and relation in relative_position(boxes[0], boxes[1], 2 * POSITION_THRESHOLD)
        ):
            return boxes
    raise SnapgenError(f"could not lay out {n} shapes in {_MAX_LAYOUT_TRIES} tries (relation {relation!r})")


# ---------------------------------------------------------------------------- sampling


def sample_spec(rng: np.random.Generator, category: str) -> ShapeSpec:
    """A random spec of ``category``, with a layout (see the module docstring)."""
    if category not in CATEGORIES:
        raise ConfigError(f"shapes category: expected one of {list(CATEGORIES)}, got {category!r}")

    def pick(options: Sequence[str], k: int) -> list[str]:
        return [options[i] for i in rng.choice(len(options), size=k, replace=False)]

    relation = None
    if category in ("single_object", "colors"):
        shapes = pick(SHAPES, 1)
    elif category == "counting":
        shapes = pick(SHAPES, 1) * int(rng.choice(list(NUMBERS)))
    else:
        shapes = pick(SHAPES, 2)
        if category == "position":
            relation = RELATIONS[rng.integers(len(RELATIONS))]
    if category == "color_attr":
        colors = pick(COLORS, 2)
    else:
        colors = [COLORS[i] for i in rng.integers(len(COLORS), size=len(shapes))]
    boxes = _layout(rng, len(shapes), relation)
    return ShapeSpec(category, tuple(ShapeObject(s, c, b) for s, c, b in zip(shapes, colors, boxes)), relation)


def _polygon(shape: str, box: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def render(spec: ShapeSpec, resolution: int = 64) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``resolution`` pixels a side (4x supersampled)."""
    check_resolution(resolution)
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in spec.objects:
        if o.box is None or o.color is None:
            raise ConfigError(
                f"render: object {o.shape!r} has no box/colour; render a sampled spec, not a parsed caption"
            )
        # A pixel-aligned box: a shape of side s covers [x0, x0 + s) exactly.
        box = tuple(round(v * big) for v in o.box)
        box = (box[0], box[1], box[2] - 1, box[3] - 1)
        fill = PALETTE[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon(_polygon(o.shape, box), fill=fill)
    return image.reduce(_SUPERSAMPLE)


def check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ConfigError(f"shapes resolution: expected an integer >= {MIN_RESOLUTION}, got {resolution!r}")


# ---------------------------------------------------------------------------- data sets


@dataclass
class ShapesBase(Dataset):
    """``n`` samples at ``resolution`` px drawn from ``seed`` (sample ``i`` is random-access)."""

    n: int
    resolution: int = 64
    seed: int = 0
    transform: Callable[[Image.Image], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"shapes n: expected a positive integer, got {self.n!r}")
        check_resolution(self.resolution)

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range for {self.n} samples")
        return np.random.default_rng([self.seed, i])

    def spec(self, i: int) -> ShapeSpec:
        raise NotImplementedError

    def record(self, i: int, spec: ShapeSpec) -> dict[str, Any]:
        """The JSON-able metadata of sample ``i`` (text and spec; subclasses add fields)."""
        return {"text": spec.caption, "spec": spec.to_dict()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{"image": PIL image (or transform(image)), "text": caption, "spec": ShapeSpec, ...}``."""
        spec = self.spec(i)
        image = render(spec, self.resolution)
        return {**self.record(i, spec), "image": self.transform(image) if self.transform else image, "spec": spec}


@dataclass
class ShapesDataset(ShapesBase):
    """Text-to-image samples: GenEval's six categories over coloured shapes, cycling."""

    categories: Sequence[str] = CATEGORIES

    def __post_init__(self) -> None:
        super().__post_init__()
        self.categories = tuple(self.categories)
        bad = [c for c in self.categories if c not in CATEGORIES]
        if not self.categories or bad:
            raise ConfigError(
                f"shapes categories: expected a non-empty subset of {list(CATEGORIES)}, got {list(self.categories)}"
            )

    def spec(self, i: int) -> ShapeSpec:
        rng = self._rng(i)
        return sample_spec(rng, self.categories[i % len(self.categories)])


@dataclass
class ShapesClassDataset(ShapesBase):
    """Class-conditional samples for ``pretrain`` (sup. H's "a photo of <class name>").

    One object per image, a random colour, label = index of the shape in
    :attr:`class_names`; labels cycle so classes are balanced. Each shape has one name
    (no synonyms to draw from, unlike ImageNet).
    """

    class_names: tuple[str, ...] = field(default=SHAPES, init=False)

    def spec(self, i: int) -> ShapeSpec:
        rng = self._rng(i)
        color = COLORS[rng.integers(len(COLORS))]
        box = _layout(rng, 1)[0]
        return ShapeSpec("single_object", (ShapeObject(self.class_names[self.label(i)], color, box),))

    def label(self, i: int) -> int:
        return i % len(self.class_names)

    def record(self, i: int, spec: ShapeSpec) -> dict[str, Any]:
        return {**super().record(i, spec), "label": self.label(i)}


def write_folder(out_dir: str | os.PathLike[str], dataset: ShapesBase) -> Path:
    """Write ``dataset`` as an HF imagefolder: ``NNNNNN.png`` + ``metadata.jsonl`` lines
    ``{"file_name", "text", "spec"[, "label"]}``, and the captions in image order, one per line,
    in ``prompts.txt`` (a ``--prompt-file`` for ``eval``'s FID against this folder).

    Atomic: everything is written to a temp dir beside ``out_dir``, then renamed into place.
    An existing non-empty ``out_dir`` is an error (nothing is overwritten).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"shapes output {out}: already exists and is not empty; pass a new directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        records = []
        for i in range(len(dataset)):
            name = f"{i:06d}.png"
            spec = dataset.spec(i)
            render(spec, dataset.resolution).save(tmp / name)
            records.append({"file_name": name, **dataset.record(i, spec)})
        (tmp / "metadata.jsonl").write_text("\n".join(json.dumps(r, sort_keys=True) for r in records) + "\n")
        texts = [r.get("text") for r in records]
        if all(isinstance(t, str) and t for t in texts):
            (tmp / "prompts.txt").write_text("\n".join(texts) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
