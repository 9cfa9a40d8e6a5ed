"""Pre-computed latent + text-embedding shards and their manifest (paper sup. H: "we
pre-compute both the image latent and the text embeddings").

Layout of a precompute output directory::

    manifest.json                  counts, shapes, dtypes, encoders, VAE, skip counts, shard list + sha256
    shard-00000.safetensors        one shard: tensors with a leading sample axis (see below)
    shard-00000.json               the shard's record, written *after* the shard: its presence marks it done
    class_text.safetensors         (class-conditional sources) text features of every class synonym

Shard tensors: ``latents.<res>`` (N, C, res/f, res/f), ``crop.<res>`` (N, 2) int32 top/left of the
crop in resized pixels, ``original_size`` (N, 2) int32 (h, w), ``index`` (N,) int64 source index,
``label`` (N,) int64 when the source has labels, and every text feature returned by
``TextEncoderStack.encode`` (``<encoder>.tokens`` / ``.pooled`` / ``.mask``). Sample keys and
captions are JSON lists in the safetensors header metadata.

Decisions where the paper is silent:

* A shard covers a fixed range of ``shard_size`` *source indices* (shard ``i`` holds indices
  ``[i * shard_size, (i + 1) * shard_size)``), so it holds ``shard_size`` samples minus the skipped
  ones. This makes the assignment of samples to shards independent of what was skipped, which
  is what lets processes work on disjoint shards and a crashed run resume without duplicates.
* All writes are atomic (temp file + rename); a shard is verified by its sha256 on first read.
* :class:`ShardDataset` splits samples across processes in contiguous, equal slices
  (``len // world_size`` each, the remainder dropped) so that DDP ranks never wait on a rank
  with one batch more; it also works unsplit under ``accelerator.prepare(DataLoader(...))``.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError, SnapgenError
from ..files import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
CLASS_TEXT = "class_text.safetensors"
FORMAT_VERSION = 2  # 2: encoder names as ordered [name, stored] pairs (1 sorted them)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None
                  ) -> dict:
    """Atomically write a safetensors file; JSON-encode ``metadata`` values. Returns sha256 + size."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)
    return {"file": path.name, "sha256": sha256_bytes(data), "bytes": len(data)}


