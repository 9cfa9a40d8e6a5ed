"""Parameter, MAC, latency and peak-memory measurement.

MACs follow the paper's convention: the paper's "FLOPs" are multiply-accumulates (the
SD3 decoder's 4970 "GFLOPs" at 1024^2 are MACs), so we report
``MACs = FLOPs / 2`` of ``torch.utils.flop_counter``. Counting runs on the meta device:
no weights are materialised and nothing is computed, so even the SDXL UNet at 128x128
counts in a second. The counter sees matmuls, convolutions and attention (SDPA);
normalisations and element-wise ops are not counted, as in the paper's tables.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(call: Callable[[], object]) -> int:
    """MACs (= FLOPs / 2) of ``call()``; run it with meta-device models and inputs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() // 2


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS; a no-op on CPU): timings end here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_latency(call: Callable[[], object], device: torch.device, runs: int, warmup: int) -> dict:
    """Median and spread of ``call()`` wall time after ``warmup`` runs, and peak memory.

    Peak memory: on CUDA the allocator's peak during the timed runs; on MPS the driver's
    allocation after them; on CPU the process's peak resident set size (it includes the
    weights and everything allocated before, so read it as "the process needed this much").
    """
    with torch.no_grad():
        for _ in range(warmup):
            call()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        mem, mem_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    elif device.type == "mps":
        mem, mem_kind = torch.mps.driver_allocated_memory(), "mps_driver_allocated"
    else:
        mem, mem_kind = _rss_bytes(), "cpu_peak_rss"
    gc.collect()
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return dict(
        latency_ms_median=1e3 * statistics.median(times),
        latency_ms_p25=1e3 * q[0], latency_ms_p75=1e3 * q[2],
        latency_ms_min=1e3 * min(times), latency_ms_max=1e3 * max(times),
        runs=runs, warmup=warmup, peak_memory_mb=mem / 2**20, peak_memory_kind=mem_kind,
    )


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``mps``; an unavailable device is a clear error."""
    from ..errors import ConfigError

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: expected cpu, cuda or mps")
    return dev
