"""Leaf helpers for files every layer writes or reads: atomic writes and locating saved models.

Imports nothing from the rest of the package but ``errors``, so ``core/``, ``data/``,
``eval/`` and ``train/`` can use it without importing ``stages/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir, fsync, rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """Where derived files are cached between runs: ``$SNAPGEN_CACHE``, else ``$XDG_CACHE_HOME/snapgen``,
    else ``~/.cache/snapgen`` (created on first use)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(os.environ.get("SNAPGEN_CACHE") or Path(xdg) / "snapgen")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def staged_outputs(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Write files or directories ``paths`` (one parent dir) all or nothing: yields one temp path
    per final path, in a temp dir beside them; when the block ends normally each is renamed
    into place -- an existing output moved aside first and deleted only after its successor
    is in place -- and on an exception nothing at ``paths`` is touched."""
    paths = [Path(p) for p in paths]
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        raise ValueError(f"staged_outputs: expected one parent dir, got {sorted(map(str, parents))}")
    parent = parents.pop()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths[0].name}.", dir=parent))
    try:
        yield [tmp / p.name for p in paths]
        old = tmp / ".replaced"
        old.mkdir()
        for p in paths:
            if p.exists() or p.is_symlink():
                os.replace(p, old / p.name)
            os.replace(tmp / p.name, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Sub-directories a training stage writes its weights to, in the order they are preferred
#: when a later stage initialises from it (EMA by default, sec. 4 / sup. G): a pipeline's
#: ``unet/`` (the UNet stages' EMA weights), ``model_ema/`` (other stages), ``model/`` (raw).
MODEL_SUBDIRS = ("unet", "model_ema", "model")


def find_model_dir(path: str | Path, prefer: tuple[str, ...] = MODEL_SUBDIRS, what: str = "checkpoint") -> Path:
    """A dir holding a ``save_pretrained`` model: ``path`` itself (has ``config.json``) or
    its first existing ``prefer`` sub-dir (a stage output dir)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r}: no such file or directory")
    if (p / "config.json").is_file():
        return p
    for sub in prefer:
        if (p / sub / "config.json").is_file():
            return p / sub
    raise ConfigError(f"{what} {str(p)!r}: no saved model there (expected config.json, or one of "
                      f"{', '.join(s + '/' for s in prefer)} from a training stage)")


def model_location(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """``(path, subfolder)`` for ``from_pretrained``: a local folder that holds ``config.json``
    itself needs no subfolder (a hub id or a nested folder keeps it)."""
    local = Path(path)
    if subfolder and local.is_dir() and not (local / subfolder).is_dir() and (local / "config.json").is_file():
        return path, None
    return path, subfolder or None
