"""The training data path on paper-sized shards: samples/s and read amplification.

Builds a synthetic precompute output of ``--gb`` GB (default 20) through the writer
precompute uses (``data.shards.write_shard``, 1024 samples a shard): SD3 latents (16
channels) at 256^2 and 1024^2 (32x32 and 128x128), the student's text features at their
real widths and lengths -- CLIP-L (77x768), CLIP-G (77x1280), Gemma-2-2b (256x2304) tokens,
the two CLIP pooled vectors, bool masks -- in fp16, plus index / original_size / crops and
keys + captions, i.e. ~2.06 MB a sample and ~2.1 GB a shard. Then, for each training
resolution, it reads the set the way ``finetune`` does: the real ``DiffusionTask`` (tiny
UNet preset; only its dataset and collate are used) gives the ``ShardDataset`` with the
fields it trains on and the collate, ``train.loop.GlobalBatchSampler`` the shard-window
order (``LoopConfig`` default window), a ``DataLoader`` with 0, 1, 2 workers.

What is counted, and why a warm page cache cannot hide a whole-file read:

* ``read_amplification``: bytes that went through ``read``/``pread`` during the pass, from
  ``/proc/self/io`` ``rchar`` (the DataLoader workers' counts join the parent's when they are
  reaped at the end of the pass), per sample, over the bytes of the fields the task reads per
  sample. ``rchar`` counts every byte a read call copies, from disk or from the page cache
  alike, so a reader that read whole shards -- or re-hashed them -- would show it however warm
  the cache. The reader uses no mmap (whose page faults ``rchar`` would miss): it reads rows
  with ``os.preadv`` only (``tests/test_shards.py`` checks the count against the rows, with a
  whole-file read as the negative control). Also given over all stored bytes of a sample.
* ``disk_read_amplification``: ``read_bytes`` (what the block layer fetched, readahead
  included) per sample over the same. Before every pass each shard's pages are dropped from
  the page cache (``posix_fadvise(DONTNEED)``, no root needed), so passes read from disk.
* ``samples_per_s``: samples collated per wall second, worker start-up included. The set is
  larger than half this machine's memory, so the dataset releases rows from the page cache
  as it reads them (``drop_behind``, shards.py); ``drop_behind`` is recorded per pass.

Verification (the sha256 of each shard, once per file version) runs before the passes and is
timed apart (``verify``); it leaves markers so the passes hash nothing, as in training after
the first open. Writes ``benchmarks/results/cpu_data.json``; deletes the set unless --keep.

    python benchmarks/bench_data.py [--gb 20] [--workers 0,1,2] [--samples N] [--keep] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from snapgen_cli.core.text import student
from snapgen_cli.data import shards
from snapgen_cli.files import atomic_write_json
from snapgen_cli.train.diffusion import DiffusionConfig, DiffusionTask
from snapgen_cli.train.loop import GlobalBatchSampler, LoopConfig, shard_ranges

RESOLUTIONS = (256, 1024)
CHANNELS, FACTOR = 16, 8  # the SD3 VAE


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


class _Random:
    """Fills fp16 tensors from a 64 MB pool of N(0, 1) values at random offsets: random data
    at memory speed (``torch.randn`` makes ~80 M values/s on one core here)."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(32 << 20, generator=self.gen).half()

    def fp16(self, *shape: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float16)
        flat, step = out.view(-1), len(self.pool) // 2
        for i in range(0, flat.numel(), step):
            k = min(step, flat.numel() - i)
            o = int(torch.randint(len(self.pool) - k + 1, (), generator=self.gen))
            flat[i:i + k] = self.pool[o:o + k]
        return out


def shard_tensors(rnd: _Random, n: int, start: int) -> dict[str, torch.Tensor]:
    """One shard's tensors with the names, shapes and dtypes precompute writes (student encoders)."""
    g = rnd.gen
    out = {"index": torch.arange(start, start + n, dtype=torch.int64),
           "original_size": torch.randint(1024, 4096, (n, 2), generator=g, dtype=torch.int32)}
    for r in RESOLUTIONS:
        out[f"latents.{r}"] = rnd.fp16(n, CHANNELS, r // FACTOR, r // FACTOR)
        out[f"crop.{r}"] = torch.randint(0, 64, (n, 2), generator=g, dtype=torch.int32)
    for spec in student():
        length = spec.max_length
        out[f"{spec.name}.tokens"] = rnd.fp16(n, length, spec.width)
        if spec.pooled != "none":
            out[f"{spec.name}.pooled"] = rnd.fp16(n, spec.pooled_width)
        out[f"{spec.name}.mask"] = torch.arange(length) < torch.randint(4, length + 1, (n, 1), generator=g)
    return out


def build(root: Path, gb: float, shard_size: int) -> dict:
    rnd = _Random()
    per_sample = sum(v[0].numel() * v.element_size() for v in shard_tensors(rnd, 1, 0).values())
    num_shards = max(1, math.ceil(gb * 1e9 / (per_sample * shard_size)))
    records, t0 = [], time.perf_counter()
    for sid in range(num_shards):
        tensors = shard_tensors(rnd, shard_size, sid * shard_size)
        keys = [f"{i:09d}" for i in range(sid * shard_size, (sid + 1) * shard_size)]
        captions = [f"a synthetic caption number {i} of a photograph, with a few more words" for i in range(len(keys))]
        record = {"start": sid * shard_size, "stop": (sid + 1) * shard_size, "num_samples": shard_size, "skipped": {},
                  "converted": {}, "captions": {},
                  "tensors": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                              for k, v in tensors.items()}}
        records.append(shards.write_shard(root, sid, tensors, keys=keys, captions=captions, record=record))
        del tensors
        print(f"wrote shard {sid + 1}/{num_shards} ({records[-1]['bytes'] / 1e9:.2f} GB)", file=sys.stderr)
    specs = student()
    manifest = {  # the keys precompute's manifest has that training reads
        "format": shards.FORMAT_VERSION, "created_by": "benchmarks/bench_data.py",
        "num_samples": num_shards * shard_size, "num_shards": num_shards, "shard_size": shard_size,
        "resolutions": list(RESOLUTIONS), "latent": {"channels": CHANNELS, "downsample": FACTOR, "dtype": "fp16"},
        "encoders": {"student": {s.name: s.name for s in specs}, "teacher": {},
                     "specs": {s.name: s.model_dump(mode="json") for s in specs}},
        "tensors": records[0]["tensors"], "classes": None, "stored_bytes_per_sample": per_sample,
        "shards": [{k: r[k] for k in ("id", "file", "start", "stop", "num_samples", "sha256", "bytes")}
                   for r in records],
    }
    atomic_write_json(root / shards.MANIFEST, manifest)
    total = sum(r["bytes"] for r in records)
    return {"num_shards": num_shards, "shard_size": shard_size, "num_samples": num_shards * shard_size,
            "bytes": total, "stored_bytes_per_sample": per_sample, "write_s": round(time.perf_counter() - t0, 1)}


