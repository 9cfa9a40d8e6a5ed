"""CPU threads of a stage: how many, and no busy-waiting (issue 16 item 6).

Decisions:

* **Default thread count.** ``$OMP_NUM_THREADS`` when set (the user's choice, or the launcher's:
  ``torchrun`` sets 1 per process), else the cores this process may really use: its affinity mask
  (``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``, Slurm), capped by the cgroup's
  CPU quota (``docker --cpus``, Kubernetes limits; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``),
  rounded down as Go's automaxprocs does (a 1.5-CPU quota gets 1 thread), divided among the
  ``$LOCAL_WORLD_SIZE`` processes ``accelerate launch`` / ``torchrun`` start on the machine; at
  least 1. torch's own default follows the affinity mask but not a quota or the other ranks.
* **Bounded spinning.** PyTorch's CPU wheels use GNU OpenMP, whose idle threads spin after every
  parallel region before they sleep: 300,000 iterations by default (``OMP_WAIT_POLICY`` unset),
  none with ``PASSIVE``, for ever with ``ACTIVE``. On a machine that other jobs also use, the
  spinning threads take the cores the working ones need: a ``tiny`` pretrain stage on a loaded
  2-core machine (measured, contended cores) ran 14.5 samples/s with 2 spinning threads, 270 with
  ``PASSIVE`` and 281 with one thread. But a stage alone on its cores pays ``PASSIVE``'s wake-up on
  every one of its many short parallel regions (``benchmarks/bench_wait_policy.py``, the demo's
  autoencoder, 2 threads, 100 steps; ``benchmarks/results/cpu_wait_policy.json``): 20.4 s passive,
  11.1 s with libgomp's default, 14.4 s with one thread. So idle threads spin a bounded
  ``SPIN_COUNT`` iterations, then sleep (``GOMP_SPINCOUNT``): the setting with the smallest worst
  case measured. 2,000 took 13.7 s alone and 26.1 s beside a busy single-thread job (``PASSIVE``:
  24.1 s, libgomp's default: 125.0 s), and left that job 762 matmul/s of its 803 (``PASSIVE``: 776,
  ``ACTIVE``: 576); 10,000 took 12.0 s alone but 33.2 s beside it. libgomp reads both once, when
  torch loads it, so the console entry point sets ``GOMP_SPINCOUNT`` (unless the user set it or
  ``OMP_WAIT_POLICY``) before anything imports torch; set later, they have no effect (measured).
  Beside another job, one thread beat two under every wait setting (15.3 s): give each job its own
  cores (README).
* ``threads`` is a setting of every stage (``--threads``, a recipe key, ``[run] threads`` for all
  stages of a recipe; ``all``: every available core, whatever the machine); a stage's threads are
  set for its run and the caller's restored after it. ``snapgen run --jobs`` counts them against
  the cores (schedule.py), and its workers spin ``RUNNER_SPIN_COUNT``: no stage of the run shares
  a multi-thread stage's cores there.
  Training stages log the count, its source and the wait policy when training starts
  (:func:`describe_threads`) and record the count in their summary (``threads``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_current: tuple[int, str] | None = None  # (threads, source) of the stage running now


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or ``None`` without one.

    cgroup v2: ``cpu.max`` ("<quota> <period>" or "max <period>"); v1: ``cpu/cpu.cfs_quota_us``
    (-1: none) over ``cpu/cpu.cfs_period_us``. Reads the mount root, which is the process's own
    cgroup inside a container."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota (rounded down)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def default_threads(root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """``(threads, why)``: the default thread count of a stage and where it comes from."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "$OMP_NUM_THREADS"
    cores = available_cpus(root)
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    ranks = int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1
    why = f"{cores} core{'s' if cores > 1 else ''} available" + (f" / {ranks} local processes" if ranks > 1 else "")
    return max(1, cores // ranks), why


#: Iterations an idle OpenMP thread spins before it sleeps (libgomp's ``GOMP_SPINCOUNT``; module docstring).
SPIN_COUNT = 2_000
#: The same in ``snapgen run --jobs``'s workers, whose multi-thread stages hold their cores (schedule.py):
#: the demo's DiT teacher on 2 threads ran 227 samples/s with ``SPIN_COUNT``, 276 with 10,000, 277
#: with 30,000, against 166 on one thread (150 steps each, alone on this 2-core machine).
RUNNER_SPIN_COUNT = 10_000
_spin_defaulted = False  # whether bounded_spin_wait set GOMP_SPINCOUNT (the user did not)


def _user_chose_wait(env) -> bool:
    return "OMP_WAIT_POLICY" in env or ("GOMP_SPINCOUNT" in env and not _spin_defaulted)


def bounded_spin_wait() -> None:
    """``GOMP_SPINCOUNT=SPIN_COUNT`` unless the user chose how OpenMP waits (``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` set); only before torch is imported (libgomp reads it when it loads), so
    the console entry point calls this first."""
    global _spin_defaulted
    if "torch" not in sys.modules and not _user_chose_wait(os.environ):
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        _spin_defaulted = True


def runner_wait_env(env: dict) -> dict:
    """``env`` for the worker processes of ``snapgen run --jobs``: ``GOMP_SPINCOUNT=RUNNER_SPIN_COUNT``
    unless the user chose how OpenMP waits."""
    return env if _user_chose_wait(env) else {**env, "GOMP_SPINCOUNT": str(RUNNER_SPIN_COUNT)}


def describe_wait() -> str:
    """How idle OpenMP threads wait, as the environment tells libgomp."""
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if policy:
        return f"OMP_WAIT_POLICY {policy}" + (f", GOMP_SPINCOUNT {spin}" if spin else "")
    return f"OpenMP wait: spin {spin} then sleep (GOMP_SPINCOUNT)" if spin else "OpenMP wait: libgomp's default"


def resolve_threads(threads: int | str | None) -> tuple[int, str]:
    """The thread count a stage's ``threads`` setting means, and where it comes from: ``None``:
    :func:`default_threads`; ``"all"``: every available core (:func:`available_cpus`)."""
    if threads == "all":
        return available_cpus(), "--threads all"
    return (threads, "--threads") if threads is not None else default_threads()


@contextmanager
def stage_threads(threads: int | str | None) -> Iterator[int]:
    """Run a stage with ``threads`` torch threads (``None``: :func:`default_threads`; ``"all"``: every
    available core, :func:`available_cpus`); the caller's count is restored afterwards."""
    import torch

    global _current
    n, why = resolve_threads(threads)
    before, outer = torch.get_num_threads(), _current
    torch.set_num_threads(n)
    _current = (n, why)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        _current = outer


def describe_threads() -> str:
    """``threads: N (source); <wait>``: torch's thread count now, where it comes from, and how idle
    threads wait (:func:`describe_wait`)."""
    import torch

    n = torch.get_num_threads()
    why = _current[1] if _current and _current[0] == n else "torch's default"
    return f"threads: {n} ({why}); {describe_wait()}"


def close_process_group(wait: bool = False) -> None:
    """Destroy torch.distributed's default process group, if one is up, when the process is done
    with it: the console entry point calls this on exit (``train`` leaves the group up for the
    stages after it). A gloo group left to the interpreter's teardown can abort a rank after its
    work is done ("terminate called without an active exception", SIGABRT; seen twice in a
    2-process CPU FSDP run, once after this function destroyed the group): gloo's worker threads
    may still hold finished collectives' work objects, whose tensors are freed during interpreter
    finalization. So, in this order: ``wait`` (on a normal exit; not after an error, when another
    rank may never get there) waits until every rank is done with its collectives (a barrier),
    then a garbage collection frees the models and optimizer states that ``train`` left in
    reference cycles (FSDP's hold work objects) while the interpreter is whole, then the group
    goes. Imports nothing: without torch loaded there is no group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        import gc

        gc.collect()
        dist.destroy_process_group()
