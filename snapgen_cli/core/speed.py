"""The fast paths on a GPU (issue 17): inference dtype, ``torch.compile`` and model FLOPs utilisation.

The paper's headline is speed (sec. 1, sec. 4.2: 1.04 samples/s at 1024^2 on one A100 with 28
steps; 647 G MACs per UNet step against SDXL's 3,381). The settings below are how the shipped
pipeline (``snapgen generate``, ``snapgen eval``) and the training loop get close to what a GPU
allows; the paper is silent on all of them, so each default is a decision written down here.

* **dtype** (``--dtype``): ``fp32``, ``bf16`` or ``fp16`` for the UNet and the decoder; ``auto``
  (the default) is **bf16 on CUDA** (tensor cores, and the flash / memory-efficient SDPA kernels,
  which take no fp32) and **fp32 elsewhere** (a CPU has no bf16 speed-up worth its rounding, and
  every CPU figure of this project is fp32). The sampler keeps its state ``x_t`` in fp32 (the
  UNet's input and output are cast), so the Euler updates (Eq. 3) do not accumulate bf16
  rounding; the text encoders keep the dtype of their specs (they run once per prompt).
* **compile** (``--compile`` / ``--no-compile``): ``torch.compile`` of the UNet and the decoder,
  in place (``nn.Module.compile``: the state dict and class stay). Default **on for CUDA** (with
  mode ``"reduce-overhead"``: CUDA graphs, which remove the launch overhead of the UNet's many
  small kernels at the pipeline's static shapes) and **off elsewhere** (on a CPU the first call
  compiles for minutes with a C++ compiler: 70-140 s for the tiny test UNet on one core, and the gain
  on the tiny models is small). Inductor's caches go to a persistent dir, :func:`compile_cache_dir`,
  so a second run reuses the compiled kernels instead of recompiling them (dynamo still traces the
  model again). Each new batch size compiles once more (the second one a version with a dynamic
  batch). Measured on an H200 (``benchmarks/results/gpu_bench_h200*.json``, empty cache): the first
  call compiled for 140 s (batch 16) and 170 s (batch 4); then 28 steps + CFG at 1024^2 ran 4.28 s a
  batch of 16 against 7.6 s eager (1.78x). From an empty cache compilation pays back only after
  about 40 such batches (~650 images): for a handful of images pass ``--no-compile``. The default
  stays on, for the long jobs (evaluations over thousands of prompts) and warm caches.
* **channels-last**: the UNet and the tiny decoder already run their activations channels-last
  (``core/unet.py``, ``core/decoder.py``); on CUDA the fast path also stores the conv weights
  channels-last so cuDNN does not convert them at every call. CPU weights stay as they are.
* **Training** (``train/loop.py``): ``compile`` (default off: a short run would spend its time
  compiling; on for long GPU runs), fused AdamW on CPU and CUDA, bf16 autocast through
  ``mixed_precision``; on CUDA the summary reports the MFU (:func:`mfu`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..config import StageSettings
from ..errors import ConfigError

#: ``--dtype`` names -> torch dtypes (``auto``: :func:`inference_dtype`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class InferenceSpeed(StageSettings):
    """The fast-path settings of the stages that sample (``generate``, ``eval``): ``--dtype``, ``--compile``."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="UNet and decoder dtype; auto: bf16 on CUDA, fp32 elsewhere")
    compile: bool | None = Field(
        None, description="torch.compile the UNet and decoder (CUDA graphs on CUDA; kernels cached in "
                          "~/.cache/snapgen/inductor); default: on for CUDA, off elsewhere")


def inference_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype ``--dtype name`` means on ``device``: ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype: expected auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def compile_default(flag: bool | None, device: torch.device | str) -> bool:
    """``--compile`` as given, else on for CUDA and off elsewhere (module docstring)."""
    return torch.device(device).type == "cuda" if flag is None else bool(flag)


