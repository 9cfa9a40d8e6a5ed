"""Where training images and captions come from: a Hugging Face ``datasets`` dataset, a
local image folder with captions, or WebDataset tar shards (paper sec. 4, sup. H).

Every source yields :class:`Sample` records in a *stable order with a stable index*
(the position in that order), so ``precompute`` can assign index ranges to shards
deterministically, resume after a crash and split work across processes. Images are
yielded undecoded (bytes or a path) so a bad image is skipped and counted by
``data/images.py``, not raised deep inside a data library.

Decisions where the paper is silent:

* **Order**: HF datasets keep their row order; folders are sorted by relative POSIX path;
  WebDataset tars are read in the order given (a directory: sorted ``*.tar``), members in
  tar order, never shuffled, never split by node or worker (every process sees every index).
* **Captions** are stripped of surrounding whitespace. A caption that is missing for a sample
  (no side file, a null cell) becomes ``None`` and the stage stores it as ``""`` (a valid
  unconditional sample) and counts it; a list of captions (COCO style) keeps the first.
* **Class labels** (ImageNet style, sup. H): the names of a ``ClassLabel`` feature are
  split on ``", "`` into synonyms; training picks one at random for "a photo of <name>".
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from ..errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_KINDS = ("auto", "hf", "folder", "webdataset")
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json", "dataset_info.json")  # what save_to_disk writes


@dataclass
class Sample:
    """One source record; ``image`` is undecoded (bytes / path) or ``None`` if absent."""

    index: int
    key: str
    image: bytes | Path | Image.Image | None
    caption: str | None = None
    label: int | None = None


def split_synonyms(names: list[str]) -> list[list[str]]:
    """ImageNet-style class names ("tench, Tinca tinca") -> synonym lists."""
    return [[s.strip() for s in name.split(", ") if s.strip()] for name in names]


def clean_caption(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else str(value).strip()


class Source(ABC):
    """A finite, ordered sequence of samples; ``max_samples`` caps it (a prefix)."""

    kind: ClassVar[str]

    def __init__(self, *, max_samples: int | None = None):
        self.max_samples = max_samples
        self.has_captions = True
        self.label_names: list[list[str]] | None = None

    @property
    def num_samples(self) -> int | None:
        """Number of samples if known without reading everything (``None``: streaming)."""
        n = self._length()
        if n is None:
            return None
        return n if self.max_samples is None else min(n, self.max_samples)

    def iter_range(self, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Samples with ``start <= index < stop`` (``stop=None``: to the end)."""
        if self.max_samples is not None:
            stop = self.max_samples if stop is None else min(stop, self.max_samples)
        if stop is not None and stop <= start:
            return iter(())
        return self._iter(start, stop)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_samples": self.num_samples, "has_captions": self.has_captions}

    @abstractmethod
    def _length(self) -> int | None: ...

    @abstractmethod
    def _iter(self, start: int, stop: int | None) -> Iterator[Sample]: ...


class HFSource(Source):
    """A ``datasets`` dataset: a ``save_to_disk`` folder (``load_from_disk``) or a hub name
    (``load_dataset``), map-style or streaming. Images are read undecoded
    (``Image(decode=False)``) so bad files are skipped by the caller."""

    kind = "hf"

    def __init__(self, path: str, *, split: str = "train", image_column: str = "image",
                 caption_column: str | None = "text", label_column: str | None = None,
                 streaming: bool = False, max_samples: int | None = None):
        super().__init__(max_samples=max_samples)
        import datasets

        self.path, self.split, self.streaming = path, split, streaming
        ds = self._load(datasets, path, split, streaming)
        features = ds.features
        columns = list(features) if features is not None else None
        for option, col in (("image_column", image_column), ("caption_column", caption_column),
                            ("label_column", label_column)):
            if col is not None and columns is not None and col not in columns:
                raise ConfigError(f"{option}: column {col!r} is not in {path!r} (columns: {', '.join(columns)}); "
                                  f"pass --{option.replace('_', '-')} with one of them")
        if features is not None and isinstance(features.get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        if label_column and features is not None and isinstance(features[label_column], datasets.ClassLabel):
            self.label_names = split_synonyms(features[label_column].names)
        self.ds, self.image_column = ds, image_column
        self.caption_column, self.label_column = caption_column, label_column
        self.has_captions = caption_column is not None

    @staticmethod
    def _load(datasets, path: str, split: str, streaming: bool):
        if detect_kind(path) == "hf" and Path(path).is_dir():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"split: {split!r} is not in {path!r} (splits: {', '.join(ds)}); pass --split")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        try:
            return datasets.load_dataset(path, split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad --source for the user
            raise ConfigError(f"source: cannot load dataset {path!r} (split {split!r}): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}; pass --source a save_to_disk folder, "
                              "an image folder, WebDataset tars, or a reachable hub dataset") from None

    def _length(self) -> int | None:
        return None if self.streaming else len(self.ds)

    def _iter(self, start: int, stop: int | None) -> Iterator[Sample]:
        if self.streaming:
            rows = self.ds.skip(start) if start else self.ds
        else:
            stop = len(self.ds) if stop is None else min(stop, len(self.ds))
            rows = (self.ds[i] for i in range(start, stop))
        for index, row in zip(itertools.count(start) if stop is None else range(start, stop), rows):
            yield Sample(index=index, key=str(index), image=_as_image_src(row.get(self.image_column)),
                         caption=clean_caption(row.get(self.caption_column)) if self.caption_column else None,
                         label=None if self.label_column is None else int(row[self.label_column]))

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "split": self.split, "streaming": self.streaming,
                "image_column": self.image_column, "caption_column": self.caption_column,
                "label_column": self.label_column}


