"""Open, validate and crop training images (paper sec. 4 and sup. H: images -> AE latents).

Every image that cannot be used is *skipped and counted by reason*, never silently
dropped or silently altered. Decisions where the paper is silent:

* **Skipped** (reason key in the counts): ``no_image`` (a record without an image),
  ``zero_byte`` (empty file), ``corrupt`` (not decodable at all), ``truncated`` (the
  data stream ends early: PIL's ``LOAD_TRUNCATED_IMAGES`` stays off, a half-grey image
  is not a training sample), ``huge`` (more pixels than ``max_pixels``, checked from the
  header before any pixel is decoded: decompression-bomb guard), ``cmyk`` (no
  well-defined conversion to sRGB without the ICC profile the file may or may not carry;
  a naive conversion shifts colours), ``16bit`` (16-bit/float images are HDR, depth or
  scientific data; quantising them to 8 bits is lossy and they are rarely the training
  distribution), ``too_small`` (shorter side below ``min_side``; by default the largest
  target resolution, i.e. images are never upsampled).
* **Converted and counted** (well-defined conversions, key in ``converted``):
  ``palette`` (a palette entry *is* an RGB(A) colour), ``grayscale`` (L -> RGB repeats the
  channel), ``alpha`` (transparent pixels composited over white, the common choice of
  web-scraped T2I pipelines; without it transparent areas take arbitrary colours),
  ``animated`` (an animated GIF / PNG / WebP: its first frame is used).
* **Resize + crop**: the shorter side is resized to the target resolution (bicubic,
  antialiased) and a square crop of that size is taken at the centre or at a random
  offset. The crop's top-left corner (in resized pixels) and the original size are
  returned, as SDXL's size/crop micro-conditioning expects. A random crop draws from
  a generator seeded by ``(seed, sample index)``, so a resumed run crops identically.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import SnapgenError

SKIP_REASONS = ("no_image", "zero_byte", "corrupt", "truncated", "huge", "cmyk", "16bit", "too_small")
CONVERSIONS = ("palette", "grayscale", "alpha", "animated")
DEFAULT_MAX_PIXELS = 8192 * 8192
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageSkipped(Exception):
    """An image that is not used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ImageStats:
    """Per-reason counters of skipped and converted images (merged across shards), and
    which records were skipped (``{"key", "index", "reason", "detail"}``)."""

    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    skipped_files: list[dict] = field(default_factory=list)

    def skip(self, exc: ImageSkipped, key: str, index: int) -> None:
        self.skipped[exc.reason] += 1
        self.skipped_files.append({"key": key, "index": index, "reason": exc.reason, "detail": exc.detail})

    def merge(self, other: "ImageStats") -> None:
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        self.skipped_files += other.skipped_files


def open_image(src: bytes | str | Path | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 0, stats: ImageStats | None = None) -> Image.Image:
    """Decode ``src`` into a validated RGB image, or raise :class:`ImageSkipped`.

    Lossless conversions (palette, grayscale, alpha) are applied and counted in ``stats``.
    """
    img = src if isinstance(src, Image.Image) else _decode(src, max_pixels)
    w, h = img.size
    if w * h > max_pixels:
        raise ImageSkipped("huge", f"{w}x{h} > max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise ImageSkipped("too_small", f"{w}x{h}, shorter side < {min_side}")
    if img.mode == "CMYK":
        raise ImageSkipped("cmyk")
    if img.mode in _HIGH_DEPTH_MODES or any(";16" in str(t.args) for t in getattr(img, "tile", None) or []):
        raise ImageSkipped("16bit", f"mode {img.mode}")
    try:
        img.load()
    except OSError as e:
        raise ImageSkipped("truncated" if "truncat" in str(e).lower() else "corrupt", str(e)) from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageSkipped("corrupt", str(e)) from None
    if getattr(img, "is_animated", False) and stats is not None:
        stats.converted["animated"] += 1  # GIF / APNG / WebP animation: its first frame is the image
    return _to_rgb(img, stats)


def _decode(src: bytes | str | Path, max_pixels: int) -> Image.Image:
    data = Path(src).read_bytes() if isinstance(src, (str, Path)) else src
    if len(data) == 0:
        raise ImageSkipped("zero_byte")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageSkipped("huge", str(e)) from None
    except OSError as e:  # UnidentifiedImageError is an OSError
        truncated = "truncat" in str(e).lower() and not isinstance(e, UnidentifiedImageError)
        raise ImageSkipped("truncated" if truncated else "corrupt", str(e)) from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageSkipped("corrupt", str(e)) from None


def _to_rgb(img: Image.Image, stats: ImageStats | None) -> Image.Image:
    converted = []
    if img.mode == "P":
        converted.append("palette")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("L", "LA", "1"):
        converted.append("grayscale")
        img = img.convert("LA" if img.mode == "LA" else "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        converted.append("alpha")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if stats is not None:
        stats.converted.update(converted)
    return img


@dataclass(frozen=True)
class Crop:
    """A square crop: ``top``/``left`` in pixels of the image resized to ``size`` on its
    shorter side; ``original`` is the decoded image's (height, width)."""

    size: int
    top: int
    left: int
    original: tuple[int, int]


def resize_crop(img: Image.Image, size: int, *, crop: str = "center",
                rng: random.Random | None = None) -> tuple[Image.Image, Crop]:
    """Resize the shorter side to ``size`` (bicubic, antialiased), then take a
    ``size`` x ``size`` crop at the centre or, for ``crop="random"``, at a random offset."""
    w, h = img.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "center":
        top, left = (rh - size) // 2, (rw - size) // 2
    elif crop == "random":
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - size), rng.randint(0, rw - size)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return img.crop((left, top, left + size, top + size)), Crop(size, top, left, (h, w))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float tensor (3, H, W) in [-1, 1] (the AE's input range)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


def sample_rng(seed: int, index: int) -> random.Random:
    """The per-sample generator of random crops: same (seed, index) -> same crop."""
    return random.Random(f"{seed}:{index}")


def image_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 0,
               fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Equal-size images pasted row-major into a ``cols``-wide grid (default: up to 8) with
    ``pad`` px between and around cells."""
    if not images:
        raise SnapgenError("grid: no images")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise SnapgenError(f"grid: images differ in size ({sorted({im.size for im in images})})")
    cols = cols or min(len(images), 8)
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), fill)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_png(image: Image.Image | Sequence[Image.Image], path: Path, cols: int = 1, pad: int = 0) -> None:
    """Write a PNG (or a ``cols``-wide grid of several) atomically: a ``.part`` file beside it,
    then a rename (the temp name has no image extension, so a crash leaves nothing that a
    metric or a resumed run would take for a finished image)."""
    image = image if isinstance(image, Image.Image) else image_grid(image, cols=cols, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
