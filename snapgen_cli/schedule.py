"""Independent recipe stages side by side: ``snapgen run --jobs N`` (``[run] jobs``).

A recipe is a list, but its stages form a graph: the DiT teacher of the demo reads only the
precomputed shards, so it can train while the student's pretrain -> fine-tune chain runs. With
``jobs > 1`` the runner starts every stage whose inputs are done, up to ``jobs`` at a time, each
in its own process.

Decisions:

* **Dependencies come from the resolved config** (:func:`stage_dependencies`): a stage depends on
  every earlier stage whose output folder one of its settings points into (``"@teacher"``,
  ``"@data/holdout"``, ``"previous"`` made explicit by ``recipe.resolve_stage``); a value left as
  ``"previous"`` counts as the previous stage. Nothing else is read across stages, so the graph is
  exactly what the stages use; ``snapgen run --dry-run`` prints it.
* **Order**: among the stages that are ready, recipe order. The recipe stays the one place that
  says what comes first; put a long stage (a teacher) early to start it early.
* **``jobs`` worker processes** (``python -m snapgen_cli.schedule``; not ``multiprocessing``, which
  re-imports the caller's main module), each running one stage at a time: the stage runs the same
  config as it would in sequence (``resolve_stage``) and writes the same done-marker, so
  ``--from``, re-runs and ``--fresh`` behave as without ``--jobs``. Its progress goes to
  ``<run dir>/logs/<stage>.log``; the runner prints when each stage starts and ends.
* **Threads are a budget**: a stage that sets none gets ``cores // jobs`` (``cpu.available_cpus``);
  a stage starts only when its threads fit in the cores the running stages leave free, so stages
  never oversubscribe the cores (issue 16 item 6), and a stage may ask for more than its share: the
  demo's teacher finishes on both cores once the student's chain is done. The first ready stage
  (recipe order) that does not fit waits for cores, and no later stage starts before it (it would
  hold the cores the waiting stage needs: a reservation, never starvation). A stage asking for more
  threads than there are cores runs alone. Threads are fixed per stage, never changed while it runs,
  so a stage computes the same numbers on every run.
* **How idle threads wait**: the workers' OpenMP threads spin ``cpu.RUNNER_SPIN_COUNT`` iterations
  before they sleep (unless the user set ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``), longer than a
  plain command's ``cpu.SPIN_COUNT``: the budget guarantees that no stage of the run shares a
  multi-thread stage's cores (1-thread stages have no idle threads to spin).
* **Same results**: each stage seeds itself from its config (``stages.base.seeded``), so with the
  same threads a stage computes the same numbers in its own process as in sequence (tested,
  bitwise).
* **Failure**: the first stage that fails stops new starts; the stages running finish (they
  checkpoint, and a re-run resumes them); the run then exits with the failed stage's code (2 for
  bad config, 1 otherwise) and one line naming the stage, its error and its log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, SnapgenError

if TYPE_CHECKING:
    from .recipe import Recipe, Stage

LOG_DIR = "logs"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def stage_dependencies(recipe: Recipe, run_dir: Path, console=None) -> dict[str, list[str]]:
    """Each stage's name -> the earlier stages whose outputs it reads, in recipe order."""
    from .recipe import _context, resolve_stage

    root = Path(os.path.normpath(Path(run_dir).absolute()))
    index = {s.name: s.index for s in recipe.stages}
    deps: dict[str, list[str]] = {}
    for st in recipe.stages:
        cfg = resolve_stage(recipe, st, _context(recipe, st, run_dir, True, console))
        found = set()
        for v in _strings(cfg.model_dump()):
            if v == "previous" and st.index > 0:
                found.add(recipe.stages[st.index - 1].name)
                continue
            p = Path(os.path.normpath(Path(v).absolute())) if v else None
            if p is not None and p != root and p.is_relative_to(root):
                name = p.relative_to(root).parts[0]
                if index.get(name, st.index) < st.index:
                    found.add(name)
        deps[st.name] = sorted(found, key=index.__getitem__)
    return deps


def _run_job(job_file: str) -> tuple[int, str]:
    """Run one stage's job file in this worker, its output in the stage's log: ``(exit code, error)``."""
    import pickle

    from rich.console import Console

    from .recipe import run_one_stage
    from .stages.base import StageContext

    job = pickle.loads(Path(job_file).read_bytes())
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        ctx = StageContext(console=Console(file=sys.stderr, width=120), **job["context"])
        run_one_stage(job["module"], job["kind"], job["recorded"], job["config"], ctx)
        return 0, ""
    except SnapgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the runner, with the traceback in the log
        traceback.print_exc()
        return 1, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _worker() -> int:
    """A worker process (``python -m snapgen_cli.schedule``): runs the job files named on its stdin
    one after another and answers each with one JSON line ``[exit code, error]``. A worker imports
    torch and the stage modules once, not once per stage (about 4 s a stage on a 2-core CPU)."""
    from .cpu import bounded_spin_wait

    bounded_spin_wait()  # before torch loads (cpu.py)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        answers.write(json.dumps(_run_job(line.strip())) + "\n")
    return 0


