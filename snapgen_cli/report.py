"""The run report of ``snapgen run``: ``report.json`` + ``report.md`` in the run directory.

``report.md`` shows what a newcomer wants to see after a run: the sample grid, the
alignment scores per category with the chance level, the decoder's reconstruction PSNR,
the wall time of every stage, and the exact standalone command that reproduces each stage
(``snapgen <stage> --out ... --key value``, the values the recipe resolved).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text

def _toml_value(v: Any) -> str:
    """A TOML literal for the simple values recipes hold (str, numbers, bools, lists, tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML literal for {type(v).__name__}")


def standalone_command(kind: str, cfg, out_dir: Path) -> str:
    """The standalone command that runs this stage with this config (non-default values only)."""
    parts = ["snapgen", kind, "--out", str(out_dir)]
    plain = cfg.model_dump(mode="json", exclude_none=True)  # nested models (e.g. encoder specs) as TOML tables
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        default = field.get_default(call_default_factory=True)
        if value == default or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list) and all(isinstance(x, (str, int, float)) for x in value):
            for x in value:
                parts += [flag, str(x)]
        elif isinstance(value, tuple):
            parts += [flag, *map(str, value)]
        elif isinstance(value, (dict, list)):
            parts += [flag, _toml_value(plain[name])]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _find(results: list[dict], kind: str) -> dict | None:
    hits = [r for r in results if r.get("kind") == kind]
    return hits[-1] if hits else None


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def _eval_row(r: dict) -> dict:
    """One eval stage's headline figures: sampler settings, alignment, FID / KID."""
    summary = r["summary"]
    m, sampler = summary["metrics"], (summary.get("meta") or {}).get("sampler") or {}
    al, fid = m.get("alignment") or {}, m.get("fid") or {}
    kid = fid.get("kid")
    return dict(stage=r["stage"], checkpoint=(summary.get("meta") or {}).get("checkpoint"),
                steps=sampler.get("steps"), guidance=sampler.get("guidance"), overall=al.get("overall"),
                chance=al.get("chance"), fid=fid.get("fid"), kid=kid.get("mean") if isinstance(kid, dict) else kid,
                fid_reference=fid.get("n_reference"))


def write_run_report(run_dir: Path, name: str, results: list[dict], commands: dict[str, str]) -> dict:
    """Write ``report.json`` and ``report.md`` for a finished (or partly skipped) run."""
    run_dir = Path(run_dir)
    stages = [{"stage": r["stage"], "kind": r.get("kind"), "wall_s": r.get("wall_s"), "skipped": r.get("skipped", False),
               "summary": r.get("summary"), "command": commands.get(r["stage"])} for r in results]
    report: dict[str, Any] = {"run": name, "run_dir": str(run_dir), "stages": stages,
                              "total_wall_s": round(sum(s["wall_s"] or 0 for s in stages), 2)}
    evals = [r for r in results if r.get("kind") == "eval" and (r.get("summary") or {}).get("metrics")]
    # the per-category table: the stage named "eval" (the recipe's final model), else the last eval
    ev = next((r for r in evals if r["stage"] == "eval"), evals[-1] if evals else None)
    metrics = ev["summary"]["metrics"] if ev else {}
    if "alignment" in metrics:
        report["alignment"] = metrics["alignment"]
    rows = [_eval_row(r) for r in evals]
    if len(rows) > 1:  # e.g. the teacher, the student before and after (step) distillation
        report["evaluations"] = rows
    kd = _find(results, "distill")
    if kd and (kd.get("summary") or {}).get("fig6"):
        report["fig6"] = kd["summary"]["fig6"]
    recon = next((r["summary"]["metrics"]["recon"] for r in reversed(evals) if "recon" in r["summary"]["metrics"]),
                 None)
    decoders = [r for r in results if r.get("kind") == "train-decoder"]
    report["decoder"] = {r["stage"]: (r.get("summary") or {}).get("eval") for r in decoders}
    if recon:
        report["decoder"]["pipeline_recon"] = recon
    gen = _find(results, "generate")
    if gen and gen.get("summary", {}).get("grid"):
        report["sample_grid"] = gen["summary"]["grid"]
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", _markdown(report, run_dir))
    return report


def _markdown(report: dict, run_dir: Path) -> str:
    lines = [f"# {report['run']}", "", f"Run directory: `{run_dir}`; total wall time {report['total_wall_s']:.1f} s.", ""]
    if "sample_grid" in report:
        rel = Path(report["sample_grid"])
        rel = rel.relative_to(run_dir) if rel.is_relative_to(run_dir) else rel
        lines += ["## Samples", "", f"![sample grid]({rel})", ""]
    al = report.get("alignment")
    if al:
        lines += ["## Alignment (built-in shapes suite, GenEval categories)", "",
                  "| category | accuracy | correct / total |", "| --- | --- | --- |"]
        for cat, v in al.get("categories", {}).items():
            lines.append(f"| {cat} | {_fmt(v.get('accuracy'))} | {v.get('correct')} / {v.get('total')} |")
        lines.append(f"| **overall** | **{_fmt(al.get('overall'))}** | |")
        if "chance" in al:
            lines.append(f"\nChance level (valid images, prompts ignored): {_fmt(al['chance'])}.")
        lines.append("")
    rows = report.get("evaluations")
    if rows:
        lines += ["## Alignment of every evaluated model", "",
                  "| eval stage | checkpoint | steps | cfg | alignment | chance | FID | KID |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in rows:
            ckpt = Path(e["checkpoint"]).name if e.get("checkpoint") else "-"
            cells = [_fmt(e.get(k)) if e.get(k) is not None else "-" for k in ("overall", "chance", "fid", "kid")]
            lines.append(f"| {e['stage']} | {ckpt} | {e.get('steps') or '-'} | {e.get('guidance') or '-'} | "
                         + " | ".join(cells) + " |")
        n_ref = {e.get("fid_reference") for e in rows if e.get("fid") is not None}
        if n_ref:
            lines.append(f"\nFID / KID against the held-out reference images ({', '.join(map(str, n_ref))} images).")
        lines.append("")
    if "fig6" in report:
        rel = Path(report["fig6"])
        rel = rel.relative_to(run_dir) if rel.is_relative_to(run_dir) else rel
        lines += ["## Distillation: loss magnitude per t bin (Fig. 6)", "", f"![fig 6]({rel})", ""]
    dec = {k: v for k, v in report.get("decoder", {}).items() if v}
    if dec:
        lines += ["## Decoder reconstruction", "", "| stage | PSNR (dB) | SSIM |", "| --- | --- | --- |"]
        for stage, v in dec.items():
            for label, m in (v.items() if isinstance(v, dict) and "psnr" not in v else [("", v)]):
                if isinstance(m, dict) and "psnr" in m:
                    lines.append(f"| {stage}{' ' + label if label else ''} | {_fmt(m['psnr'], 2)} | {_fmt(m.get('ssim'))} |")
        lines.append("")
    lines += ["## Stages", "", "| # | stage | kind | wall time (s) | |", "| --- | --- | --- | --- | --- |"]
    for i, s in enumerate(report["stages"], 1):
        lines.append(f"| {i} | {s['stage']} | {s['kind']} | {_fmt(s['wall_s'] or 0.0, 1)} | {'skipped (done)' if s['skipped'] else ''} |")
    lines += ["", "## Reproduce each stage standalone", ""]
    for s in report["stages"]:
        if s["command"]:
            lines += [f"`{s['stage']}`:", "", "```bash", s["command"], "```", ""]
    return "\n".join(lines) + "\n"