def compile_cache_dir() -> Path:
    """Where inductor keeps its compiled kernels: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/snapgen/inductor`` (``~/.cache`` without it), set for this process so that
    a second run finds the first one's kernels (torch's own default is under ``/tmp``)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "snapgen" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_module(module: nn.Module, mode: str | None = None, dynamic: bool | None = None) -> nn.Module:
    """``module.compile(mode=mode, dynamic=dynamic)`` in place (its class, attributes and state dict
    keys stay), with inductor's caches in :func:`compile_cache_dir`. Compilation itself happens at the
    first call, once per input shape: by default a second shape compiles a version with dynamic sizes;
    ``dynamic=False`` compiles each shape on its own (inductor's dynamic-shape path fails on the UNet's
    training step at a second resolution: "cannot determine truth value of Relational", torch 2.14)."""
    compile_cache_dir()
    module.compile(mode=mode, dynamic=dynamic)
    return module


# ----------------------------------------------------------------------------------------
# Model FLOPs utilisation.

#: Dense bf16 tensor-core peak (FLOP/s, no sparsity) by GPU, from the vendor's data sheets.
#: Keys are matched against ``torch.cuda.get_device_name()``; H100 / H200 PCIe and NVL boards
#: have lower clocks and are not in the table (MFU is then omitted, with a note).
PEAK_BF16_FLOPS: dict[str, float] = {"H100 SXM": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named ``device_name``, or ``None`` for a GPU not in
    :data:`PEAK_BF16_FLOPS`. ``NVIDIA H100 80GB HBM3`` is the SXM board (HBM3; PCIe has HBM2e)."""
    name = device_name.upper()
    if any(k in name for k in ("PCIE", "NVL")):
        return None
    if "H100" in name and "HBM3" in name:
        return PEAK_BF16_FLOPS["H100 SXM"]
    for key in ("H200", "A100"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def training_flops_per_sample(forward_macs: int, gradient_checkpointing: bool) -> int:
    """FLOPs of one training sample: the MACs of one forward x 2 FLOPs per MAC x 3 (forward and a
    backward of twice its cost), plus one more forward where gradient checkpointing recomputes the
    activations (sup. G trains with it)."""
    return 2 * forward_macs * (4 if gradient_checkpointing else 3)


def mfu(forward_macs: int, samples_per_s: float, peak_flops: float, gradient_checkpointing: bool) -> float:
    """Model FLOPs utilisation: :func:`training_flops_per_sample` x samples/s / the peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return training_flops_per_sample(forward_macs, gradient_checkpointing) * samples_per_s / peak_flops


def mfu_report(forward_macs: int | None, samples_per_s: float, device: torch.device, gradient_checkpointing: bool,
               peak_flops: float | None = None) -> dict:
    """The MFU entry of a training summary: ``{"mfu", "peak_flops", "forward_macs_per_sample", ...}``,
    or ``{"mfu": None, "note": why}`` (not CUDA, a GPU without a known peak, no MAC count)."""
    if peak_flops is None:
        if device.type != "cuda":
            return {"mfu": None, "note": f"MFU is reported on CUDA only (device {device.type})"}
        name = torch.cuda.get_device_name(device)
        peak_flops = peak_bf16_flops(name)
        if peak_flops is None:
            return {"mfu": None, "note": f"no dense bf16 peak known for {name!r} (core/speed.py PEAK_BF16_FLOPS)"}
    if not forward_macs:
        return {"mfu": None, "note": "the task reports no MAC count of its forward pass"}
    return {"mfu": mfu(forward_macs, samples_per_s, peak_flops, gradient_checkpointing), "peak_flops": peak_flops,
            "forward_macs_per_sample": forward_macs, "gradient_checkpointing": gradient_checkpointing,
            "flops_per_sample": training_flops_per_sample(forward_macs, gradient_checkpointing)}


__all__ = ["DTYPES", "DTYPE_NAMES", "InferenceSpeed", "PEAK_BF16_FLOPS", "compile_cache_dir", "compile_default",
           "compile_module", "inference_dtype", "mfu", "mfu_report", "peak_bf16_flops", "training_flops_per_sample"]
