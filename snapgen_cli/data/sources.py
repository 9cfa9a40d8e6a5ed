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
* **Class labels** (ImageNet style, sup. H: "a photo of <class name>", a random synonym each
  time) come, for a ``label_column``, from the first of:

  1. ``class_names`` (``--class-names FILE``): a JSON list whose entry ``i`` names class id
     ``i``, or a JSON object from a label string (a class folder's name, a string label, a
     ``ClassLabel`` name) to its names; an entry is one name, comma-separated synonyms
     (``"tench, Tinca tinca"``, ImageNet's style) or a list of synonyms;
  2. a hub / ``save_to_disk`` dataset's ``ClassLabel`` names;
  3. string labels: a dataset's string column, the ``label_column`` of a folder's
     ``metadata.jsonl`` / ``metadata.csv``, or, when the metadata has no such column, class
     folders (``<class name>/<image>``). All follow ``datasets``' ``ClassLabel`` /
     ``imagefolder``: the label of an image in a class folder is its parent folder's name, and
     class ids are the distinct strings sorted, so ids match ``class_encode_column`` and
     ``load_dataset("imagefolder", data_dir=...)``.

  Names are split on commas into synonyms. Integer labels with no names (a folder's numeric
  ``label`` column, an ``int`` dataset column, WebDataset ``cls``) are an error that says to
  pass ``--class-names``; so is a labelled image with no label, or a label with no name.
"""

from __future__ import annotations

import csv
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
    """ImageNet-style class names ("tench, Tinca tinca") -> synonym lists (split on commas)."""
    return [[s.strip() for s in name.split(",") if s.strip()] for name in names]


ClassNames = list[list[str]] | dict[str, list[str]]


def read_class_names(path: str | Path) -> ClassNames:
    """``--class-names FILE``: a JSON list (entry ``i`` names class id ``i``) or object (label
    string -> names); each entry a name, comma-separated synonyms or a list of synonyms."""
    where = f"class_names: {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; pass --class-names a JSON file (a list with one entry per "
                          'class id, e.g. ["tench, Tinca tinca", "goldfish"])') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, (list, dict)) or not data:
        raise ConfigError(f"{where}: expected a non-empty JSON list (entry i names class id i) or object "
                          f"(label -> names), got {type(data).__name__ if data else 'an empty one'}")
    items = data.items() if isinstance(data, dict) else enumerate(data)
    names = {}
    for key, entry in items:
        parts = entry if isinstance(entry, list) else [entry]
        synonyms = [s for group in split_synonyms(parts) for s in group] if all(isinstance(e, str) for e in parts) \
            else []
        if not synonyms:
            raise ConfigError(f"{where}: entry {key!r} is {json.dumps(entry)}; expected a non-empty name, "
                              "comma-separated synonyms or a list of names")
        names[key] = synonyms
    return list(names.values()) if isinstance(data, list) else names


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
        #: Synonyms of each class id, when the labels have names.
        self.label_names: list[list[str]] | None = None
        #: The label string of each class id where labels are strings (folders, ClassLabel names).
        self.label_keys: list[str] | None = None
        #: Where the names come from: "ClassLabel", "folders", "labels" or the --class-names file.
        self.names_from: str | None = None
        #: The largest integer label, where it is known before reading the samples.
        self.max_label: int | None = None

    def use_class_names(self, names: ClassNames, path: str) -> None:
        """Name the classes from a ``--class-names`` file (it wins over names the source has)."""
        where = f"class_names: {path}"
        if isinstance(names, dict):
            if self.label_keys is None:
                raise ConfigError(f"{where}: a JSON object maps label strings to names, but this source's labels "
                                  "are integers; give a JSON list (entry i names class id i)")
            if missing := [k for k in self.label_keys if k not in names]:
                raise ConfigError(f"{where}: no entry for label {missing[0]!r} ({len(missing)} of "
                                  f"{len(self.label_keys)} labels missing)")
            names = [names[k] for k in self.label_keys]
        elif self.label_keys is not None and len(names) != len(self.label_keys):
            raise ConfigError(f"{where}: lists {len(names)} classes, the source has {len(self.label_keys)} "
                              f"({', '.join(map(repr, self.label_keys[:3]))}, ... in class-id order); give one entry "
                              "per class in that order, or a JSON object label -> names")
        elif self.max_label is not None and self.max_label >= len(names):
            raise ConfigError(f"{where}: lists {len(names)} classes, but the source has label {self.max_label}; "
                              "give one entry per class id (0, 1, ...)")
        self.label_names, self.names_from = names, str(path)

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
        return {"kind": self.kind, "num_samples": self.num_samples, "has_captions": self.has_captions,
                "class_names": self.names_from}

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
        kind = features[label_column] if label_column and features is not None else None
        self._label_ids: dict[str, int] | None = None
        if isinstance(kind, datasets.ClassLabel):
            self.label_keys = list(kind.names)
            self.label_names, self.names_from = split_synonyms(self.label_keys), "ClassLabel"
        elif isinstance(kind, datasets.Value) and kind.dtype in ("string", "large_string"):
            if streaming:
                raise ConfigError(f"label_column {label_column!r}: string labels of a streamed dataset; read it "
                                  "map-style (--no-streaming), or cast the column to a ClassLabel")
            # ClassLabel's rule (Dataset.class_encode_column): ids are the distinct strings sorted
            self.label_keys = sorted(v for v in ds.unique(label_column) if v is not None)
            self.label_names, self.names_from = split_synonyms(self.label_keys), "labels"
            self._label_ids = {k: i for i, k in enumerate(self.label_keys)}
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
                         label=self._label(row))

    def _label(self, row: dict) -> int | None:
        value = None if self.label_column is None else row[self.label_column]
        if value is None:
            return None
        return self._label_ids[value] if self._label_ids is not None else int(value)

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
    """Images under a folder (recursive, sorted by relative path) with captions and labels from
    a ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + columns, HF ``imagefolder``
    layout), captions also from a ``.txt`` file next to each image (same stem), and labels also
    from class folders (``<class name>/<image>``, see the module docstring)."""

    kind = "folder"
    METADATA = ("metadata.jsonl", "metadata.csv")

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
        self.labels = self._labels() if label_column else None

    def _read_metadata(self) -> dict[str, dict]:
        found = [self.root / m for m in self.METADATA if (self.root / m).exists()]
        if len(found) > 1:
            raise ConfigError(f"source: {self.root} holds both {' and '.join(f.name for f in found)}; keep one")
        if not found:
            return {}
        meta, rows = found[0], {}
        if meta.suffix == ".csv":
            with meta.open(newline="") as f:
                reader = csv.DictReader(f)
                if "file_name" not in (reader.fieldnames or ()):
                    raise ConfigError(f"{meta}: expected a header row with a 'file_name' column, got "
                                      f"{reader.fieldnames}")
                return {Path(row["file_name"]).as_posix(): row for row in reader}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[Path(row["file_name"]).as_posix()] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{meta}:{n}: expected a JSON object with a 'file_name' key ({e})") from None
        return rows

    def _labels(self) -> list[int]:
        """Each file's class id, from the metadata's label column or else from class folders;
        string labels name the classes (ids: the names sorted, as ``ClassLabel``)."""
        col = self.label_column
        rels = [p.relative_to(self.root) for p in self.files]
        if any(col in row for row in self.metadata.values()):
            where = f"{self.root / next(m for m in self.METADATA if (self.root / m).exists())}"
            raw = [_label_value(self.metadata.get(r.as_posix(), {}).get(col)) for r in rels]
            if (i := next((i for i, v in enumerate(raw) if v is None), None)) is not None:
                raise ConfigError(f"label_column {col!r}: {where} gives no label for {rels[i].as_posix()}; "
                                  "label every image (or remove it)")
            self.names_from = "labels"
        else:
            depths = {len(r.parts) for r in rels}
            if not rels or min(depths) < 2 or len(depths) > 1:
                raise ConfigError(f"label_column {col!r}: {self.root} has no metadata.jsonl/csv with a {col!r} "
                                  "column, and its images are not all in class folders at one depth "
                                  "(<class name>/<image>); give either, or drop --label-column")
            raw, self.names_from = [r.parts[-2] for r in rels], "folders"
        if all(isinstance(v, int) for v in raw):
            self.max_label, self.names_from = max(raw, default=None), None
            return raw
        if not all(isinstance(v, str) for v in raw):
            raise ConfigError(f"label_column {col!r}: mixes integer and string labels; use one kind")
        self.label_keys = sorted(set(raw))
        self.label_names = split_synonyms(self.label_keys)
        index = {k: i for i, k in enumerate(self.label_keys)}
        return [index[v] for v in raw]

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
            yield Sample(index=index, key=rel.rsplit(".", 1)[0], image=path, caption=caption,
                         label=None if self.labels is None else self.labels[index])

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.root), "caption_column": self.caption_column,
                "label_column": self.label_column}


def _label_value(value: Any) -> int | str | None:
    """A metadata cell as a label: an integer (``3``, ``"3"``, ``3.0``), a class name, or ``None``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else (text or None)


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
                max_samples: int | None = None, class_names: str | None = None) -> Source:
    """Build the source named by ``path`` (see :func:`detect_kind`); ``class_names``: a
    ``--class-names`` file naming its labels' classes."""
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"source_kind: expected one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    if class_names is not None and label_column is None:
        raise ConfigError("class_names: names the classes of a --label-column; pass --label-column too")
    names = read_class_names(class_names) if class_names is not None else None
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "hf":
        source = HFSource(path, split=split, image_column=image_column, caption_column=caption_column,
                          label_column=label_column, streaming=streaming, max_samples=max_samples)
    elif kind == "folder":
        source = FolderSource(path, caption_column=caption_column, label_column=label_column,
                              max_samples=max_samples)
    else:
        source = WebDatasetSource(path, caption_column=caption_column, label_column=label_column,
                                  max_samples=max_samples)
    if names is not None:
        source.use_class_names(names, class_names)
    return source
