"""The small protocol every recipe stage follows (one module per stage, no inheritance).

A stage module exposes:

* ``Config`` -- a :class:`StageConfig` (pydantic, unknown keys rejected) holding every
  setting of the stage, with the paper's values as defaults where the paper gives them;
* ``plan(cfg, ctx) -> list[PlanItem]`` -- what the stage would build and read/write, built
  on the meta device (no weights, no data touched); used by ``snapgen run --dry-run``;
* ``run(cfg, ctx) -> dict`` -- do the work, write into ``ctx.out_dir``, return a JSON-able
  summary (it is stored in the stage's done-marker and printed with ``--json``).

Stage functions know nothing about Click; ``cli.py`` turns flags into a ``Config``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console


class StageConfig(BaseModel):
    """Base of every stage's typed config: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


@dataclass
class StageContext:
    """Where a stage runs: its output dir, the previous stage's output, the run's seed."""

    out_dir: Path
    previous: Path | None = None
    run_dir: Path | None = None
    seed: int = 0
    dry_run: bool = False
    console: Console = field(default_factory=lambda: Console(file=sys.stderr))

    def resolve_input(self, value: str | None) -> Path | None:
        """A stage input: ``None`` or ``"previous"`` mean the previous stage's output dir; a
        name of an earlier stage in the same run (``"@pretrain"``) means that stage's dir."""
        if value in (None, "previous"):
            return self.previous
        if value.startswith("@"):
            if self.run_dir is None:
                from ..errors import ConfigError

                raise ConfigError(f"{value!r} names a stage of a recipe run; outside `snapgen run` give a path")
            return self.run_dir / value[1:]
        return Path(value)


@dataclass
class PlanItem:
    """One line of a dry-run plan."""

    model: str
    params: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: str = ""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir, fsync, rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
