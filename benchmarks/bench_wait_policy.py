"""How OpenMP's idle threads should wait: a 2-thread training stage alone and beside a busy core.

``snapgen_cli/cpu.py`` chooses how libgomp's idle threads wait between parallel regions
(``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``; read once, when torch loads). Spinning is fast when
the stage has the cores to itself and ruinous when another job wants one of them; sleeping at
once (``PASSIVE``) is the reverse. This measures both sides with one real stage: the demo's
autoencoder (``snapgen train-decoder --mode autoencoder``, tiny-ae, batch 16 on 32^2 crops;
many small convolutions, so many short parallel regions) for ``--steps`` steps with
``--threads 2``, under each wait setting:

* ``alone``: nothing else runs;
* ``busy``: beside one single-thread process doing 512x512 matmuls non-stop (another job on
  one of the two cores), and, as the reference, the same stage with ``--threads 1`` there.

Each run is a fresh ``snapgen`` process (the policy is read at start-up); the figure is the
stage's wall time, start-up included. All runs are in one invocation, back to back, so the
ratios compare like with like on a shared machine. Writes ``benchmarks/results/cpu_wait_policy.json``.

    python benchmarks/bench_wait_policy.py [--steps 100] [--spins 2000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cpu_wait_policy.json"
# The neighbour: one thread of 512x512 matmuls, counting them in a file every 0.5 s (its own rate
# during a run tells what the stage's waiting costs the other job).
BUSY = ("import sys, time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); n = 0; t = time.time()\n"
        "while True:\n"
        "    a @ a; n += 1\n"
        "    if time.time() - t > 0.5: open(sys.argv[1], 'w').write(str(n)); t = time.time()")


def snapgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapgen_cli", *args]


def wait_env(setting: str) -> dict:
    """The environment of one wait setting: ``PASSIVE``, ``ACTIVE``, ``unset`` (libgomp's own
    default: spin ~300k iterations) or ``spin:N`` (``GOMP_SPINCOUNT=N``, policy unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if setting in ("PASSIVE", "ACTIVE"):
        env["OMP_WAIT_POLICY"] = setting
    elif setting.startswith("spin:"):
        env["OMP_WAIT_POLICY"] = ""  # set, so snapgen leaves the wait to libgomp and GOMP_SPINCOUNT
        env["GOMP_SPINCOUNT"] = setting.split(":", 1)[1]
    elif setting == "unset":
        env["OMP_WAIT_POLICY"] = ""  # an empty policy is libgomp's default (and snapgen keeps it)
    else:
        raise SystemExit(f"unknown wait setting {setting!r}")
    return env


def stage_seconds(work: Path, data: Path, steps: int, threads: int, setting: str) -> float:
    out = work / "ae"
    shutil.rmtree(out, ignore_errors=True)
    cmd = snapgen("train-decoder", "--out", str(out), "--mode", "autoencoder", "--data", str(data),
                  "--autoencoder-overrides", "{latent_channels = 4}", "--patch-size", "32", "--steps", str(steps),
                  "--batch-size", "16", "--lr", "0.002", "--lpips-weight", "0", "--adv-weight", "0",
                  "--checkpoint-every", str(steps), "--tracker", "none", "--threads", str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=wait_env(setting), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train-decoder failed ({setting}):\n{proc.stderr[-2000:]}")
    return round(seconds, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--spins", default="2000,10000", help="GOMP_SPINCOUNT values to try")
    ap.add_argument("--no-unset", action="store_true", help="skip libgomp's default beside the busy core (slow)")
    args = ap.parse_args()
    settings = ["PASSIVE", "ACTIVE", *[f"spin:{n}" for n in args.spins.split(",") if n], "unset"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(snapgen("shapes-data", "--out", str(work / "data"), "--n-captioned", "400", "--n-classes", "10",
                               "--n-holdout", "8", "--resolution", "64"),
                       env=wait_env("PASSIVE"), check=True, capture_output=True)
        data = work / "data" / "captioned"
        rows = {"alone": {}, "busy": {}}
        for s in settings:
            rows["alone"][s] = stage_seconds(work, data, args.steps, 2, s)
            print(f"alone  {s:22s} {rows['alone'][s]:7.1f} s", file=sys.stderr)
        rows["alone"]["threads 1"] = stage_seconds(work, data, args.steps, 1, "PASSIVE")
        print(f"alone  {'threads 1':22s} {rows['alone']['threads 1']:7.1f} s", file=sys.stderr)
        counter = work / "neighbour"
        busy = subprocess.Popen([sys.executable, "-c", BUSY, str(counter)])

        def done() -> int:  # the neighbour's count so far (0 while it starts or rewrites the file)
            text = counter.read_text() if counter.exists() else ""
            return int(text) if text.strip().isdigit() else 0

        def beside(label: str, threads: int, setting: str) -> None:
            n0, t0 = done(), time.perf_counter()
            rows["busy"][label] = stage_seconds(work, data, args.steps, threads, setting)
            neighbour[label] = round((done() - n0) / (time.perf_counter() - t0), 1)
            print(f"busy   {label:22s} {rows['busy'][label]:7.1f} s   neighbour {neighbour[label]:6.1f} matmul/s",
                  file=sys.stderr)

        neighbour: dict[str, float] = {}
        try:
            time.sleep(3)
            n0 = done()
            time.sleep(5)
            neighbour["alone (no stage)"] = round((done() - n0) / 5, 1)
            for s in settings:
                if not (s == "unset" and args.no_unset):
                    beside(s, 2, s)
            beside("threads 1", 1, "PASSIVE")
        finally:
            busy.kill()
    best = {k: min(v.values()) for k, v in rows.items()}
    result = {
        "benchmark": "cpu_wait_policy",
        "what": "wall s of `snapgen train-decoder --mode autoencoder` (demo's tiny-ae, batch 16, 32^2 crops), "
                f"{args.steps} steps, start-up included; busy = beside a 1-thread matmul loop",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs; python {platform.python_version()}",
        "steps": args.steps,
        "seconds": rows,
        "vs_best": {k: {s: round(t / best[k], 2) for s, t in v.items()} for k, v in rows.items()},
        "neighbour_matmul_per_s": neighbour,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
