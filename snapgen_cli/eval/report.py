"""The evaluation report of ``snapgen eval``: one JSON file, a table on stderr, a contact sheet.

Decisions: the JSON is strict (non-finite floats such as the PSNR of identical images become
the strings ``"inf"``, ``"-inf"``, ``"nan"``; numpy values become Python numbers) and written
atomically; nested metric dicts (GenEval tasks, DPG categories) are shown flattened with
dotted keys in the table; the contact sheet puts each sample over its prompt, word-wrapped
to the cell width and cut with an ellipsis after ``max_lines`` lines.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.table import Table

from ..files import atomic_write_json

REPORT_FILE = "eval_report.json"
CONTACT_SHEET_FILE = "contact_sheet.png"


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy values, paths and non-finite floats made strict-JSON friendly."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"geneval": {"tasks": {"counting": 0.5}}}`` -> ``[("geneval.tasks.counting", 0.5)]``."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows += flatten(value, name + ".") if isinstance(value, Mapping) else [(name, value)]
    return rows


def metrics_table(metrics: Mapping[str, Any], title: str = "snapgen eval") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in flatten(jsonable(metrics)):
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are split; ``…`` marks a cut."""
    lines, line = [], ""
    for word in text.split():
        while draw.textlength(word, font=font) > width:  # a word wider than the cell
            cut = next((i for i in range(len(word) - 1, 0, -1) if draw.textlength(word[:i], font=font) <= width), 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def contact_sheet(images: Sequence[Image.Image], prompts: Sequence[str], *, cols: int = 4, cell: int = 256,
                  max_lines: int = 4, pad: int = 8) -> Image.Image:
    """A grid of samples (resized to ``cell`` px wide) with each prompt written below its image."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"contact sheet: need as many prompts as images (>0), got {len(images)} and {len(prompts)}")
    font = ImageFont.load_default(size=max(10, cell // 18))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.getbbox("Ag")[3] + 2
    thumbs = [im.convert("RGB").resize((cell, max(1, round(cell * im.height / im.width))), Image.BICUBIC)
              for im in images]
    captions = [_wrap(p, probe, font, cell, max_lines) for p in prompts]
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    row_h = [max(t.height + pad + line_h * len(c) for t, c in zip(thumbs[r * cols:(r + 1) * cols],
                                                              captions[r * cols:(r + 1) * cols]))
             for r in range(rows)]
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, sum(row_h) + (rows + 1) * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (thumb, caption) in enumerate(zip(thumbs, captions)):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), pad + sum(row_h[:r]) + r * pad
        sheet.paste(thumb, (x, y))
        for k, line in enumerate(caption):
            draw.text((x, y + thumb.height + pad // 2 + k * line_h), line, fill="black", font=font)
    return sheet


def write_report(out_dir: str | Path, metrics: Mapping[str, Any], *,
                 samples: Sequence[tuple[Image.Image, str]] = (), meta: Mapping[str, Any] | None = None,
                 console: Console | None = None, title: str = "snapgen eval", sheet_cols: int = 4) -> dict[str, Path]:
    """Write ``eval_report.json`` (+ ``contact_sheet.png`` of ``samples``, ``sheet_cols`` wide) to
    ``out_dir`` and print the metrics table to stderr; returns the written paths."""
    out_dir = Path(out_dir)
    paths = {"report": out_dir / REPORT_FILE}
    report: dict[str, Any] = {"metrics": jsonable(metrics), "meta": jsonable(meta or {})}
    if samples:
        paths["contact_sheet"] = out_dir / CONTACT_SHEET_FILE
        out_dir.mkdir(parents=True, exist_ok=True)
        contact_sheet([im for im, _ in samples], [p for _, p in samples], cols=sheet_cols).save(paths["contact_sheet"])
        report["contact_sheet"] = CONTACT_SHEET_FILE
    atomic_write_json(paths["report"], report)
    (console or Console(file=sys.stderr)).print(metrics_table(metrics, title))
    return paths