def read_tensors(path: Path, sha256: str | None = None, *, rebuild_hint: str = ""
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by :func:`write_tensors`, checking its sha256 if given.
    Returns ``(tensors, metadata)``; a missing or corrupt file is a :class:`SnapgenError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapgenError(f"{path}: missing{rebuild_hint}") from None
    if sha256 is not None and (got := sha256_bytes(data)) != sha256:
        raise SnapgenError(f"{path}: checksum mismatch (sha256 {got[:12]}..., manifest says {sha256[:12]}...), "
                           f"the file is corrupt{rebuild_hint}")
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__", {})
        return st_load(data), {k: json.loads(v) for k, v in meta.items()}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise SnapgenError(f"{path}: not a readable safetensors file ({e}){rebuild_hint}") from None


def write_shard(out_dir: Path, shard_id: int, tensors: Mapping[str, torch.Tensor], *, keys: list[str],
                captions: list[str] | None, record: dict) -> dict:
    """Write shard ``shard_id`` then its record (``shard-XXXXX.json``, the done-marker)."""
    name = shard_name(shard_id)
    meta = {"keys": keys} if captions is None else {"keys": keys, "captions": captions}
    record = {"id": shard_id, **record, **write_tensors(out_dir / f"{name}.safetensors", tensors, meta)}
    atomic_write_json(out_dir / f"{name}.json", record)
    return record


def completed_shard(out_dir: Path, shard_id: int) -> dict | None:
    """The record of a finished shard whose file still matches its checksum, else ``None``."""
    name = shard_name(shard_id)
    try:
        record = json.loads((out_dir / f"{name}.json").read_text())
        data = (out_dir / f"{name}.safetensors").read_bytes()
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if sha256_bytes(data) == record.get("sha256") else None


def shard_records(out_dir: Path) -> list[dict]:
    """All readable shard records in ``out_dir``, sorted by shard id (an unreadable one counts as not done)."""
    records = []
    for p in out_dir.glob("shard-*.json"):
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r["id"])


def check_contiguous(records: list[dict], shard_size: int, num_samples: int | None) -> None:
    """Every source index is covered exactly once: shards 0..N-1, full ranges but the last."""
    for i, r in enumerate(records):
        expected_start = i * shard_size
        if r["id"] != i or r["start"] != expected_start:
            raise SnapgenError(f"{shard_name(i)} is missing (found {shard_name(r['id'])} instead); "
                               "re-run precompute with the same --out to finish it")
        if i < len(records) - 1 and r["stop"] - r["start"] != shard_size:
            raise SnapgenError(f"{shard_name(i)} covers {r['stop'] - r['start']} source samples, "
                               f"expected {shard_size}; delete it and re-run precompute")
    end = records[-1]["stop"] if records else 0
    if num_samples is not None and end != num_samples:
        raise SnapgenError(f"shards cover source indices [0, {end}) but the source has {num_samples}; "
                           "re-run precompute with the same --out to finish it")


def sum_counts(records: list[dict], field: str) -> dict[str, int]:
    total: Counter = Counter()
    for r in records:
        total.update(r.get(field, {}))
    return dict(sorted(total.items()))


def encoder_names(manifest: dict, role: str = "student") -> dict[str, str]:
    """One role's (``"student"`` / ``"teacher"``) encoder names -> stored names, in spec order
    (the order is the conditioning layout: CLIP-L's channels before CLIP-G's, as in SD3)."""
    return {name: stored for name, stored in manifest["encoders"][role]}


def encoder_specs(manifest: dict, role: str = "student") -> list[dict]:
    """One role's encoder specs in spec order, under their own (not their stored) names."""
    specs = manifest["encoders"]["specs"]
    return [{**specs[stored], "name": name} for name, stored in encoder_names(manifest, role).items()]


def encoder_features(features: Mapping[str, torch.Tensor], manifest: dict, role: str = "student"
                     ) -> dict[str, torch.Tensor]:
    """One role's text features keyed by its spec names (stored ``teacher_clip_l.tokens`` ->
    ``clip_l.tokens``), ready for ``core.text.combine``."""
    return {f"{name}.{part}": features[f"{stored}.{part}"] for name, stored in encoder_names(manifest, role).items()
            for part in ("tokens", "pooled", "mask") if f"{stored}.{part}" in features}


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; point --data at a finished `snapgen precompute` output "
                          "(an interrupted run is finished by running it again with the same --out)") from None
    except json.JSONDecodeError as e:
        raise SnapgenError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path}: shard format {manifest.get('format')!r}, this snapgen reads {FORMAT_VERSION}")
    return manifest


def _rebuild_hint(root: Path) -> str:
    return f"; re-run `snapgen precompute` with --out {root} to rebuild it"


class ShardDataset(Dataset):
    """Map-style dataset over every sample of a precompute output.

    ``ds[i]`` is a dict of per-sample tensors (``latents.256``, ``clip_l.tokens``, ``label``, ...)
    plus ``key`` and ``caption`` strings. Shards load lazily, are checked against the manifest's
    sha256 on first load, and the last ``cache_shards`` are kept in memory. ``fields`` keeps only
    the named tensors (e.g. drop the teacher's text features when not distilling). ``rank`` /
    ``world_size`` give one process its contiguous slice (see the module docstring).
    """

    def __init__(self, root: str | Path, *, fields: list[str] | None = None, rank: int = 0, world_size: int = 1,
                 cache_shards: int = 4, verify: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards = list(self.manifest["shards"])
        self.fields, self.verify, self.cache_shards = fields, verify, cache_shards
        if fields is not None and (unknown := sorted(set(fields) - set(self.manifest["tensors"]))):
            raise ConfigError(f"fields: {', '.join(unknown)} not in {self.root / MANIFEST} "
                              f"(available: {', '.join(sorted(self.manifest['tensors']))})")
        self._ends = np.cumsum([s["num_samples"] for s in self.shards])
        total = int(self._ends[-1]) if len(self._ends) else 0
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        per_rank = total // world_size
        self._offset, self._len = rank * per_rank, per_rank if world_size > 1 else total
        self._cache: OrderedDict[int, tuple[dict[str, torch.Tensor], dict]] = OrderedDict()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} samples")
        g = self._offset + (i % self._len)
        s = int(np.searchsorted(self._ends, g, side="right"))
        j = g - (int(self._ends[s - 1]) if s else 0)
        tensors, meta = self._shard(s)
        item = {k: v[j] for k, v in tensors.items()}
        item["key"] = meta["keys"][j]
        if "captions" in meta:
            item["caption"] = meta["captions"][j]
        return item

    def _shard(self, s: int) -> tuple[dict[str, torch.Tensor], dict]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        rec = self.shards[s]
        tensors, meta = read_tensors(self.root / rec["file"], rec["sha256"] if self.verify else None,
                                     rebuild_hint=_rebuild_hint(self.root))
        if len(meta.get("keys", ())) != rec["num_samples"]:
            raise SnapgenError(f"{self.root / rec['file']}: holds {len(meta.get('keys', ()))} samples, the manifest "
                               f"says {rec['num_samples']}{_rebuild_hint(self.root)}")
        if self.fields is not None:
            tensors = {k: tensors[k] for k in self.fields}
        self._cache[s] = (tensors, meta)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors, meta

    def __getstate__(self) -> dict:  # DataLoader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def shard_ranges(self) -> list[range]:
        """The dataset indices of each shard (clipped to this process's slice)."""
        starts = np.concatenate([[0], self._ends[:-1]]) - self._offset
        clipped = (range(max(0, int(a)), min(self._len, int(b))) for a, b in zip(starts, self._ends - self._offset))
        return [r for r in clipped if len(r)]


class ShardShuffleSampler(Sampler[int]):
    """Shuffles shard order, then samples within each shard: a full shuffle over many shards
    would reload a shard for almost every sample; this keeps the LRU cache hot. Decision:
    within-shard shuffling + per-epoch shard permutation is the randomness a sharded store
    allows cheaply (the shards themselves follow the source order)."""

    def __init__(self, dataset: ShardDataset, *, seed: int = 0):
        self.ranges, self.seed, self.epoch = dataset.shard_ranges(), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(r) for r in self.ranges)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        for r in rng.sample(self.ranges, len(self.ranges)):
            yield from rng.sample(r, len(r))


class ClassText:
    """Text features of every class synonym (sup. H: "a photo of <class name>", a random
    synonym each time). ``sample(labels)`` returns features of one random synonym per label."""

    def __init__(self, root: str | Path):
        root = Path(root)
        manifest = read_manifest(root)
        classes = manifest.get("classes")
        if not classes:
            raise ConfigError(f"{root / MANIFEST}: no class names; precompute a source with a ClassLabel "
                              "--label-column")
        self.names: list[list[str]] = classes["names"]
        self.template: str = classes["template"]
        self.tensors, _ = read_tensors(root / classes["file"], classes["sha256"], rebuild_hint=_rebuild_hint(root))
        owner = self.tensors.pop("class")
        self._rows = [torch.nonzero(owner == c).flatten() for c in range(len(self.names))]

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        choices = [self._rows[int(c)] for c in labels]
        rows = torch.stack([r[torch.randint(len(r), (), generator=generator)] for r in choices])
        return {k: v[rows] for k, v in self.tensors.items()}
