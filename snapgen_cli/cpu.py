"""CPU threads of a stage: how many, and no busy-waiting (issue 16 item 6).

Decisions:

* **Default thread count.** ``$OMP_NUM_THREADS`` when set (the user's choice, or the launcher's:
  ``torchrun`` sets 1 per process), else the cores this process may really use: its affinity mask
  (``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``, Slurm), capped by the cgroup's
  CPU quota (``docker --cpus``, Kubernetes limits; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``),
  rounded down as Go's automaxprocs does (a 1.5-CPU quota gets 1 thread), divided among the
  ``$LOCAL_WORLD_SIZE`` processes ``accelerate launch`` / ``torchrun`` start on the machine; at
  least 1. torch's own default follows the affinity mask but not a quota or the other ranks.
* **Passive waiting.** PyTorch's CPU wheels use GNU OpenMP, whose idle threads spin for a while
  after every parallel region. On a machine that other jobs also use, the spinning threads take
  the cores the working ones need: a ``tiny`` pretrain stage on a loaded 2-core machine (measured,
  contended cores) ran 14.5 samples/s with 2 spinning threads, 270 with ``OMP_WAIT_POLICY=PASSIVE``
  and 281 with one thread. libgomp reads the policy once, when torch loads it, so the console entry
  point sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before anything imports torch;
  set later, it has no effect (measured: the same spin time as unset). For tiny models the cost is
  a wake-up latency on each parallel region, well under the loss to spinning on a busy machine.
* ``threads`` is a setting of every stage (``--threads``, a recipe key, ``[run] threads`` for all
  stages of a recipe); a stage's threads are set for its run and the caller's restored after it.
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


def prefer_passive_wait() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy; only before torch is imported
    (libgomp reads it when it loads), so the console entry point calls this first."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def stage_threads(threads: int | None) -> Iterator[int]:
    """Run a stage with ``threads`` torch threads (``None``: :func:`default_threads`); the
    caller's count is restored afterwards."""
    import torch

    global _current
    n, why = (threads, "--threads") if threads is not None else default_threads()
    before, outer = torch.get_num_threads(), _current
    torch.set_num_threads(n)
    _current = (n, why)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        _current = outer


def describe_threads() -> str:
    """``threads: N (source); OMP_WAIT_POLICY P``: torch's thread count now and where it comes from."""
    import torch

    n = torch.get_num_threads()
    why = _current[1] if _current and _current[0] == n else "torch's default"
    return f"threads: {n} ({why}); OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset (OpenMP spins)')}"


def close_process_group() -> None:
    """Destroy torch.distributed's default process group, if one is up, when the process is done
    with it: the console entry point calls this on exit (``train`` leaves the group up for the
    stages after it). A gloo group left to the interpreter's teardown can abort a rank after its
    work is done ("terminate called without an active exception", SIGABRT; seen once in a
    2-process CPU FSDP run). Imports nothing: without torch loaded there is no group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
