"""The run report of ``snapgen run``: ``report.json`` + ``report.md`` in the run directory.

``report.md`` shows what a newcomer wants to see after a run: the sample grid, the
alignment scores per category with the chance level, every metric of every eval stage next
to its reference (the chance level of alignment; the reference set of FID / KID and its size;
the images and decoder of a reconstruction), the decoders' reconstruction PSNR, the wall time
of every stage, and the exact standalone command that reproduces each stage
(``snapgen <stage> --out ... --key value``: the config the stage ran with, see
``recipe.resolve_stage``, so the command does what the recipe stage did).

``report.json["evaluations"]`` holds one row per eval stage: its headline figures and, under
``metrics``, everything its ``eval_report.json`` holds.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from .eval.report import flatten
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
    """The standalone command that runs this stage with this config: every value that differs from
    the default, an unset one as ``none`` (``--init-from none``) and an emptied list as ``--set key=[]``."""
    from .cli import _click_type

    parts = ["snapgen", kind, "--out", str(out_dir)]
    plain = cfg.model_dump(mode="json", exclude_none=True)  # nested models (e.g. encoder specs) as TOML tables
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        default = field.get_default(call_default_factory=True)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        _, multiple, nargs, _ = _click_type(field.annotation)
        if value is None:  # a default the recipe unset
            parts += [flag, "none"] if not multiple and nargs == 1 else ["--set", f"{name}=none"]
        elif isinstance(value, list) and not value:
            parts += ["--set", f"{name}=[]"]
        elif isinstance(value, bool):
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
    """One eval stage's headline figures (sampler settings, alignment, FID / KID and the FID
    reference set with its size) and, under ``metrics``, every metric it wrote."""
    summary = r["summary"]
    m, sampler = summary["metrics"], (summary.get("meta") or {}).get("sampler") or {}
    al, fid = m.get("alignment") or {}, m.get("fid") or {}
    kid = fid.get("kid")
    return dict(stage=r["stage"], checkpoint=(summary.get("meta") or {}).get("checkpoint"),
                steps=sampler.get("steps"), guidance=sampler.get("guidance"), overall=al.get("overall"),
                chance=al.get("chance"), fid=fid.get("fid"), kid=kid.get("mean") if isinstance(kid, dict) else kid,
                fid_reference=fid.get("n_reference"), fid_reference_set=fid.get("reference"), metrics=m)


def _rel(path: Any, run_dir: Path) -> str:
    p = Path(str(path))
    return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)


def _metric_cells(metrics: dict, run_dir: Path) -> dict[str, str]:
    """Every metric of one eval stage as ``{row label: cell}``, each next to its reference: alignment
    with its counts and chance level (overall and per category), FID / KID with the reference set
    and its size and the generated set, a reconstruction with its images and decoder; any other
    metric (CLIP score, ImageReward, GenEval, DPG-Bench, ...) as its flattened keys."""
    cells, rest = {}, {k: dict(v) if isinstance(v, dict) else v for k, v in metrics.items()}
    if isinstance(al := rest.pop("alignment", None), dict):
        chance = al.get("chance_categories") or {}
        cells["alignment"] = (f"{_fmt(al.get('overall'))} ({al.get('correct')}/{al.get('total')}; "
                              f"chance {_fmt(al.get('chance'))})")
        for cat, v in (al.get("categories") or {}).items():
            cells[f"alignment: {cat}"] = (f"{_fmt(v.get('accuracy'))} ({v.get('correct')}/{v.get('total')}"
                                          + (f"; chance {_fmt(chance[cat])})" if cat in chance else ")"))
    if isinstance(fid := rest.get("fid"), dict):
        for key, label, digits in (("fid", "FID", 2), ("kid", "KID", 4)):
            if isinstance(fid.get(key), (int, float)):
                cells[label] = _fmt(float(fid.pop(key)), digits)
        ref, n_ref = fid.pop("reference", None), fid.pop("n_reference", None)
        if ref is not None or n_ref is not None:
            size = f"{n_ref} images" if n_ref is not None else "saved statistics"
            cells["FID / KID reference"] = f"{_rel(ref, run_dir) if ref is not None else '?'} ({size})"
        if "n_generated" in fid:
            cells["FID / KID generated"] = f"{fid.pop('n_generated')} images ({fid.pop('set', '?')})"
    if isinstance(rec := rest.get("recon"), dict):
        for key, label, digits in (("psnr", "recon PSNR (dB)", 2), ("ssim", "recon SSIM", 3),
                                   ("lpips", "recon LPIPS", 3)):
            if key in rec:
                cells[label] = _fmt(rec.pop(key), digits)
        if "images" in rec or "n_images" in rec:
            where = _rel(rec.pop("images"), run_dir) if "images" in rec else "?"
            cells["recon images"] = f"{where} ({rec.pop('n_images', '?')} images, {rec.pop('decoder', '?')} decoder)"
    for name, value in flatten(rest):
        cells[name] = _fmt(value)
    return cells


def _scores_a_model(result: dict) -> bool:
    """An eval stage that measured something, not one that only saved FID reference statistics."""
    metrics = (result.get("summary") or {}).get("metrics") or {}
    return any(name != "fid" or "fid" in m for name, m in metrics.items())


def _timeline(report: dict, results: list[dict], elapsed_s: float | None) -> None:
    """Each stage run this time gets ``start_s`` / ``end_s``, seconds after the first of them started
    (from the done-markers' ``started_at``): which stages ran side by side. With the run's elapsed
    time, ``cores_busy`` is the share of the cores' time the stages held: the sum of wall time x
    threads (capped at the cores) over elapsed time x cores; 1 is a run with no idle core."""
    from .cpu import available_cpus

    ran = [(s, r) for s, r in zip(report["stages"], results, strict=True)
           if not s["skipped"] and r.get("started_at") is not None and s["wall_s"] is not None]
    if not ran:
        return
    t0 = min(r["started_at"] for _, r in ran)
    for s, r in ran:
        s["start_s"] = round(r["started_at"] - t0, 2)
        s["end_s"] = round(s["start_s"] + s["wall_s"], 2)
    if elapsed_s and all(s["threads"] for s, _ in ran):
        cores = available_cpus()
        held = sum(s["wall_s"] * min(s["threads"], cores) for s, _ in ran)
        report["cores"], report["cores_busy"] = cores, round(held / (elapsed_s * cores), 3)


def write_run_report(run_dir: Path, name: str, results: list[dict], commands: dict[str, str],
                     elapsed_s: float | None = None, jobs: int = 1) -> dict:
    """Write ``report.json`` and ``report.md`` for a finished (or partly skipped) run. ``total_wall_s``
    is the sum of the stages' times; ``elapsed_s`` the run's own wall time (less with ``jobs`` > 1)."""
    run_dir = Path(run_dir)
    stages = [{"stage": r["stage"], "kind": r.get("kind"), "wall_s": r.get("wall_s"), "skipped": r.get("skipped", False),
               "threads": r.get("threads"), "summary": r.get("summary"), "command": commands.get(r["stage"])}
              for r in results]
    report: dict[str, Any] = {"run": name, "run_dir": str(run_dir), "stages": stages,
                              "total_wall_s": round(sum(s["wall_s"] or 0 for s in stages), 2), "jobs": jobs}
    if elapsed_s is not None:
        report["elapsed_s"] = round(elapsed_s, 2)
    _timeline(report, results, elapsed_s)
    evals = [r for r in results if r.get("kind") == "eval" and _scores_a_model(r)]
    # the per-category table: the stage named "eval" (the recipe's final model), else the last eval
    ev = next((r for r in evals if r["stage"] == "eval"), evals[-1] if evals else None)
    metrics = ev["summary"]["metrics"] if ev else {}
    if "alignment" in metrics:
        report["alignment"] = metrics["alignment"]
    if evals:  # e.g. the teacher, the student before and after (step) distillation
        report["evaluations"] = [_eval_row(r) for r in evals]
    kd = _find(results, "distill")
    if kd and (kd.get("summary") or {}).get("fig6"):
        report["fig6"] = kd["summary"]["fig6"]
    recon = next(({**r["summary"]["metrics"]["recon"], "stage": r["stage"]} for r in reversed(evals)
                  if "recon" in r["summary"]["metrics"]), None)
    decoders = [r for r in results if r.get("kind") == "train-decoder"]
    report["decoder"] = {r["stage"]: (r.get("summary") or {}).get("eval") for r in decoders}
    if recon:
        report["decoder"]["pipeline_recon"] = recon
    exports = {r["stage"]: r["summary"] for r in results if r.get("kind") == "export" and r.get("summary")}
    if exports:  # artefacts, their sizes and the parity gate's figures (issue 15)
        report["export"] = exports
    gen = _find(results, "generate")
    if gen and gen.get("summary", {}).get("grid"):
        report["sample_grid"] = gen["summary"]["grid"]
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", _markdown(report, run_dir))
    return report


#: What a train-decoder stage's ``eval.json`` entries measured.
DECODER_LABELS = {"autoencoder": "AutoencoderKL (its own decoder)", "tiny_decoder": "tiny decoder",
                  "vae_decoder": "the frozen VAE's decoder"}


def _decoder_rows(dec: dict):
    """``(stage, metrics, decoder, images)`` per reconstruction: every decoder a train-decoder stage
    evaluated, and the pipeline's decoder as the eval stage that ran ``recon`` measured it."""
    for stage, v in dec.items():
        if stage == "pipeline_recon":
            yield v.get("stage", "eval"), v, f"{v.get('decoder', '?')} (the pipeline's)", v.get("images")
            continue
        for key, m in v.items():
            if isinstance(m, dict) and "psnr" in m:
                yield stage, m, DECODER_LABELS.get(key, key), v.get("images")


def _metrics_matrix(rows: list[dict], run_dir: Path) -> list[str]:
    """Every metric of every eval stage: one row per metric, one column per stage."""
    cells = {e["stage"]: _metric_cells(e.get("metrics") or {}, run_dir) for e in rows}
    labels = list(dict.fromkeys(label for c in cells.values() for label in c))
    if not labels:
        return []
    lines = ["## Every metric of every evaluation", "", "| metric | " + " | ".join(cells) + " |",
             "| --- |" + " --- |" * len(cells)]
    lines += [f"| {label} | " + " | ".join(c.get(label, "-") for c in cells.values()) + " |" for label in labels]
    return lines + [""]


def _markdown(report: dict, run_dir: Path) -> str:
    took = f"total wall time of the stages {report['total_wall_s']:.1f} s"
    if report.get("elapsed_s") is not None and report.get("jobs", 1) > 1:
        took += f", {report['elapsed_s']:.1f} s elapsed with {report['jobs']} stages at once"
        ran = sum(not s["skipped"] for s in report["stages"])
        if ran < len(report["stages"]):
            took += f" for the {ran} run this time"
        if report.get("cores_busy") is not None:
            took += f"; the stages held {100 * report['cores_busy']:.0f} % of the {report['cores']} cores' time"
    lines = [f"# {report['run']}", "", f"Run directory: `{run_dir}`; {took}.", ""]
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
        refs = sorted({(_rel(e["fid_reference_set"], run_dir) if e.get("fid_reference_set") else "?",
                        str(e.get("fid_reference") or "?")) for e in rows if e.get("fid") is not None})
        if refs:
            lines.append("\nFID / KID against " + "; ".join(f"`{ref}` ({n} images)" for ref, n in refs) + ".")
        lines.append("")
        lines += _metrics_matrix(rows, run_dir)
    if "fig6" in report:
        rel = Path(report["fig6"])
        rel = rel.relative_to(run_dir) if rel.is_relative_to(run_dir) else rel
        lines += ["## Distillation: loss magnitude per t bin (Fig. 6)", "", f"![fig 6]({rel})", ""]
    dec = {k: v for k, v in report.get("decoder", {}).items() if v}
    if dec:
        lines += ["## Decoder reconstruction", "", "| stage | decoder | images | PSNR (dB) | SSIM | LPIPS |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for stage, m, label, where in _decoder_rows(dec):
            lpips = _fmt(m["lpips"]) if "lpips" in m else "-"
            lines.append(f"| {stage} | {label} | {_rel(where, run_dir) if where else '-'} ({m.get('n_images', '?')}) | "
                         f"{_fmt(m['psnr'], 2)} | {_fmt(m.get('ssim'))} | {lpips} |")
        lines.append("")
    if report.get("export"):
        lines += ["## Exported models", "", "| stage | model | format | precision | size (MiB) | parity (dB, min) | "
                  "gate (dB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for stage, summary in report["export"].items():
            for a in summary.get("artefacts", []):
                bits = f" palettized {a['palettize_bits']}-bit" if a.get("palettize_bits") else ""
                db = a["parity_min_db"]
                lines.append(f"| {stage} | {a['model']} | {a['format']} | {a['precision']}{bits} | "
                             f"{a['size_bytes'] / 2**20:.2f} | {_fmt(db, 1) if not isinstance(db, str) else db} | "
                             f"{_fmt(a['threshold_db'], 0)} |")
        lines.append("\nParity: PSNR of each exported model against PyTorch on fixed seeded inputs (Apple's formula); "
                     "`export.json` in the stage's folder has every figure, shape and file.\n")
    lines += ["## Stages", ""]
    if any(s.get("start_s") is not None for s in report["stages"]):
        lines += ["Start and end: seconds after the first stage of this run started.", ""]
    lines += ["| # | stage | kind | threads | start (s) | end (s) | wall time (s) | |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(report["stages"], 1):
        span = [_fmt(s[k], 1) if s.get(k) is not None else "" for k in ("start_s", "end_s")]
        lines.append(f"| {i} | {s['stage']} | {s['kind']} | {s.get('threads') or ''} | {span[0]} | {span[1]} | "
                     f"{_fmt(s['wall_s'] or 0.0, 1)} | {'skipped (done)' if s['skipped'] else ''} |")
    lines += ["", "## Reproduce each stage standalone", ""]
    for s in report["stages"]:
        if s["command"]:
            lines += [f"`{s['stage']}`:", "", "```bash", s["command"], "```", ""]
    return "\n".join(lines) + "\n"
