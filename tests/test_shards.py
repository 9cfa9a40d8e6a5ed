"""Shard reading for training (data/shards.py): only a sample's rows are read, bitwise the
same items as the whole-file reader, sha256 checked once per file version with a corrupt
shard still a clear error, also from a DataLoader worker inside the training loop."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from snapgen_cli.data import shards
from snapgen_cli.data.shards import ShardDataset, ShardFile, read_tensors, write_shard
from snapgen_cli.errors import SnapgenError
from snapgen_cli.files import atomic_write_json
from snapgen_cli.train.loop import LoopConfig, StepContext, TrainTask, train

SIZES = [6, 0, 5, 7]  # samples per shard (precompute can leave a shard empty)


def _tensors(n: int, seed: int) -> dict[str, torch.Tensor]:
    """One shard as precompute writes it (one of each stored dtype), rows ~50 KB."""
    g = torch.Generator().manual_seed(seed)
    return {"index": torch.arange(n, dtype=torch.int64) + 100 * seed,
            "crop.32": torch.randint(0, 9, (n, 2), generator=g, dtype=torch.int32),
            "latents.32": torch.randn(n, 16, 4, 4, generator=g).half(),
            "clip_l.tokens": torch.randn(n, 77, 160, generator=g).bfloat16(),
            "clip_l.pooled": torch.randn(n, 160, generator=g), "clip_l.mask": torch.rand(n, 77, generator=g) > 0.3}


def _make(root: Path, sizes=SIZES) -> Path:
    records = [write_shard(root, i, _tensors(n, i), keys=[f"k{i}-{j}" for j in range(n)],
                           captions=[f"caption {i} {j}" for j in range(n)], record={"num_samples": n})
               for i, n in enumerate(sizes)]
    atomic_write_json(root / shards.MANIFEST, {
        "format": shards.FORMAT_VERSION, "shards": records,
        "tensors": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in _tensors(1, 0).items()}})
    return root


def _rchar() -> int:
    """Bytes this process passed through read()/pread() so far (the kernel counts cached reads too)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.parametrize("drop_behind", [False, True])
def test_items_are_bitwise_those_of_the_whole_file_reader(tmp_path, drop_behind):
    ds = ShardDataset(_make(tmp_path), drop_behind=drop_behind)
    assert len(ds) == 18 and ds.shard_ranges() == [range(0, 6), range(6, 11), range(11, 18)]
    for i, (s, j) in enumerate((s, j) for s, n in enumerate(SIZES) for j in range(n)):
        whole, meta = read_tensors(tmp_path / f"shard-{s:05d}.safetensors")
        item = ds[i]
        assert set(item) == set(whole) | {"key", "caption"}
        for k, v in whole.items():
            assert item[k].dtype == v.dtype and item[k].shape == v[j].shape and torch.equal(item[k], v[j]), (i, k)
        assert (item["key"], item["caption"]) == (meta["keys"][j], meta["captions"][j])
    batch = ds.__getitems__([17, 3, 9, 3])  # what DataLoader calls: the same items
    for i, item in zip([17, 3, 9, 3], batch):
        one = ds[i]
        assert item.keys() == one.keys()
        assert all(torch.equal(v, one[k]) if torch.is_tensor(v) else v == one[k] for k, v in item.items())
    assert set(ShardDataset(tmp_path, fields=["latents.32"])[7]) == {"latents.32", "key", "caption"}
    assert ds[-1]["key"] == "k3-6"
    with pytest.raises(IndexError):
        ds[18]


def test_a_shard_is_byte_identical_however_often_it_is_written(tmp_path):
    """safetensors writes its metadata map in arbitrary order per call; one canonical key fixes it."""
    tensors, keys, captions = _tensors(5, 1), [f"k{j}" for j in range(5)], [f"caption {j}" for j in range(5)]
    shas = {write_shard(tmp_path, 0, tensors, keys=keys, captions=captions, record={"num_samples": 5})["sha256"]
            for _ in range(16)}
    assert len(shas) == 1
    meta = ShardFile(tmp_path / "shard-00000.safetensors").metadata
    assert meta == {"keys": keys, "captions": captions} == read_tensors(tmp_path / "shard-00000.safetensors")[1]
    # A shard of format 2 (one metadata key per field) is a clear error, not a shard without samples.
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save({"index": torch.arange(2)}, metadata={"keys": '["a", "b"]', "captions": '["", ""]'}))
    with pytest.raises(SnapgenError, match=r"old.safetensors: not a readable safetensors file \(.*metadata keys "
                                           r"\['captions', 'keys'\] of shard format < 3, this snapgen reads 3\)"):
        ShardFile(path)


