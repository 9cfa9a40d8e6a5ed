"""One recipe stage's training speed, this tree against a git ref, in one run.

Re-runs the exact command a finished ``snapgen run`` recorded for ``--stage`` (its
``report.json``), shortened to ``--steps`` and written to a scratch dir, once with this
repository's ``snapgen_cli`` and once with the one at ``--ref`` (``git archive`` into a temp
dir, put first on ``PYTHONPATH``). The runs alternate (ABBA...) and never overlap, each on
the threads ``--threads``; the figure is the loop's own ``samples_per_s`` (warm-up and
saving excluded), the ratio the median of the per-pair ratios, so a machine whose load drifts
moves both alike. The final losses are printed too: a speed change that also changed the
numbers beyond float rounding shows there.

    OMP_NUM_THREADS=1 python benchmarks/bench_stage_vs_ref.py --run RUN --stage step-distill --steps 60 \\
        --ref HEAD~1 --out benchmarks/results/stage_speed_step_distill.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from snapgen_cli.files import atomic_write_json  # noqa: E402


def stage_command(run_dir: Path, stage: str) -> list[str]:
    """The recorded command of ``stage`` in ``run_dir/report.json``, as argv after ``snapgen``."""
    report = json.loads((run_dir / "report.json").read_text())
    for row in report["stages"]:
        if row["stage"] == stage:
            argv = shlex.split(row["command"])
            if argv[0] != "snapgen":
                raise SystemExit(f"{stage}: unexpected command {row['command']!r}")
            return argv[1:]
    raise SystemExit(f"--stage {stage!r}: not in {run_dir / 'report.json'}")


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option value`` set (replaced where present)."""
    out = list(argv)
    if option in out:
        out[out.index(option) + 1] = value
        return out
    return out + [option, value]


def checkout(ref: str, into: Path) -> Path:
    """``snapgen_cli`` of ``ref`` under ``into``; returns the dir to put on ``PYTHONPATH``."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "snapgen_cli"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def python(code: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python args`` importing ``snapgen_cli`` from ``code``; ``cwd`` outside any checkout, as
    ``python -m`` / ``-c`` put the cwd first on sys.path, before ``PYTHONPATH``."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(code)})


def check_imports(code: Path, cwd: Path) -> None:
    """Stop unless ``snapgen_cli`` really comes from ``code`` (an installed copy could shadow it)."""
    where = python(code, ["-c", "import snapgen_cli; print(snapgen_cli.__file__)"], cwd).stdout.strip()
    if not where.startswith(str(code)):
        raise SystemExit(f"PYTHONPATH={code} imports snapgen_cli from {where}; is snapgen installed non-editable?")


def run_once(code: Path, argv: list[str], out: Path) -> dict:
    cmd = ["-m", "snapgen_cli.cli", *with_option(argv, "--out", str(out)), "--json"]
    proc = python(code, cmd, out.parent)
    if proc.returncode:
        raise SystemExit(f"python {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout)
    return {"samples_per_s": summary["samples_per_s"], "wall_s": summary["wall_s"],
            "final_losses": summary.get("final_losses", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `snapgen run` dir (its report.json)")
    ap.add_argument("--stage", required=True, help="a training stage of that run")
    ap.add_argument("--steps", type=int, default=60, help="steps of each timed run")
    ap.add_argument("--ref", required=True, help="git ref to compare with (e.g. HEAD~1)")
    ap.add_argument("--pairs", type=int, default=2, help="ABBA pairs")
    ap.add_argument("--threads", default="1", help="the stage's --threads (default 1: a 1-thread stage of the demo)")
    ap.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = ap.parse_args()

    argv = stage_command(args.run, args.stage)
    for option, value in (("--steps", args.steps), ("--checkpoint-every", args.steps), ("--threads", args.threads)):
        argv = with_option(argv, option, str(value))
    rows: dict[str, list[dict]] = {"this": [], "ref": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codes = {"this": REPO, "ref": checkout(args.ref, tmp / "ref")}
        for code in codes.values():
            check_imports(code, tmp)
        for i in range(args.pairs):
            for name in ("ref", "this") if i % 2 else ("this", "ref"):
                res = run_once(codes[name], argv, tmp / f"{name}-{i}")
                rows[name].append(res)
                print(f"{name:4s} pair {i}: {res['samples_per_s']:.2f} samples/s", file=sys.stderr)
    ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(rows["this"], rows["ref"], strict=True)]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    ref = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.ref], capture_output=True,
                         text=True).stdout.strip()
    result = {
        "what": f"{args.stage} of {args.run}, {args.steps} steps, this tree ({head}+) vs {args.ref} ({ref})",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "samples_per_s": {k: statistics.median(r["samples_per_s"] for r in v) for k, v in rows.items()},
        "ratio_this_over_ref": statistics.median(ratios),
        "final_losses": {k: v[0]["final_losses"] for k, v in rows.items()},
        "runs": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
