"""Sec. 4 "Few-Step Generation" (Fig. 9) at toy scale: the demo's model at 4 and 8 steps before
and after step distillation, over several seeds, next to its many-step score.

For each of ``--seeds``: ``snapgen step-distill`` from the demo's distilled student
(``distill``) with that seed (the demo recipe's settings), then ``snapgen eval`` of the model
before (``distill``) and after step distillation at 4 and 8 steps with that seed for the
sampling noise (the model after step distillation at the guidance it was distilled for, its
stage's ``guidance``): the built-in alignment suite on its held-out prompts and FID against the
held-out images (``data/holdout``, 96 images: read FID as a relative figure between rows).
The many-step row is the distilled model at the demo's 20 steps. Prints mean and spread over
seeds next to the paper's GenEval figures (Fig. 9: 0.66 at 28 steps, 0.63 at 8, 0.61 at 4
after step distillation), and writes JSON.

    snapgen run --out runs/demo                                 # the demo, for its stages
    python benchmarks/step_distill_eval.py --run-dir runs/demo --json-out benchmarks/results/step_distill.json

Ablations: ``--variant NAME KEY=VALUE ...`` (repeatable) trains and scores one step-distilled
model per variant and seed, each the recipe's stage with those settings on top (``--variant
default`` for the recipe's own); the rows are then ``after-N/NAME``. ``--counts`` picks the
step counts scored (default 4 and 8), ``--no-many`` skips the many-step row.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from snapgen_cli.recipe import load_recipe, resolve_refs
from snapgen_cli.stages import eval as eval_stage
from snapgen_cli.stages import step_distill
from snapgen_cli.stages.base import StageContext

PAPER_GENEVAL = {"many": 0.66, "after-8": 0.63, "after-4": 0.61}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished demo run (snapgen run --out DIR)")
    ap.add_argument("--recipe", type=Path, default=Path(__file__).parents[1] / "recipes" / "demo.toml")
    ap.add_argument("--steps", type=int, default=None, help="step-distill steps per run (default: the recipe's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alignment-n", type=int, default=360)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the runs go (default: RUN_DIR/step_distill_eval)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra step-distill settings (TOML values), e.g. guidance=1.0")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a step-distill variant: a name, then its settings on top of the recipe's (repeatable)")
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 8], help="sampling step counts to score")
    ap.add_argument("--no-many", action="store_true", help="skip the many-step row")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    for name, *sets in args.variant:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not all("=" in o for o in sets):
            ap.error(f"--variant {name} {' '.join(sets)}: expected a name ([A-Za-z0-9_.-]) then KEY=VALUE settings")
    variants = {v[0]: v[1:] for v in args.variant} or {"": []}

    console = Console(file=sys.stderr)

    def stage_config(sets: list[str]):
        """The recipe's step-distill stage with ``--set`` and ``sets`` on top, resolved to the run."""
        rec = load_recipe(args.recipe, tuple(f"stages.step-distill.{o}" for o in [*args.overrides, *sets]))
        return rec, resolve_refs(rec.stage("step-distill").config, args.run_dir)

    recipe, base = stage_config([])
    configs = {name: stage_config(sets)[1] for name, sets in variants.items()}  # resolved once, not per seed
    ev = resolve_refs(recipe.stage("eval-4step").config, args.run_dir)
    many = resolve_refs(recipe.stage("eval").config, args.run_dir)
    work = args.work_dir or args.run_dir / "step_distill_eval"
    steps = args.steps or base.steps
    rows: dict[str, list[dict]] = {}

    def score(name: str, cfg, ckpt: Path, seed: int, out: Path, **kw) -> None:
        ecfg = cfg.model_copy(update=dict(checkpoint=str(ckpt), metrics=["alignment", "fid"], kid=False,
                                          alignment_n=args.alignment_n, seed=seed, **kw))
        m = eval_stage.run(ecfg, StageContext(out_dir=out, console=console))["metrics"]
        row = dict(seed=seed, alignment=m["alignment"]["overall"], fid=m["fid"]["fid"], steps=ecfg.steps)
        rows.setdefault(name, []).append(row)
        console.print(f"{name} seed {seed}: {row}")

    distilled = args.run_dir / "distill"
    for seed in args.seeds:
        out = work / f"seed{seed}"
        if not args.no_many:
            score("many", many, distilled, seed, out / "eval-many", recon_images=None)
        for n in args.counts:
            score(f"before-{n}", ev, distilled, seed, out / f"eval-before-{n}", steps=n)
        for name, vcfg in configs.items():
            vout = out / name if name else out
            t0 = time.perf_counter()
            cfg = vcfg.model_copy(update=dict(steps=steps, seed=seed, sample_every=0))
            step_distill.run(cfg, StageContext(out_dir=vout, previous=distilled, run_dir=args.run_dir, console=console))
            console.print(f"step-distill {name or ''} seed {seed}: {time.perf_counter() - t0:.0f} s")
            for n in args.counts:  # at the guidance the model was distilled and saved for
                score(f"after-{n}" + (f"/{name}" if name else ""), ev, vout, seed, vout / f"eval-after-{n}", steps=n,
                      guidance=cfg.guidance)

    def mean_sd(xs: list[float]) -> tuple[float, float]:
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = []
    console.print(f"\nFew-step generation at toy scale ({steps} step-distill steps, seeds {args.seeds}, "
                  f"{args.alignment_n} prompts):")
    console.print(f"{'row':<24} {'steps':>5} {'alignment':>18} {'FID':>18}   paper GenEval")
    for name, r in rows.items():
        (am, asd), (fm, fsd) = mean_sd([x["alignment"] for x in r]), mean_sd([x["fid"] for x in r])
        table.append(dict(row=name, steps=r[0]["steps"], runs=r, alignment_mean=am, alignment_sd=asd, fid_mean=fm,
                          fid_sd=fsd, paper_geneval=PAPER_GENEVAL.get(name.split("/")[0])))
        paper = PAPER_GENEVAL.get(name.split("/")[0])
        console.print(f"{name:<24} {r[0]['steps']:>5} {am:>10.4f} +- {asd:.4f} {fm:>10.2f} +- {fsd:.2f}   "
                      f"{paper if paper is not None else '-'}")
    paired = paired_differences(rows)
    if paired:
        console.print("\nAfter - before, paired by seed (mean +- standard error; seeds better):")
    for name, p in paired.items():
        n = len(p["seeds"])
        console.print(f"{name:<24} alignment {p['alignment_diff']:+.4f} +- {p['alignment_se']:.4f} "
                      f"({p['seeds_alignment_up']}/{n} up)   FID {p['fid_diff']:+.2f} +- {p['fid_se']:.2f} "
                      f"({p['seeds_fid_lower']}/{n} lower)")
    result = dict(step_distill_steps=steps, seeds=args.seeds, alignment_n=args.alignment_n, run_dir=str(args.run_dir),
                  overrides=args.overrides, variants=variants if args.variant else None, rows=table,
                  paired_after_minus_before=paired)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def paired_differences(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Each ``after-N[/variant]`` row minus ``before-N``, seed by seed (the same sampling noise and
    prompts on both sides, so the seed-to-seed spread of the sampler cancels): mean, its standard
    error over seeds, and how many seeds got better (alignment up, FID lower)."""
    out = {}
    for name, runs in rows.items():
        if not name.startswith("after-"):
            continue
        before = {r["seed"]: r for r in rows.get("before-" + name.split("/")[0].removeprefix("after-"), [])}
        pairs = [(r, before[r["seed"]]) for r in runs if r["seed"] in before]
        if not pairs:
            continue
        da = [a["alignment"] - b["alignment"] for a, b in pairs]
        df = [a["fid"] - b["fid"] for a, b in pairs]
        out[name] = dict(seeds=[a["seed"] for a, _ in pairs],
                         alignment_diff=statistics.mean(da), alignment_se=_standard_error(da),
                         seeds_alignment_up=sum(d > 0 for d in da),
                         fid_diff=statistics.mean(df), fid_se=_standard_error(df),
                         seeds_fid_lower=sum(d < 0 for d in df))
    return out


def _standard_error(xs: list[float]) -> float:
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


if __name__ == "__main__":
    main()