class _Worker:
    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "snapgen_cli.schedule"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.stage: Stage | None = None
        self.t0 = 0.0
        self.cores = 0  # the cores its stage holds

    def start(self, stage: Stage, job: Path, cores: int) -> None:
        self.stage, self.t0, self.cores = stage, time.perf_counter(), cores
        self.proc.stdin.write(f"{job}\n")
        self.proc.stdin.flush()

    def answer(self) -> tuple[int, str]:
        line = self.proc.stdout.readline()
        if not line:  # the worker died (killed, out of memory, a crash in native code)
            return 1, f"its process ended with exit code {self.proc.wait()}"
        code, message = json.loads(line)
        return code, message

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.stdin.close()
        self.proc.wait()


def run_parallel(recipe: Recipe, run_dir: Path, stages: list[Stage], console, jobs: int,
                 contexts: dict, configs: dict) -> None:
    """Run ``stages`` (not yet done) up to ``jobs`` at a time, each once its dependencies are done.

    ``contexts`` / ``configs``: each stage's :class:`StageContext` and resolved config, as the
    sequential runner would use them."""
    import pickle
    import selectors

    from .cpu import available_cpus, resolve_threads, runner_wait_env

    deps = stage_dependencies(recipe, run_dir, console)
    todo = list(stages)
    pending = {s.name for s in todo}
    log_dir = Path(run_dir) / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = available_cpus()
    per_stage = max(1, cores // jobs)
    package_root = str(Path(__file__).resolve().parent.parent)  # the workers import this snapgen_cli
    env = runner_wait_env({**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")]))})
    workers = [_Worker(env) for _ in range(min(jobs, len(todo)))]
    failed: tuple[Stage, int, str, Path] | None = None
    done_count, total = len(recipe.stages) - len(todo), len(recipe.stages)
    try:
        while True:
            for w in workers:
                if failed is not None or w.stage is not None:
                    continue
                ready = next((s for s in todo if not pending & set(deps[s.name])), None)
                if ready is None:
                    break
                cfg = configs[ready.name]
                if cfg.threads is None:
                    cfg = cfg.model_copy(update={"threads": per_stage})
                held = sum(x.cores for x in workers if x.stage is not None)
                need = min(resolve_threads(cfg.threads)[0], cores)
                if held and need > cores - held:
                    break  # it waits for cores, and no later stage takes them first
                todo.remove(ready)
                ctx, log = contexts[ready.name], log_dir / f"{ready.name}.log"
                ctx.out_dir.mkdir(parents=True, exist_ok=True)
                job = log_dir / f"{ready.name}.job"
                job.write_bytes(pickle.dumps(dict(
                    module=ready.module.__name__, kind=ready.kind, recorded=ready.config.model_dump(mode="json"),
                    config=cfg, log=str(log),
                    context=dict(out_dir=ctx.out_dir, previous=ctx.previous, run_dir=ctx.run_dir, seed=ctx.seed))))
                w.start(ready, job, need)
                console.print(f"[bold]start[/bold] {ready.name} ({ready.kind}, {need} thread{'s' if need > 1 else ''}"
                              f"{' (all)' if cfg.threads == 'all' else ''}; "
                              f"after {', '.join(deps[ready.name]) or 'nothing'})"
                              f"; log: {log}")
            busy = [w for w in workers if w.stage is not None]
            if not busy:
                break
            with selectors.DefaultSelector() as sel:
                for w in busy:
                    sel.register(w.proc.stdout, selectors.EVENT_READ, w)
                ended = [key.data for key, _ in sel.select()]
            for w in ended:
                code, message = w.answer()
                st, seconds = w.stage, time.perf_counter() - w.t0
                w.stage = None
                (log_dir / f"{st.name}.job").unlink(missing_ok=True)
                pending.discard(st.name)
                if code == 0:
                    done_count += 1
                    console.print(f"[green]done[/green] [{done_count}/{total}] {st.name} in {seconds:.1f} s")
                    continue
                if w.proc.poll() is not None:  # a dead worker runs nothing more
                    workers.remove(w)
                if failed is None:
                    failed = (st, code if code in (1, 2) else 1, message, log_dir / f"{st.name}.log")
                    others = [x.stage.name for x in workers if x.stage is not None]
                    console.print(f"[red]failed[/red] {st.name}: {message}; waiting for "
                                  f"{', '.join(others) or 'no other stage'}")
    except BaseException:  # Ctrl-C, or the runner's own failure: no stage is left running
        for w in workers:
            w.close(kill=True)
        raise
    for w in workers:
        w.close()
    if failed is not None:
        st, code, why, log = failed
        cls = ConfigError if code == 2 else SnapgenError
        raise cls(f"stage {st.name!r} failed: {why} (log: {log})")


__all__ = ["stage_dependencies", "run_parallel", "LOG_DIR"]

if __name__ == "__main__":
    sys.exit(_worker())