def drop_cache(root: Path) -> None:
    for f in root.glob("shard-*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def verify(root: Path) -> dict:
    """Open every shard once (the sha256 check that training's first open does)."""
    ds = shards.ShardDataset(root)
    drop_cache(root)
    a, t0 = _io(), time.perf_counter()
    for r in ds.shard_ranges():
        ds[r.start]
    dt, b = time.perf_counter() - t0, _io()
    return {"seconds": round(dt, 2), "rchar": b["rchar"] - a["rchar"], "read_bytes": b["read_bytes"] - a["read_bytes"]}


def check_items(ds: shards.ShardDataset, root: Path) -> None:
    """A few items against safetensors' own reader (bitwise)."""
    for i in (0, len(ds) // 2 + 7, len(ds) - 1):
        item = ds[i]
        s = next(k for k, r in enumerate(ds.shard_ranges()) if i in r)
        j = i - ds.shard_ranges()[s].start
        with safe_open(root / ds.shards[s]["file"], "pt") as f:
            for k in ds.fields:
                assert torch.equal(item[k], f.get_slice(k)[j]), (i, k)


def read_pass(task: DiffusionTask, root: Path, workers: int, samples: int, batch: int) -> dict:
    ds = task.dataset()
    loop = LoopConfig()
    steps = max(1, samples // batch)
    sampler = GlobalBatchSampler(shard_ranges(ds), batch, 1, 0, 1, loop.seed, 0, steps,
                                 window=loop.shuffle_window_shards)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=task.collate, num_workers=workers, pin_memory=False)
    field_bytes = sum(ds[0][k].numel() * ds[0][k].element_size() for k in ds.fields)
    drop_cache(root)
    a, t0 = _io(), time.perf_counter()
    n = 0
    for b in loader:
        n += len(b[task.key])
    dt = time.perf_counter() - t0
    del loader  # workers already joined at the end of iteration; their I/O counts are now ours
    d = {k: v - a[k] for k, v in _io().items()}
    return {"workers": workers, "drop_behind": ds.drop_behind, "samples": n, "seconds": round(dt, 2),
            "samples_per_s": round(n / dt, 1), "field_bytes_per_sample": field_bytes,
            "rchar_per_sample": round(d["rchar"] / n), "read_amplification": round(d["rchar"] / n / field_bytes, 4),
            "disk_bytes_per_sample": round(d["read_bytes"] / n),
            "disk_read_amplification": round(d["read_bytes"] / n / field_bytes, 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=20.0, help="size of the synthetic shard set on disk")
    ap.add_argument("--shard-size", type=int, default=1024, help="samples per shard (precompute's default)")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--samples", type=int, default=None, help="samples per pass (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where to build the set (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the set (else it is deleted at the end)")
    ap.add_argument("--reuse", action="store_true", help="measure the set a --keep run left in --dir")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_data.json"))
    args = ap.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="snapgen-bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.reuse:
            m = shards.read_manifest(root)
            data = {k: m[k] for k in ("num_shards", "shard_size", "num_samples", "stored_bytes_per_sample")}
            data |= {"bytes": sum(r["bytes"] for r in m["shards"]), "reused": True}
        else:
            data = build(root, args.gb, args.shard_size)
            time.sleep(2.1)  # shards written < 2 s ago are too fresh for a verified-marker (shards.py)
        result = {"benchmark": "data", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                  "loadavg_before": os.getloadavg(), "data": data, "verify": verify(root), "passes": []}
        samples = args.samples or data["num_samples"]
        for res in RESOLUTIONS:
            cfg = DiffusionConfig(data=str(root), resolution=res, model="tiny", tracker="none")
            task = DiffusionTask(cfg, root, None)
            check_items(task.dataset(), root)
            for w in map(int, args.workers.split(",")):
                p = {"resolution": res, **read_pass(task, root, w, samples, args.batch_size)}
                p["read_per_stored_sample"] = round(p["rchar_per_sample"] / data["stored_bytes_per_sample"], 4)
                result["passes"].append(p)
                print(json.dumps(p), file=sys.stderr)
        result["loadavg_after"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
