"""The small protocol every recipe stage follows (one module per stage, no inheritance).

A stage module exposes:

* ``Config`` -- a :class:`~snapgen_cli.config.StageConfig` (pydantic, unknown keys rejected) holding every
  setting of the stage, with the paper's values as defaults where the paper gives them;
* ``plan(cfg, ctx) -> list[PlanItem]`` -- what the stage would build and read/write, built
  on the meta device (no weights, no data touched); used by ``snapgen run --dry-run``;
* ``run(cfg, ctx) -> dict`` -- do the work, write into ``ctx.out_dir``, return a JSON-able
  summary (it is stored in the stage's done-marker and printed with ``--json``);
* optionally ``RESULT_FILE`` -- the file in ``ctx.out_dir`` that holds the result: the
  subcommand prints its path instead of the output dir's.

Stage functions know nothing about Click; ``cli.py`` turns flags into a ``Config``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console


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