def test_drop_behind_is_chosen_when_an_epoch_outgrows_half_the_memory(tmp_path, monkeypatch):
    _make(tmp_path)
    fields = ["latents.32", "clip_l.tokens"]
    epoch = 18 * (16 * 4 * 4 * 2 + 77 * 160 * 2)
    assert ShardDataset(tmp_path, fields=fields).sample_bytes * 18 == epoch
    assert not ShardDataset(tmp_path, fields=fields).drop_behind  # this machine holds 18 samples easily
    monkeypatch.setattr(shards, "memory_bytes", lambda: 2 * epoch)
    assert not ShardDataset(tmp_path, fields=fields).drop_behind
    monkeypatch.setattr(shards, "memory_bytes", lambda: 2 * epoch - 2)
    assert ShardDataset(tmp_path, fields=fields).drop_behind
    assert not ShardDataset(tmp_path, fields=fields, drop_behind=False).drop_behind


@pytest.mark.parametrize("drop_behind", [False, True])
def test_a_sample_reads_its_rows_not_the_shard(tmp_path, drop_behind):
    ds = ShardDataset(_make(tmp_path, sizes=[64]), fields=["latents.32", "clip_l.tokens", "clip_l.mask"],
                      drop_behind=drop_behind)
    ds[0]  # first open: hashes the file once and parses the header
    file_bytes = (tmp_path / "shard-00000.safetensors").stat().st_size
    row = 16 * 4 * 4 * 2 + 77 * 160 * 2 + 77
    before = _rchar()
    for i in (5, 40, 63, 17):
        ds[i]
    ds.__getitems__([1, 2, 60, 33])  # DataLoader's batch read (announces the rows, then reads them)
    read = _rchar() - before
    assert 8 * row <= read <= 8 * row * 1.01, (read, row)  # exactly the rows (plus nothing)
    assert read < file_bytes / 7
    # Negative control: the counter sees a whole-file read although the file is in the page cache.
    before = _rchar()
    read_tensors(tmp_path / "shard-00000.safetensors")
    assert _rchar() - before >= file_bytes


def test_checksum_is_verified_once_per_file_version_and_corruption_is_caught(tmp_path, monkeypatch):
    _make(tmp_path)
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    ds = ShardDataset(tmp_path)
    ds[0], ds[1], ds[7]
    assert calls == ["shard-00000.safetensors", "shard-00002.safetensors"]  # each open shard once
    assert not (tmp_path / shards.VERIFIED / "shard-00000.safetensors.json").exists()  # too fresh for a marker
    time.sleep(2.1)  # a marker needs a ctime 2 s older than the check (module docstring)
    calls.clear()
    ShardDataset(tmp_path)[0]
    assert calls == ["shard-00000.safetensors"]
    assert (tmp_path / shards.VERIFIED / "shard-00000.safetensors.json").exists()
    calls.clear()
    ShardDataset(tmp_path)[0]  # this process remembers it checked this file version
    monkeypatch.setattr(shards, "_checked", set())  # as in another process or a later run: the marker
    ShardDataset(tmp_path)[0]
    assert calls == []

    # A flipped byte -- even with the old mtime put back -- is hashed again and caught.
    path = tmp_path / "shard-00000.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = ShardDataset(tmp_path)
    assert ds[6]["key"] == "k2-0"  # other shards are fine
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(path))}: checksum mismatch \(sha256 .*\), the file is "
                                           r"corrupt; re-run `snapgen precompute` with --out "
                                           rf"{re.escape(str(tmp_path))} to rebuild it$"):
        ds[0]
    assert calls == ["shard-00002.safetensors", "shard-00000.safetensors"]  # shard 2 had no marker yet


def test_missing_or_cut_shard_fails_when_the_dataset_is_made(tmp_path):
    _make(tmp_path)
    path = tmp_path / "shard-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(path))}: \d+ bytes, the manifest says \d+; re-run"):
        ShardDataset(tmp_path)
    path.unlink()
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(path))}: missing; re-run `snapgen precompute`"):
        ShardDataset(tmp_path)


class _ShardTask(TrainTask):
    def __init__(self, root: Path):
        self.root, self.model = root, torch.nn.Linear(256, 1)

    def trainables(self):
        return {"model": self.model}

    def dataset(self):
        return ShardDataset(self.root, fields=["latents.32"])

    def collate(self, items):
        return torch.stack([it["latents.32"].float().flatten() for it in items])

    def loss(self, phase: str, batch: torch.Tensor, ctx: StepContext):
        return ctx.models["model"](batch.to(ctx.device)).pow(2).mean(), {}


def test_training_reads_shards_in_workers_and_a_corrupt_one_is_a_one_line_error(tmp_path):
    root = _make(tmp_path / "data")
    cfg = LoopConfig(steps=6, batch_size=4, num_workers=2, shuffle_window_shards=1, tracker="none", checkpoint_every=6)
    assert train(_ShardTask(root), cfg, tmp_path / "ok")["steps"] == 6
    path = root / "shard-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapgenError) as err:
        train(_ShardTask(root), cfg, tmp_path / "bad")
    assert str(err.value) == (f"{path}: checksum mismatch (sha256 {shards.sha256_file(path)[:12]}..., manifest says "
                              f"{shards.read_manifest(root)['shards'][3]['sha256'][:12]}...), the file is corrupt; "
                              f"re-run `snapgen precompute` with --out {root} to rebuild it")
