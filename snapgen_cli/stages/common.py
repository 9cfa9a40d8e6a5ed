"""Pieces several stages share: locating saved models in stage output dirs."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

#: Sub-directories a training stage writes its weights to, in the order they are preferred
#: when a later stage initialises from it (EMA by default, sec. 4 / sup. G).
MODEL_SUBDIRS = ("model_ema", "model")


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