def _as_image_src(value: Any) -> bytes | Path | Image.Image | None:
    if isinstance(value, dict):  # datasets.Image(decode=False)
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]) if value.get("path") else None
    if isinstance(value, str):
        return Path(value)
    return value


class FolderSource(Source):
    """Images under a folder (recursive, sorted by relative path) with captions from a
    ``metadata.jsonl`` (``file_name`` + the caption column, HF ``imagefolder`` layout) or
    from a ``.txt`` file next to each image (same stem)."""

    kind = "folder"

    def __init__(self, path: str | Path, *, caption_column: str | None = "text", label_column: str | None = None,
                 max_samples: int | None = None):
        super().__init__(max_samples=max_samples)
        self.root = Path(path)
        if not self.root.is_dir():
            raise ConfigError(f"source: {str(path)!r} is not a directory; pass --source an image folder")
        self.files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                            key=lambda p: p.relative_to(self.root).as_posix())
        self.caption_column, self.label_column = caption_column, label_column
        self.metadata = self._read_metadata()
        self.has_captions = caption_column is not None

    def _read_metadata(self) -> dict[str, dict]:
        meta = self.root / "metadata.jsonl"
        if not meta.exists():
            return {}
        rows = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[Path(row["file_name"]).as_posix()] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{meta}:{n}: expected a JSON object with a 'file_name' key ({e})") from None
        return rows

    def _length(self) -> int:
        return len(self.files)

    def _iter(self, start: int, stop: int | None) -> Iterator[Sample]:
        for index in range(start, len(self.files) if stop is None else min(stop, len(self.files))):
            path = self.files[index]
            rel = path.relative_to(self.root).as_posix()
            row = self.metadata.get(rel, {})
            caption = None
            if self.caption_column is not None:
                side = path.with_suffix(".txt")
                caption = (clean_caption(row.get(self.caption_column)) if self.caption_column in row
                           else side.read_text(errors="replace").strip() if side.exists() else None)
            label = row.get(self.label_column) if self.label_column else None
            yield Sample(index=index, key=rel.rsplit(".", 1)[0], image=path, caption=caption,
                         label=None if label is None else int(label))

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.root), "caption_column": self.caption_column}


class WebDatasetSource(Source):
    """WebDataset tar shards (``webdataset``): an image member (jpg/png/webp/...) plus a
    ``txt`` caption or a ``json`` with the caption column, and an optional ``cls`` label."""

    kind = "webdataset"

    def __init__(self, urls: str | list[str], *, caption_column: str | None = "text", label_column: str | None = None,
                 max_samples: int | None = None):
        super().__init__(max_samples=max_samples)
        if isinstance(urls, str) and Path(urls).is_dir():
            urls = [str(p) for p in sorted(Path(urls).glob("*.tar"))]
            if not urls:
                raise ConfigError(f"source: no *.tar files in {urls!r}; pass --source a folder of WebDataset shards")
        self.urls, self.caption_column, self.label_column = urls, caption_column, label_column
        self.has_captions = caption_column is not None

    def _length(self) -> None:
        return None

    def _iter(self, start: int, stop: int | None) -> Iterator[Sample]:
        import webdataset as wds

        ds = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for index, rec in enumerate(itertools.islice(ds, start, stop), start):
            meta = json.loads(rec["json"]) if "json" in rec else {}
            image = next((rec[e[1:]] for e in IMAGE_EXTS if e[1:] in rec), None)
            caption = None
            if self.caption_column is not None:
                caption = rec["txt"].decode("utf-8", "replace").strip() if "txt" in rec else clean_caption(
                    meta.get(self.caption_column))
            label = int(rec["cls"]) if "cls" in rec else meta.get(self.label_column) if self.label_column else None
            url = Path(str(rec.get("__url__", ""))).stem
            yield Sample(index=index, key=f"{url}/{rec['__key__']}", image=image, caption=caption,
                         label=None if label is None else int(label))

    def describe(self) -> dict:
        return {**super().describe(), "urls": self.urls, "caption_column": self.caption_column}


def detect_kind(path: str) -> str:
    """``auto`` source kind: a ``save_to_disk`` folder -> hf; ``.tar`` / brace pattern / a folder of tars
    -> webdataset; another folder -> folder; anything else -> a hub dataset name (hf)."""
    p = Path(path)
    if p.is_dir():
        if any((p / f).exists() for f in _SAVED_DATASET_FILES):
            return "hf"
        if any(p.glob("*.tar")) and not any(f.suffix.lower() in IMAGE_EXTS for f in p.iterdir()):
            return "webdataset"
        return "folder"
    if path.endswith(".tar") or ("{" in path and ".tar" in path):
        return "webdataset"
    return "hf"


def open_source(path: str, *, kind: str = "auto", split: str = "train", image_column: str = "image",
                caption_column: str | None = "text", label_column: str | None = None, streaming: bool = False,
                max_samples: int | None = None) -> Source:
    """Build the source named by ``path`` (see :func:`detect_kind`)."""
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"source_kind: expected one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "hf":
        return HFSource(path, split=split, image_column=image_column, caption_column=caption_column,
                        label_column=label_column, streaming=streaming, max_samples=max_samples)
    if kind == "folder":
        return FolderSource(path, caption_column=caption_column, label_column=label_column, max_samples=max_samples)
    return WebDatasetSource(path, caption_column=caption_column, label_column=label_column, max_samples=max_samples)
