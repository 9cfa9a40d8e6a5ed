"""Supplement F, Tab. 3 at toy scale: the four distillation settings at equal steps and seeds.

Rows (``snapgen distill`` switches): L_task alone; + L_kd (Eq. 4, Eq. 6 weights 1); + L_featkd
(Eq. 5, Eq. 6); + t-scaling (Eq. 7-8, the paper's method). Each row distils the demo's student
(``finetune-64``) from the demo's teacher (``teacher``) on the demo's shards, for ``--steps``
steps and each of ``--seeds`` (the same seeds for every row), then scores it with ``snapgen
eval``: the built-in alignment suite on its held-out prompts and FID against the held-out
images (``data/holdout``; a few dozen images: read FID as a relative figure between rows).
Prints mean and spread over seeds next to the paper's GenEval column, and writes JSON.

    snapgen run --out runs/demo                                 # the demo, for its stages
    python benchmarks/kd_ablation.py --run-dir runs/demo --json-out benchmarks/results/kd_ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from snapgen_cli.recipe import load_recipe, resolve_refs
from snapgen_cli.stages import distill, eval as eval_stage
from snapgen_cli.stages.base import StageContext

#: (name, distill switches, the paper's GenEval / ImageReward for the row, sup. Tab. 3)
ROWS = [
    ("task", dict(kd=False, featkd=False, t_scaling=False), 0.61, 1.20),
    ("+kd", dict(kd=True, featkd=False, t_scaling=False), 0.62, 1.23),
    ("+featkd", dict(kd=True, featkd=True, t_scaling=False), 0.64, 1.26),
    ("+t-scaling", dict(kd=True, featkd=True, t_scaling=True), 0.66, 1.32),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished demo run (snapgen run --out DIR)")
    ap.add_argument("--recipe", type=Path, default=Path(__file__).parents[1] / "recipes" / "demo.toml")
    ap.add_argument("--steps", type=int, default=None, help="distill steps per run (default: the recipe's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alignment-n", type=int, default=240)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: RUN_DIR/kd_ablation)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    console = Console(file=sys.stderr)
    recipe = load_recipe(args.recipe)
    base = resolve_refs(recipe.stage("distill").config, args.run_dir)
    ev = resolve_refs(recipe.stage("eval").config, args.run_dir)
    work = args.work_dir or args.run_dir / "kd_ablation"
    steps = args.steps or base.steps
    results: dict[str, list[dict]] = {}
    for name, switches, *_ in ROWS:
        for seed in args.seeds:
            out = work / f"{name}-seed{seed}"
            t0 = time.perf_counter()
            cfg = base.model_copy(update=dict(switches, steps=steps, seed=seed, sample_every=0))
            ctx = StageContext(out_dir=out, previous=args.run_dir / "finetune-64", run_dir=args.run_dir, console=console)
            distill.run(cfg, ctx)
            wall = time.perf_counter() - t0
            ecfg = ev.model_copy(update=dict(checkpoint=str(out), metrics=["alignment", "fid"],
                                             alignment_n=args.alignment_n,
                                             reference=str(args.run_dir / "data" / "holdout"), kid=False))
            report = eval_stage.run(ecfg, StageContext(out_dir=out / "eval", console=console))
            m = report["metrics"]
            row = dict(seed=seed, alignment=m["alignment"]["overall"], fid=m["fid"]["fid"], distill_s=wall)
            results.setdefault(name, []).append(row)
            console.print(f"{name} seed {seed}: {row}")

    def spread(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"

    table = []
    console.print(f"\nTab. 3 at toy scale ({steps} distill steps, seeds {args.seeds}, {args.alignment_n} prompts):")
    console.print(f"{'row':<12} {'alignment':>18} {'FID':>18}   paper GenEval / ImageReward")
    for name, _, geneval, reward in ROWS:
        rows = results[name]
        al, fid = [r["alignment"] for r in rows], [r["fid"] for r in rows]
        table.append(dict(row=name, alignment=rows, alignment_mean=statistics.mean(al), fid_mean=statistics.mean(fid),
                          paper_geneval=geneval, paper_image_reward=reward))
        console.print(f"{name:<12} {spread(al):>18} {spread(fid):>18}   {geneval:.2f} / {reward:.2f}")
    result = dict(steps=steps, seeds=args.seeds, alignment_n=args.alignment_n, run_dir=str(args.run_dir), rows=table)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
