"""The one accelerate training loop every training stage shares (paper sec. 4, sup. G).

A stage describes *what* to train with a :class:`TrainTask`; :func:`train` does the rest:
AdamW (weight decay 0.01, betas (0.9, 0.999)) per trainable, a constant LR of 5e-5 at a
global batch of 1024 scaled linearly with the global batch, gradient accumulation and
clipping, EMA (decay 0.999) of the main model, mixed precision, gradient checkpointing,
atomic checkpoints with exact resume, per-step losses, trackers, sample grids and a NaN
guard. It runs unchanged under ``accelerate launch`` (DDP, multi-node; FSDP with ``fsdp``).

How stages plug in (no inheritance beyond the small :class:`TrainTask` base):

* ``pretrain`` / ``finetune``: one trainable (the UNet), phase ``"main"``; ``loss`` noises
  a batch with a :class:`~snapgen_cli.core.flow.Objective` and regresses its target.
* ``distill``: trainables ``{"unet", "projector"}`` in one phase; the teacher in ``frozen()``.
* ``train-decoder`` / ``step-distill``: trainables ``{"decoder"|"unet", "discriminator"}`` and
  two phases (``{"generator": ("unet",), "discriminator": ("discriminator",)}``) updated in
  turn on every micro-batch; during a phase the other trainables' parameters do not require
  gradients, so e.g. the generator's adversarial loss never leaves gradients in the critic.

Decisions where the paper is silent:

* **Exactness.** All per-sample randomness comes from :attr:`StepContext.generators`, one
  generator per sample seeded by ``(seed, step, global slot)``; the data order is a
  permutation per epoch, a function of ``(seed, epoch)`` only, of which each process takes
  its slice of every global batch. So a resumed run repeats the uninterrupted one, and ``P``
  processes with batch ``b`` compute what one process computes with batch ``P * b``.
  Resuming jumps to the data position of the checkpoint's step without reading the skipped
  batches.
* **Data order** (:class:`GlobalBatchSampler`), as large-scale loaders shuffle sharded
  data: each epoch puts the shards in a random order, cuts it into windows of
  ``shuffle_window_shards`` shards and shuffles the samples within each window, so a stretch
  of training touches a bounded set of shard files (open files, page-cache and readahead
  locality, O(window) memory for the order instead of O(data set)) while batches still mix
  many shards. Default 64 shards (65536 samples at precompute's 1024 per shard); 0 shuffles
  the whole data set at once. A dataset without ``shard_ranges()`` (decoder images, toy
  sets) is one shard, and a data set of one window is permuted exactly as before windows.
* **DataLoader**: pinned memory when training on CUDA; ``num_workers`` worker processes,
  by default (``None``) 0 when training on the CPU, whose step needs every core, else up to
  4 per process from the cores it has to itself (``LOCAL_WORLD_SIZE`` processes share the
  machine), one left to the main process. Workers pay where cores are idle: the data path
  alone on 2 idle cores read 1024^2 samples at 316/s in-process, 323/s with 1 worker and
  454/s with 2 (``benchmarks/results/cpu_data.json``); next to 3 other busy processes (an
  earlier run, before shards.py's drop-behind) workers were slower: 148/s in-process,
  99-106/s with workers. A worker's :class:`SnapgenError` (e.g. a corrupt shard) is re-raised
  as its own one-line message.
* **Steps** count optimizer updates, from 1; ``checkpoints/step_000100`` holds the state
  after 100 of them. A checkpoint is written to ``step_000100.tmp``, every file fsynced
  (:func:`_write_file`, the one writer of checkpoint files), then the dir, then renamed and
  the parent dir fsynced, so a kill or a power cut never leaves a broken latest checkpoint;
  ``resume="auto"`` ignores ``.tmp`` dirs. ``keep_checkpoints`` prunes the oldest, never one
  newer than the checkpoint just written.
* **Checkpoint format** (``snapgen-checkpoint`` version 1): safetensors + JSON, written and
  read by this module (not ``accelerator.save_state``, whose optimizer, scheduler, RNG and
  custom-object files are pickles: loading one runs whatever code it carries). Nothing is
  ever unpickled: loading a safetensors or JSON file runs no code. Per checkpoint dir:

  - ``weights.<trainable>.safetensors``: each trainable's state dict (tensors sharing
    storage, e.g. tied weights, stored once);
  - ``optimizer.<trainable>.safetensors``: its AdamW per-parameter tensors, keyed
    ``<parameter name>/<exp_avg|exp_avg_sq|step>``;
  - ``ema.safetensors``: the EMA's shadow parameters, keyed by the main model's parameter names;
  - ``checkpoint.json``, written last: ``format`` / ``version``, ``loop`` (``step``), the
    trainables, per optimizer its parameter names and shapes and ``param_groups``
    (hyper-parameters), per LR scheduler its ``state_dict`` (diffusers' ``get_scheduler`` is
    a ``LambdaLR`` of plain functions: ``lr_lambdas`` are ``None``, the rest are numbers),
    the EMA's scalars (``optimization_step``, ``decay``, ...), the fp16 ``GradScaler`` state
    (``null`` without one; accelerate makes none on CPU, so the CPU tests do not reach it), and
    the size and sha256 of every other file.

  A checkpoint is *intact* when its manifest parses and every file matches its recorded
  size and sha256 and parses. ``resume="auto"`` walks back from the newest and resumes from
  the newest intact one, with a warning naming what is wrong with the newer ones (they stay
  on disk until overwritten); a corrupt checkpoint passed as ``resume`` is a
  :class:`SnapgenError` naming the file. A checkpoint of another model (other trainables,
  tensor names or shapes), of another format, or of older snapgen versions (``accelerate``
  pickles, never opened) is a :class:`ConfigError` naming it, the tensor and the fix; so is one
  whose optimizer ran with another lr (after ``lr_reference_batch`` scaling), betas, eps or
  weight decay than this run's (a resumed optimizer would silently keep the checkpoint's); nothing
  on disk is changed by a refused resume. **No RNG state is saved**: every
  random draw comes from per-sample generators seeded by ``(seed, step, slot)`` and the data
  order is a function of ``(seed, epoch)`` (above), so the global RNG state does not affect
  what a resumed run computes (the SIGKILL test resumes to 1e-6 of the uninterrupted run).
  Only the main process writes (under DDP every rank holds the same state, under FSDP the
  ranks gather the full tensors for it, below); every process reads.
* **EMA** is diffusers' ``EMAModel`` (its default warm-up: decay ``min(0.999, (1+n)/(10+n))``
  at update ``n``), kept on every process (its shard under FSDP) and saved as ``model_ema``
  apart from ``model``; its update is one fused ``lerp`` (:class:`LerpEMA`).
* **LR overrides** (``lr_overrides``, e.g. for a discriminator) are, like ``lr``, values at
  ``lr_reference_batch`` and are scaled the same way. ``max_grad_norm`` defaults to 1.0;
  ``lr_warmup_steps`` (default 0) adds a linear warm-up. ``lr_schedule`` is ``"constant"``
  (the paper's recipes: sec. 4 gives one learning rate per stage), or ``"linear"`` /
  ``"cosine"`` decay to 0 at ``steps`` (diffusers' schedulers). The lr each step used is
  logged as ``lr/<trainable>``.
* **Logged losses** are means over the global batch (all micro-batches and processes).
* **NaN guard.** A non-finite loss term (checked before ``backward``) or gradient norm
  (checked before the optimizer step; not under fp16, whose loss scaler skips such steps)
  stops every process with a :class:`SnapgenError` naming the step and the term; nothing is
  saved, so the latest checkpoint is the last good state.
* **FSDP** (``fsdp=true``; a no-op on one process): instead of accelerate's DDP wrapper, each
  trainable is sharded with torch's FSDP2 (``fully_shard``: parameters become DTensors, one FSDP
  unit per trainable) over whatever process group accelerate set up (gloo on CPU, NCCL on GPU),
  and its AdamW is built over the shards, so weights, gradients, optimizer state and the EMA
  are 1/P per process. Accumulated gradients stay unsharded until the last micro-batch (as
  DDP's ``no_sync``); the clipping norm is the global one; every phase ends with the modules
  resharded, so ``requires_grad`` toggles and updates reach the next forward. Checkpoints,
  ``model/`` and the EMA dir gather full tensors (every process takes part; the main process
  keeps them on its CPU): the checkpoint format is the same, and a checkpoint resumes with or
  without FSDP on any number of processes. Sample grids run the sharded forward on every
  process. A trainable's forward gathers all of it (one unit: the saving is in gradients,
  optimizer state and EMA, not in the peak of the weights). fp16 is refused (its loss scaler
  is not shard-aware; use bf16). On GPUs: ``accelerate launch --multi_gpu --num_processes N
  -m snapgen_cli <stage> ... --fsdp``. Tested on CPU only (gloo, 2 processes): losses,
  weights, EMA, checkpoints and sample grids equal DDP's and one process's to float32
  rounding (~1e-7), with and without gradient accumulation, and checkpoints resume across
  FSDP and one process; NCCL is untested here.
* **Speed on a GPU** (issue 17; ``core/speed.py``): ``compile`` compiles every trainable in place
  (``torch.compile``, default mode, kernels cached in ``~/.cache/snapgen/inductor``; default off:
  a short run would spend its time compiling); AdamW is fused on CPU and CUDA (:func:`_adamw`);
  ``mixed_precision="bf16"`` is bf16 autocast. On CUDA the progress line and the summary give the
  model FLOPs utilisation (MFU): the task's MACs of one forward per sample
  (:meth:`TrainTask.forward_macs`) x 2 x 3 (+1 forward with gradient checkpointing) x samples/s
  per process (one GPU each) over the GPU's dense bf16 peak; the summary's ``samples_per_s_steady``
  (and its MFU) leaves out the first step, which holds compilation and warm-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import StageSettings
from ..core.speed import compile_module, mfu, mfu_report, peak_bf16_flops
from ..cpu import describe_threads
from ..data.shards import sha256_file
from ..errors import ConfigError, SnapgenError
from ..files import _UMASK, atomic_write_json

CHECKPOINTS = "checkpoints"


class LoopConfig(StageSettings):
    """Settings of the shared training loop; defaults are the paper's (sec. 4, sup. G)."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = Field(32, description="samples per process per micro-batch")
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = Field(5e-5, description="learning rate at a global batch of lr_reference_batch")
    lr_reference_batch: PositiveInt = 1024
    scale_lr: bool = Field(True, description="scale lr linearly with the global batch (paper)")
    lr_overrides: dict[str, PositiveFloat] = Field(default_factory=dict,
                                                   description="per-trainable lr at the reference batch")
    lr_warmup_steps: NonNegativeInt = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="constant (paper) or linear/cosine decay to 0 at `steps`")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: PositiveFloat | None = 1.0
    ema_decay: float = Field(0.999, ge=0, le=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt | None = 3
    sample_every: NonNegativeInt = Field(0, description="steps between sample grids; 0: none")
    log_every: PositiveInt = 10
    seed: NonNegativeInt | None = Field(None, description="seed of initialisation, data order and noise "
                                                          "(default: the recipe's run seed; 0 standalone)")
    tracker: str = Field("tensorboard", description='"tensorboard", "none" or another accelerate tracker '
                                                    '(wandb, mlflow, comet_ml, aim, clearml, dvclive, ...)')
    num_workers: NonNegativeInt | None = Field(None, description="DataLoader worker processes "
                                                                "(default: 0 on CPU, else up to 4)")
    shuffle_window_shards: NonNegativeInt = Field(64, description="shards whose samples are shuffled together "
                                                                  "(after shuffling the shards); 0: all")
    fsdp: bool = Field(False, description="shard each trainable, its gradients and optimizer state across the "
                                          "processes (torch FSDP2) instead of DDP; no-op on one process")
    compile: bool = Field(False, description="torch.compile the trainables (pays off on long GPU runs; the first "
                                             "step compiles)")

    @field_validator("tracker")
    @classmethod
    def _known_tracker(cls, v: str) -> str:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        if v != "none" and v not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"expected \"none\" or one of accelerate's trackers: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        return v


# ----------------------------------------------------------------------------------------
# What a stage provides.


@dataclass
class StepContext:
    """What :meth:`TrainTask.loss` gets besides the batch.

    ``step``: the optimizer step being computed (from 1); ``micro``: the micro-batch index
    within it; ``models``: the trainables as prepared (DDP-wrapped, or FSDP-sharded with
    ``fsdp``; call these, i.e. their ``forward``, in ``loss``) plus the frozen models;
    ``generators``: one per sample of this process's micro-batch, seeded by ``(seed, step,
    global slot)`` -- draw all randomness from them.
    """

    step: int
    micro: int
    models: dict[str, nn.Module]
    generators: list[torch.Generator]
    accelerator: Accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-sample standard normal noise of shape (B, *shape) on the device."""
        return randn_tensor((len(self.generators), *shape), generator=self.generators, device=self.device, dtype=dtype)


class TrainTask:
    """What a training stage plugs into :func:`train`. Override :meth:`trainables`,
    :meth:`dataset` and :meth:`loss`; the rest have defaults."""

    #: Name of the trainable that gets EMA and is saved as ``model`` / ``model_ema``;
    #: ``None``: the first one.
    main: str | None = None
    #: Sub-directory of the output dir that gets the main trainable's EMA weights.
    ema_dir: str = "model_ema"

    def trainables(self) -> dict[str, nn.Module]:
        """Modules to train, each with its own AdamW (called once; return the task's own modules)."""
        raise NotImplementedError

    def phases(self) -> dict[str, tuple[str, ...]] | None:
        """Phase name -> the trainables it updates, run in order on every micro-batch.
        ``None``: one phase, ``"main"``, updating every trainable."""
        return None

    def frozen(self) -> dict[str, nn.Module]:
        """Models used but not trained (teacher, encoders): moved to the device, eval, no grad."""
        return {}

    def dataset(self) -> Dataset:
        """A map-style dataset; items go through :meth:`collate`."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def loss(self, phase: str, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """The scalar loss of ``phase`` on this process's micro-batch, and named terms to log."""
        raise NotImplementedError

    def sample_grid(self, model: nn.Module, step: int):  # -> PIL.Image.Image | None
        """An image of samples from ``model`` (the main model, EMA weights); ``None``: skip."""
        return None

    def forward_macs(self) -> int | None:
        """MACs of one forward pass of the main trainable for one training sample
        (``core.measure.count_macs`` on the meta device), for the MFU reported on CUDA; ``None``:
        no MFU. Asked once per run, on CUDA only."""
        return None


# ----------------------------------------------------------------------------------------
# Deterministic data order and per-sample seeds.


def _seed(*ints: int) -> int:
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0])


def sample_generators(seed: int, step: int, slots: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by ``(seed, step, global slot)``."""
    return [torch.Generator().manual_seed(_seed(seed, step, s)) for s in slots]


def shard_ranges(dataset: Dataset) -> list[range]:
    """The dataset's shards as index ranges (``dataset.shard_ranges()``), else one shard."""
    ranges = dataset.shard_ranges() if callable(getattr(dataset, "shard_ranges", None)) else [range(len(dataset))]
    ranges = [r for r in ranges if len(r)]
    starts = [0] + [r.stop for r in ranges[:-1]]
    if any(r.start != a or r.step != 1 for r, a in zip(ranges, starts)) or sum(map(len, ranges)) != len(dataset):
        raise SnapgenError(f"{type(dataset).__name__}.shard_ranges() must cut [0, {len(dataset)}) into consecutive "
                           f"ranges, got {ranges[:3]}...")
    return ranges


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's micro-batches of dataset indices, from step ``start_step + 1`` on.

    The data stream is the concatenation of per-epoch orders. Epoch ``e``: the shards
    (``shards``: consecutive index ranges covering the dataset) in a random order seeded by
    ``(seed, e)``, cut into windows of ``window`` shards (0: one window); window ``w``'s samples,
    taken in index order, permuted by a generator seeded ``(seed, e, w)`` -- or ``(seed, e)``
    when the epoch is one window, which makes that case the plain per-epoch permutation.
    Step ``k`` (from 1) consumes stream positions ``[(k-1) G, k G)`` with
    ``G = batch_size * num_processes * grad_accum``; micro-batch ``m`` of process ``r`` takes
    the global slots ``(m * P + r) * B + [0, B)`` of it. Memory: one window's order.
    """

    def __init__(self, shards: Sequence[range], batch_size: int, num_processes: int, rank: int, grad_accum: int,
                 seed: int, start_step: int, steps: int, window: int = 0):
        self.shards = list(shards)
        self.n = sum(map(len, self.shards))
        if self.n < 1:
            raise SnapgenError("the training data set is empty")
        self.b, self.p, self.r, self.a = batch_size, num_processes, rank, grad_accum
        self.seed, self.start_step, self.steps = seed, start_step, steps
        self.window = window if 0 < window < len(self.shards) else len(self.shards)
        self._epoch: tuple[int, list[list[int]], np.ndarray] | None = None  # epoch, windows, their ends
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None  # (epoch, window), its indices

    @property
    def global_batch(self) -> int:
        return self.b * self.p * self.a

    def slots(self, micro: int) -> range:
        first = (micro * self.p + self.r) * self.b
        return range(first, first + self.b)

    def _windows(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            if self.window == len(self.shards):
                windows = [list(range(len(self.shards)))]
            else:
                gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
                order = torch.randperm(len(self.shards), generator=gen)
                windows = [order[i:i + self.window].tolist() for i in range(0, len(order), self.window)]
            ends = np.cumsum([sum(len(self.shards[s]) for s in w) for w in windows])
            self._epoch = (epoch, windows, ends)
        return self._epoch[1], self._epoch[2]

    def _index(self, position: int) -> int:
        epoch, q = divmod(position, self.n)
        windows, ends = self._windows(epoch)
        w = int(np.searchsorted(ends, q, side="right"))
        if self._order is None or self._order[0] != (epoch, w):
            seed = _seed(self.seed, epoch) if len(windows) == 1 else _seed(self.seed, epoch, w)
            members = torch.cat([torch.arange(self.shards[s].start, self.shards[s].stop) for s in sorted(windows[w])])
            perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))
            self._order = ((epoch, w), members[perm])
        return int(self._order[1][q - (int(ends[w - 1]) if w else 0)])

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step + 1, self.steps + 1):
            base = (step - 1) * self.global_batch
            for m in range(self.a):
                yield [self._index(base + s) for s in self.slots(m)]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.a


def _workers(cfg: LoopConfig, device: torch.device) -> int:
    """``cfg.num_workers``, or the default of the module docstring."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if device.type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def _batches(loader: DataLoader) -> Iterator[Any]:
    """``loader``'s batches; a worker's SnapgenError (which DataLoader re-raises with the
    worker's traceback in the message) is raised again as its own one-line message."""
    try:
        yield from loader
    except SnapgenError as e:
        lines = str(e).rstrip().splitlines()
        if len(lines) < 2 or not lines[0].startswith("Caught "):
            raise
        raise type(e)(lines[-1].split(": ", 1)[-1]) from None


# ----------------------------------------------------------------------------------------
# Checkpoints and saved models.


@dataclass
class _LoopState:
    """The loop's own resumable state (``checkpoint.json``'s ``loop``): steps done."""

    step: int = 0


def _adamw(params: list[torch.Tensor], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CPU and CUDA: 3.5x faster than the
    per-tensor loop torch picks by default on CPU. Other devices keep torch's default. FSDP's
    parameters are DTensors, which the fused kernel takes too."""
    fused = all(type(p) in (torch.nn.Parameter, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (``.tmp`` dirs are never complete)."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "snapgen-checkpoint", 1
CHECKPOINT_MANIFEST = "checkpoint.json"
#: Files of ``accelerator.save_state`` (snapgen before checkpoint format 1): pickles, never read.
_ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")


class CorruptCheckpoint(SnapgenError):
    """A checkpoint file that is missing, does not parse, or does not match its sha256."""


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Path], Any]) -> dict[str, Any]:
    """The one writer of checkpoint files: ``write(path)``, fsync, then its size and sha256
    (read back, as the resume check will)."""
    write(path)
    os.chmod(path, 0o666 & ~_UMASK)  # safetensors creates files 0600
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the later names of tensors sharing storage (tied weights): safetensors
    stores each tensor once, and loading the first name fills the others."""
    seen, out = set(), {}
    for k, v in state.items():
        t = v.to_local() if isinstance(v, DTensor) else v  # this process's shard
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def _full_tensors(tensors: Mapping[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """``tensors`` with each FSDP shard (DTensor) gathered into its full tensor on the CPU, one at a
    time, kept only where ``keep`` (else ``{}``). A collective: every process calls it, same keys."""
    out = {}
    for k, v in tensors.items():
        if isinstance(v, DTensor):
            v = v.full_tensor().to("cpu", copy=True)  # a compact copy: uneven shards gather into padding
        if keep:
            out[k] = v
    return out


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a checkpoint's tensor) as this process's shard of ``like`` if that is a DTensor."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _reshard(*modules: nn.Module) -> None:
    """Register the sharded parameters of FSDP modules again: a root module keeps its gathered
    ones after a forward that no backward follows, and would hide updates and ``requires_grad``."""
    for m in modules:
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def _full_module(module: nn.Module, keep: bool) -> Iterator[nn.Module]:
    """``module`` for saving: an FSDP one answers ``state_dict()`` with its full tensors (gathered by
    every process, which all enter this; kept where ``keep``) and shows its own class, whose name
    ``save_pretrained`` records. Other modules as they are."""
    if not isinstance(module, FSDPModule):
        yield module
        return
    full, cls = _full_tensors(module.state_dict(), keep), type(module)
    handle = module._register_state_dict_hook(lambda *_: full)  # returning a dict replaces the state dict
    module.__class__ = cls.__mro__[cls._orig_cls_mro_index]
    try:
        yield module
    finally:
        module.__class__ = cls
        handle.remove()


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CorruptCheckpoint(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``(manifest, tensors by file name)`` of checkpoint ``path``, each file checked against
    its recorded size and sha256 and parsed as JSON / safetensors (never unpickled).

    Raises :class:`CorruptCheckpoint` for a missing, unparsable or mismatching file and
    :class:`ConfigError` for a checkpoint of another format or version."""
    manifest_path = path / CHECKPOINT_MANIFEST
    fix = f"train into a new --out, or move {path.parent} away to start over"
    if not manifest_path.is_file():
        if any((path / name).exists() for name in _ACCELERATE_FILES):
            raise ConfigError(f"{path}: a checkpoint of an older snapgen (accelerate's pickled save_state), not "
                              f"loaded since unpickling can run code; {fix}")
        raise CorruptCheckpoint(f"{manifest_path}: missing")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (ValueError, OSError) as e:
        raise CorruptCheckpoint(f"{manifest_path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(f"{manifest_path}: not a checkpoint manifest (a JSON {type(manifest).__name__})")
    if (manifest.get("format"), manifest.get("version")) != (CHECKPOINT_FORMAT, CHECKPOINT_VERSION):
        raise ConfigError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"this snapgen reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}; {fix}")
    tensors = {}
    try:
        for name, rec in manifest["files"].items():
            file = path / name
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise CorruptCheckpoint(f"{manifest_path}: lists {name!r}, not a checkpoint file name")
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise CorruptCheckpoint(f"{file}: missing") from None
            if size != rec["bytes"]:
                raise CorruptCheckpoint(f"{file}: {size} bytes, {CHECKPOINT_MANIFEST} says {rec['bytes']}")
            if (got := sha256_file(file)) != rec["sha256"]:
                raise CorruptCheckpoint(f"{file}: checksum mismatch (sha256 {got[:12]}..., {CHECKPOINT_MANIFEST} "
                                        f"says {str(rec['sha256'])[:12]}...)")
            tensors[name] = _load_tensors(file)
        for key in ("loop", "trainables", "main", "optimizers", "schedulers", "ema", "scaler"):
            manifest[key]  # noqa: B018 - present, else malformed
    except (KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{manifest_path}: malformed ({type(e).__name__}: {e})") from None
    return manifest, tensors


def save_module(module: nn.Module, path: Path) -> None:
    """``save_pretrained`` for diffusers models, else ``model.safetensors``; written to a
    ``.tmp`` dir and renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(module, ModelMixin):
        module.save_pretrained(tmp, safe_serialization=True)
    else:
        tmp.mkdir(parents=True)
        save_model(module, str(tmp / "model.safetensors"))
    _replace_dir(tmp, path)


class LerpEMA(EMAModel):
    """diffusers' ``EMAModel`` whose ``foreach`` update is one ``torch._foreach_lerp_``:
    ``s + w * (p - s)`` with ``w = 1 - decay``, the same numbers as diffusers'
    ``s - w * (s - p)`` (the negations are exact; ``tests/test_loop.py`` checks bitwise
    equality), in one pass over the weights instead of two and a temporary copy of them: 2.5x
    faster on a CPU (1.3 ms against 3.3 ms a step for the demo's 2.6M-parameter UNet), every
    training step. ``lerp`` computes ``w >= 0.5`` the other way round (``p - (1 - w) * (p - s)``,
    other rounding), so those steps (the first few of the warm-up), and anything else (no
    ``foreach``, frozen parameters, which diffusers copies) are diffusers' own step."""

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        decay = self.get_decay(self.optimization_step + 1)
        weight = 1 - decay  # diffusers' one_minus_decay
        if weight >= 0.5 or not self.foreach or not all(p.requires_grad for p in parameters):
            return super().step(parameters)
        self.optimization_step += 1
        self.cur_decay_value = decay
        torch._foreach_lerp_(self.shadow_params, parameters, weight)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` without its multiply of every gradient by 1.0 when the norm
    (``norm``, else computed here) is within ``max_norm``: torch scales by
    ``min(max_norm / (norm + 1e-6), 1)``, so a coefficient of 1 or more leaves the gradients as they
    are, and skipping it is exact (a pass over the gradients saved: 1.3 ms a step for the demo's UNet
    on a CPU, and most fine-tune steps do not clip). On an accelerator the comparison reads the norm
    on the host, as the loop's NaN guard (``_Run._guard``) does right after it anyway."""
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm / (norm + 1e-6) < 1:  # torch.nn.utils.clip_grads_with_norm_'s coefficient
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextlib.contextmanager
def ema_weights(ema: EMAModel, model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its EMA weights swapped in, restored on exit."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def _tracker_config(cfg: LoopConfig) -> dict[str, Any]:
    """Flat scalar hyper-parameters (what TensorBoard's hparams accept)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.model_dump().items()}


# ----------------------------------------------------------------------------------------
# The loop.


def process_state() -> PartialState:
    """This process's place in a launch (``accelerate launch``, ``torchrun``) as :func:`train` sees it.

    ``PartialState`` is one state per process, fixed by whichever call comes first. On a machine
    without an accelerator, ``PartialState()`` (no ``cpu=True``) takes a launch of P processes for
    P independent single processes, and :func:`train`'s ``Accelerator(cpu=True)`` then inherits
    that: each process trained alone on its own slice, at 1/P of the global batch and lr, and all
    wrote the same outputs. So every stage asks through here, with :func:`train`'s ``cpu`` flag.
    """
    return PartialState(cpu=not torch.accelerator.is_available())


def train(task: TrainTask, cfg: LoopConfig, out_dir: str | Path, resume: Literal["auto"] | str | Path | None = "auto",
          console: Console | None = None) -> dict[str, Any]:
    """Train ``task`` with ``cfg`` into ``out_dir``; return (and write) a JSON-able summary.

    ``resume``: ``"auto"`` continues from the newest intact checkpoint in
    ``out_dir/checkpoints`` (skipping corrupt newer ones with a warning; starting fresh if there
    is none), a checkpoint path resumes from that checkpoint, another run's output dir from its
    newest intact checkpoint (a recipe continuing an earlier stage: the demo's teacher), ``None``
    starts fresh (and refuses to mix with an earlier run's checkpoints).
    Writes ``model/`` (raw), ``model_ema/`` (``task.ema_dir``), one dir per other trainable, ``losses.jsonl``,
    ``logs/`` (trackers), ``samples/step_*.png``, ``checkpoints/`` and ``train_summary.json``.
    """
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "logs")),
        step_scheduler_with_optimizer=False,
    )
    try:
        return _Run(task, cfg, Path(out_dir), accelerator, console or Console(file=sys.stderr)).run(resume)
    finally:
        # Not ``end_training()``: it destroys the process group, and a recipe may run further
        # stages in this process. Those may pick another mixed precision, hence the reset.
        for tracker in accelerator.trackers:
            tracker.finish()
        AcceleratorState._reset_state(reset_partial_state=False)


class _Run:
    """One call of :func:`train`: set-up, the step loop, checkpoints and outputs."""

    def __init__(self, task: TrainTask, cfg: LoopConfig, out_dir: Path, accelerator: Accelerator, console: Console):
        cfg = cfg if cfg.seed is not None else cfg.model_copy(update={"seed": 0})
        self.task, self.cfg, self.out_dir, self.acc, self.console = task, cfg, out_dir, accelerator, console
        self.state = _LoopState()
        self.losses_path = out_dir / "losses.jsonl"

    # -- set-up ------------------------------------------------------------------------

    def _build(self) -> None:
        task, cfg, acc = self.task, self.cfg, self.acc
        set_seed(cfg.seed)
        trainables = task.trainables()
        if not trainables:
            raise SnapgenError(f"{type(task).__name__}.trainables() returned no modules")
        self.main = task.main or next(iter(trainables))
        if self.main not in trainables:
            raise SnapgenError(f"main trainable {self.main!r} is not one of {', '.join(trainables)}")
        self.phases = task.phases() or {"main": tuple(trainables)}
        for phase, names in self.phases.items():
            unknown = set(names) - set(trainables)
            if unknown:
                raise SnapgenError(f"phase {phase!r} names unknown trainables {sorted(unknown)}")
        self._enable_checkpointing(trainables)
        if cfg.compile:
            for m in trainables.values():
                compile_module(m)

        self.global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
        scale = self.global_batch / cfg.lr_reference_batch if cfg.scale_lr else 1.0
        unknown = set(cfg.lr_overrides) - set(trainables)
        if unknown:
            raise ConfigError(f"lr_overrides: unknown trainables {sorted(unknown)}; "
                              f"choose from {', '.join(trainables)}")
        self.lrs = {name: cfg.lr_overrides.get(name, cfg.lr) * scale for name in trainables}
        for m in trainables.values():
            m.train()
        self.sharded = cfg.fsdp and acc.num_processes > 1
        if self.sharded:
            if cfg.mixed_precision == "fp16":
                raise ConfigError("fsdp: fp16's loss scaler would skip steps per process on sharded gradients; "
                                  "use mixed_precision='bf16' or 'no'")
            mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
            for m in trainables.values():  # before the optimizers, which take the sharded parameters
                fully_shard(m.to(acc.device), mesh=mesh)
        optimizers = {name: _adamw([p for p in m.parameters() if p.requires_grad], lr=self.lrs[name],
                                   betas=cfg.betas, weight_decay=cfg.weight_decay)
                      for name, m in trainables.items()}
        schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
        schedulers = {name: get_scheduler(schedule, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.steps)
                      for name, opt in optimizers.items()}

        names = list(trainables)
        wrap = [] if self.sharded else list(trainables.values())  # accelerate would wrap them in DDP
        prepared = acc.prepare(*wrap, *optimizers.values(), *schedulers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        k, n = len(wrap), len(names)
        self.models = dict(zip(names, prepared[:k])) if wrap else dict(trainables)
        self.optimizers = dict(zip(names, prepared[k:k + n]))
        self.schedulers = dict(zip(names, prepared[k + n:]))
        self.lr_used = {n: opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()}  # logged per step
        # Read back from the optimizers: wrappers such as FSDP may have replaced the parameters.
        self.params = {n: [p for g in opt.param_groups for p in g["params"]] for n, opt in self.optimizers.items()}
        self.frozen = {name: m.to(acc.device).eval().requires_grad_(False) for name, m in task.frozen().items()}

        self.modules = {n: acc.unwrap_model(m) for n, m in self.models.items()}
        self.main_module = self.modules[self.main]
        # DTensors have no _foreach_copy_ (EMA's copy_to / restore)
        self.ema = LerpEMA(self.main_module.parameters(), decay=cfg.ema_decay, foreach=not self.sharded)

    def _enable_checkpointing(self, trainables: dict[str, nn.Module]) -> None:
        if not self.cfg.gradient_checkpointing:
            return
        for name, m in trainables.items():
            if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing:
                m.enable_gradient_checkpointing()
            elif name == self.main:
                raise ConfigError(f"gradient_checkpointing: {type(m).__name__} does not support it; set it to false")

    def _resume(self, resume: str | Path | None) -> Path | None:
        ckpts = complete_checkpoints(self.out_dir)
        if resume is None:
            if ckpts:
                raise ConfigError(f"{self.out_dir}: holds checkpoints of an earlier run; resume with resume='auto' "
                                  "or choose an empty output directory")
            return None
        if resume == "auto":
            path, (manifest, tensors) = self._newest_intact(ckpts)
            if path is None:
                return None
        elif (Path(resume) / CHECKPOINTS).is_dir():  # another run's output dir: its newest intact checkpoint
            path, (manifest, tensors) = self._newest_intact(complete_checkpoints(Path(resume)))
            if path is None:
                raise ConfigError(f"resume: {resume} holds no complete checkpoint (in {CHECKPOINTS}/)")
        else:
            path = Path(resume)
            if not path.is_dir() or path.name.endswith(".tmp") or not (
                    (path / CHECKPOINT_MANIFEST).exists() or any((path / f).exists() for f in _ACCELERATE_FILES)):
                example = self.out_dir / CHECKPOINTS / checkpoint_name(self.cfg.checkpoint_every)
                raise ConfigError(f"resume: {str(path)!r} is not a complete checkpoint directory (no "
                                  f"{CHECKPOINT_MANIFEST}; e.g. {example}), or pass resume='auto'")
            try:
                manifest, tensors = read_checkpoint(path)
            except CorruptCheckpoint as e:
                raise CorruptCheckpoint(f"{e}; checkpoint {path.name} is corrupt: resume from another one "
                                        "(resume='auto' takes the newest intact one)") from None
        self._load_checkpoint(path, manifest, tensors)
        if self.state.step > self.cfg.steps:
            raise ConfigError(f"steps: checkpoint {path} is at step {self.state.step}, past steps={self.cfg.steps}")
        return path

    def _newest_intact(self, ckpts: list[Path]) -> tuple[Path | None, tuple[dict, dict]]:
        """The newest intact checkpoint and its contents, warning about the newer ones that are not."""
        problems = []
        for path in reversed(ckpts):
            try:
                found = read_checkpoint(path)
            except CorruptCheckpoint as e:
                problems.append(f"{path.name} is not intact ({e})")
                continue
            if problems and self.acc.is_main_process:
                self.console.print(f"warning: {'; '.join(problems)}; resuming from {path.name}, the newest intact "
                                   "checkpoint", markup=False, highlight=False, soft_wrap=True)
            return path, found
        if problems:
            raise SnapgenError(f"{self.out_dir / CHECKPOINTS}: no intact checkpoint ({'; '.join(problems)}); move "
                               "the folder away to start over, or restore one")
        return None, ({}, {})

    # -- checkpoints ---------------------------------------------------------------------

    def _param_names(self, name: str) -> list[str]:
        """Names of trainable ``name``'s optimizer parameters, in the optimizer's order."""
        names = {id(p): k for k, p in self.modules[name].named_parameters()}
        return [names.get(id(p), str(i)) for i, p in enumerate(self.params[name])]

    def _checkpoint_state(self, step: int) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """What the checkpoint of ``step`` holds: the manifest's JSON state and each file's tensors, full
        ones; every process calls it (FSDP shards are gathered), the tensors are the main process's."""
        files, optimizers, keep = {}, {}, self.acc.is_main_process
        for n in self.models:
            files[f"weights.{n}.safetensors"] = _full_tensors(_unique_tensors(self.modules[n].state_dict()), keep)
            state = self.optimizers[n].state_dict()
            names = self._param_names(n)
            tensors, other = {}, {}
            for i, per_param in state["state"].items():
                for k, v in per_param.items():
                    if torch.is_tensor(v):
                        tensors[f"{names[i]}/{k}"] = v
                    else:
                        other.setdefault(names[i], {})[k] = v
            files[f"optimizer.{n}.safetensors"] = _full_tensors(tensors, keep)
            optimizers[n] = {"params": [[k, list(p.shape)] for k, p in zip(names, self.params[n])],
                             "param_groups": state["param_groups"], "state": other}
        ema_names = [k for k, _ in self.main_module.named_parameters()]
        files["ema.safetensors"] = _full_tensors(dict(zip(ema_names, self.ema.shadow_params)), keep)
        ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "loop": {"step": step},
                    "trainables": list(self.models), "main": self.main, "optimizers": optimizers,
                    "schedulers": {n: sch.state_dict() for n, sch in self.schedulers.items()}, "ema": ema,
                    "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None}
        return manifest, files

    def _load_checkpoint(self, path: Path, manifest: dict[str, Any], files: dict[str, dict[str, torch.Tensor]]) -> None:
        """Check that checkpoint ``path`` is of this run's model, then load it (every process)."""
        fix = f"train into a new --out, or move {path.parent} away to start over"
        if manifest["trainables"] != list(self.models) or manifest["main"] != self.main:
            raise ConfigError(f"resume: {path} is a checkpoint of other trainables ({', '.join(manifest['trainables'])}"
                              f"; this run trains {', '.join(self.models)}); {fix}")

        def same(what: str, saved: Mapping[str, Sequence[int]], live: Mapping[str, Sequence[int]]) -> None:
            for k in [*live, *(k for k in saved if k not in live)]:
                a, b = saved.get(k), live.get(k)
                if a is None or b is None or list(a) != list(b):
                    there = "missing" if a is None else f"of shape {list(a)}"
                    here = "missing" if b is None else f"of shape {list(b)}"
                    raise ConfigError(f"resume: {path} is a checkpoint of another model ({what} tensor {k!r}: {there} "
                                      f"there, {here} in this run); {fix}")

        try:
            for n, module in self.modules.items():
                weights = files[f"weights.{n}.safetensors"]
                same(f"trainable {n!r}", {k: v.shape for k, v in weights.items()},
                     {k: v.shape for k, v in _unique_tensors(module.state_dict()).items()})
                opt = manifest["optimizers"][n]
                same(f"{n!r} optimizer", dict(opt["params"]), dict(zip(self._param_names(n),
                                                                          (p.shape for p in self.params[n]))))
            ema = files["ema.safetensors"]
            for n in self.models:
                names = set(self._param_names(n))
                if bad := [k for k in files[f"optimizer.{n}.safetensors"] if k.rpartition("/")[0] not in names]:
                    raise KeyError(f"optimizer.{n}.safetensors: {bad[0]}")
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpoint(f"{path / CHECKPOINT_MANIFEST}: malformed ({type(e).__name__}: {e})") from None
        same("EMA", {k: v.shape for k, v in ema.items()}, {k: p.shape for k, p in self.main_module.named_parameters()})
        self._same_hyperparameters(path, manifest)

        for n, module in self.modules.items():
            live = module.state_dict()
            module.load_state_dict({k: _shard_like(v, live[k]) for k, v in files[f"weights.{n}.safetensors"].items()},
                                   strict=False)  # shared names are filled too
            opt, names = manifest["optimizers"][n], self._param_names(n)
            tensors = files[f"optimizer.{n}.safetensors"]
            live_groups = self.optimizers[n].param_groups
            groups = [{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in g.items()}
                      for g, live in zip(opt["param_groups"], live_groups)]
            state: dict[int, dict[str, Any]] = {}
            for key, v in tensors.items():
                pname, _, field = key.rpartition("/")
                p = self.params[n][i := names.index(pname)]
                state.setdefault(i, {})[field] = _shard_like(v, p) if v.shape == p.shape else v  # not AdamW's step
            for pname, extra in opt["state"].items():
                state.setdefault(names.index(pname), {}).update(extra)
            self.optimizers[n].load_state_dict({"state": state, "param_groups": groups})
            self.schedulers[n].load_state_dict(manifest["schedulers"][n])
        self.ema.load_state_dict(manifest["ema"])
        with torch.no_grad():
            for shadow, (k, _) in zip(self.ema.shadow_params, self.main_module.named_parameters()):
                shadow.copy_(_shard_like(ema[k], shadow))
        if self.acc.scaler is not None and manifest["scaler"] is not None:
            self.acc.scaler.load_state_dict(manifest["scaler"])
        self.state.step = int(manifest["loop"]["step"])

    #: Optimizer settings a resumed run must share with its checkpoint (the saved ones would be used
    #: silently otherwise: a resumed optimizer takes its param groups from the checkpoint), by the
    #: name a recipe gives them. ``initial_lr`` is the base lr after ``lr_reference_batch`` scaling.
    RESUME_MUST_MATCH = {"initial_lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}

    def _same_hyperparameters(self, path: Path, manifest: dict[str, Any]) -> None:
        """Refuse a checkpoint whose optimizer ran with other settings than this run's (e.g. the demo's
        teacher, whose two stages repeat its settings: a lr changed in one of them only)."""
        for n, opt in manifest["optimizers"].items():
            for i, (saved, live) in enumerate(zip(opt["param_groups"], self.optimizers[n].param_groups, strict=False)):
                for key, name in self.RESUME_MUST_MATCH.items():
                    a, b = saved.get(key), live.get(key)
                    a, b = (list(v) if isinstance(v, (list, tuple)) else v for v in (a, b))
                    if a is not None and b is not None and a != b:
                        raise ConfigError(f"resume: {path} was trained with {name} {a} ({n!r} optimizer, param group "
                                          f"{i}), this run sets {b}; a resumed run continues the checkpoint's "
                                          f"training: set {name} as there, or train into a new --out without resume")

    def _prepare_out_dir(self) -> None:
        """Main process: drop half-written checkpoints and losses logged after the resume point."""
        if not self.acc.is_main_process:
            return
        (self.out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        for tmp in (self.out_dir / CHECKPOINTS).glob("*.tmp"):
            shutil.rmtree(tmp)
        kept = []
        if self.losses_path.exists():
            for line in self.losses_path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] <= self.state.step:
                        kept.append(line + "\n")
        self.losses_path.write_text("".join(kept))

    # -- the loop ------------------------------------------------------------------------

    def run(self, resume: str | Path | None) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        self._build()
        resumed_from = self._resume(resume)
        start = self.state.step
        self._prepare_out_dir()
        if cfg.tracker != "none":
            acc.init_trackers("snapgen", config=_tracker_config(cfg))

        dataset = self.task.dataset()
        sampler = GlobalBatchSampler(shard_ranges(dataset), cfg.batch_size, acc.num_processes, acc.process_index,
                                     cfg.grad_accum, cfg.seed, start, cfg.steps, window=cfg.shuffle_window_shards)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.task.collate,
                            num_workers=_workers(cfg, acc.device), pin_memory=acc.device.type == "cuda")
        batches = _batches(loader)
        cuda = acc.device.type == "cuda"
        self.forward_macs = self.task.forward_macs() if cuda else None
        peak = peak_bf16_flops(torch.cuda.get_device_name(acc.device)) if cuda else None
        t0, last, warm = time.perf_counter(), {}, None
        if acc.is_main_process and acc.device.type == "cpu":
            self.console.print(f"[dim]{describe_threads()}[/dim]")
        with self._progress() as progress:
            bar = progress.add_task("train", total=cfg.steps, completed=start, info="")
            for step in range(start + 1, cfg.steps + 1):
                last = self._step(step, batches, sampler)
                self.state.step = step
                now = time.perf_counter()
                rate = self.global_batch * (step - start) / (now - t0)
                warm = warm or now  # the end of the first step: compilation and warm-up are behind
                self._log(step, last)
                losses = "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith("loss"))
                per_gpu = rate / acc.num_processes
                use = (f"  MFU {mfu(self.forward_macs, per_gpu, peak, cfg.gradient_checkpointing):.1%}"
                       if self.forward_macs and peak else "")
                progress.update(bar, completed=step, info=f"{losses}  {rate:.1f} samples/s{use}")
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self._sample_grid(step)
                if step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(step)
        if cfg.steps % cfg.checkpoint_every and start < cfg.steps:
            self._save_checkpoint(cfg.steps)
        end = time.perf_counter()
        wall = end - t0
        rate = self.global_batch * (cfg.steps - start) / max(wall, 1e-9)
        steady = self.global_batch * (cfg.steps - start - 1) / (end - warm) if cfg.steps - start > 1 else rate
        return self._finish(resumed_from, last, wall, rate, steady)

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not self.acc.is_main_process, transient=False)

    def _step(self, step: int, batches: Iterator[Any], sampler: GlobalBatchSampler) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-batches, every phase on each."""
        acc, sums = self.acc, defaultdict(float)
        for micro in range(self.cfg.grad_accum):
            batch = next(batches)
            ctx = StepContext(step, micro, {**self.models, **self.frozen},
                              sample_generators(self.cfg.seed, step, sampler.slots(micro)), acc)
            with acc.accumulate(*self.models.values()):
                if self.sharded:  # accumulate's no_sync is DDP's; FSDP keeps unsharded gradients until the last
                    for m in self.models.values():
                        m.set_requires_gradient_sync(acc.sync_gradients)
                for phase, names in self.phases.items():
                    with self._only_trainable(names):
                        with acc.autocast():
                            loss, logs = self.task.loss(phase, batch, ctx)
                        terms = {self._key(phase, "loss"): loss.detach().float()}
                        terms |= {self._key(phase, k): torch.as_tensor(v).detach().float() for k, v in logs.items()}
                        self._guard(step, terms)
                        acc.backward(loss)
                    for k, v in terms.items():
                        sums[k] = sums[k] + v / self.cfg.grad_accum
                    if acc.sync_gradients:
                        sums |= self._update(step, phase, names)
        self.ema.step(self.main_module.parameters())
        keys = sorted(sums)
        means = acc.reduce(torch.stack([torch.as_tensor(sums[k], device=acc.device) for k in keys]), "mean")
        return dict(zip(keys, means.tolist()))

    def _update(self, step: int, phase: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        params = [p for n in names for p in self.params[n]]
        norm = self._clip(params, self.cfg.max_grad_norm or math.inf)
        norm = torch.as_tensor(norm).detach().float()
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if self.cfg.mixed_precision != "fp16":  # fp16's loss scaler skips overflowing steps itself
            self._guard(step, {self._key(phase, "grad_norm"): norm})
        for n in names:
            self.lr_used[n] = self.optimizers[n].param_groups[0]["lr"]
            self.optimizers[n].step()
            if not self.acc.optimizer_step_was_skipped:
                self.schedulers[n].step()
            self.optimizers[n].zero_grad(set_to_none=True)
        return {self._key(phase, "grad_norm"): norm}

    def _clip(self, params: list[nn.Parameter], max_norm: float):
        """accelerate's ``clip_grad_norm_`` (gradients unscaled first under fp16) clipping as
        :func:`clip_grad_norm` does; sharded gradients keep accelerate's own path."""
        if self.sharded or not math.isfinite(max_norm):
            return self.acc.clip_grad_norm_(params, max_norm)
        return clip_grad_norm(params, max_norm, self.acc.clip_grad_norm_(params, math.inf))  # the norm alone

    def _key(self, phase: str, name: str) -> str:
        return name if len(self.phases) == 1 else f"{phase}/{name}"

    @contextlib.contextmanager
    def _only_trainable(self, names: tuple[str, ...]) -> Iterator[None]:
        """Freeze the trainables a phase does not update, for the duration of the phase."""
        others = [p for n, ps in self.params.items() if n not in names for p in ps]
        for p in others:
            p.requires_grad_(False)
        try:
            yield
        finally:
            _reshard(*self.models.values())
            for p in others:
                p.requires_grad_(True)

    def _guard(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Stop (on every process) before a non-finite loss or gradient touches the weights."""
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        flag = torch.tensor([float(bool(bad))], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, "sum")
        if flag.item() == 0:
            return
        ckpts = complete_checkpoints(self.out_dir)
        kept = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        what = (f"loss term {bad[0]!r} = {terms[bad[0]].flatten()[0].item()}" if bad
                else "a loss term on another process")
        raise SnapgenError(f"step {step}: non-finite {what}; training stopped, {kept} "
                           "(lower lr, set max_grad_norm, or use mixed_precision='no' / 'bf16')")

    # -- outputs -------------------------------------------------------------------------

    def _log(self, step: int, logs: dict[str, float]) -> None:
        lrs = {f"lr/{n}": lr for n, lr in self.lr_used.items()}
        if self.acc.is_main_process:
            with self.losses_path.open("a") as f:
                f.write(json.dumps({"step": step, **logs, **lrs}) + "\n")
        if self.cfg.tracker != "none" and step % self.cfg.log_every == 0:
            self.acc.log({**logs, **lrs}, step=step)

    def _sample_grid(self, step: int) -> None:
        if not (self.sharded or self.acc.is_main_process):  # a sharded model's forward takes every process
            return
        model = self.main_module
        with ema_weights(self.ema, model), torch.no_grad():
            model.eval()
            image = self.task.sample_grid(model, step)
            model.train()
            _reshard(model)  # the raw weights go back into the sharded parameters
        if image is not None and self.acc.is_main_process:
            (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            image.save(self.out_dir / "samples" / f"{checkpoint_name(step)}.png")

    def _save_checkpoint(self, step: int) -> None:
        """Main process: write ``step_N.tmp`` (module docstring: format, fsync), rename it to
        ``step_N``, prune old checkpoints."""
        acc = self.acc
        final = self.out_dir / CHECKPOINTS / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        manifest, files = self._checkpoint_state(step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            manifest["files"] = {name: _write_file(tmp / name, lambda f, t=tensors: save_file(
                {k: v.contiguous() for k, v in t.items()}, str(f))) for name, tensors in files.items()}
            data = (json.dumps(manifest, indent=1) + "\n").encode()
            _write_file(tmp / CHECKPOINT_MANIFEST, lambda f: f.write_bytes(data))
            _fsync(tmp, os.O_RDONLY | os.O_DIRECTORY)
            _replace_dir(tmp, final)
            _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            if self.cfg.keep_checkpoints:
                older = [p for p in complete_checkpoints(self.out_dir) if int(p.name[5:]) < step]
                for old in older[:max(0, len(older) - (self.cfg.keep_checkpoints - 1))]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()

    def _finish(self, resumed_from: Path | None, last: dict[str, float], wall: float, rate: float,
                steady: float) -> dict[str, Any]:
        acc = self.acc
        acc.wait_for_everyone()
        outputs = {}
        for name in self.models:
            outputs[name] = self.out_dir / ("model" if name == self.main else name)
        outputs["model_ema"] = self.out_dir / self.task.ema_dir
        ckpts = complete_checkpoints(self.out_dir)
        summary = {
            "steps": self.cfg.steps,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "num_processes": acc.num_processes,
            "fsdp": self.sharded,
            "global_batch": self.global_batch,
            "lr": self.lrs,
            "final_losses": last,
            "samples_per_s": rate,
            "threads": torch.get_num_threads(),  # torch's CPU threads while training (cpu.py)
            "wall_s": wall,
            "model": str(outputs[self.main]),
            "model_ema": str(outputs["model_ema"]),
            "trainables": {n: str(p) for n, p in outputs.items() if n != "model_ema"},
            "losses": str(self.losses_path),
            "checkpoint": str(ckpts[-1]) if ckpts else None,
        }
        if acc.device.type == "cuda":  # issue 17: throughput after the first step, and the MFU
            summary["samples_per_s_steady"] = steady
            summary["mfu"] = mfu_report(self.forward_macs, steady / acc.num_processes, acc.device,
                                        self.cfg.gradient_checkpointing)
        main = acc.is_main_process
        if main or self.sharded:  # sharded weights are gathered by every process
            for name, module in self.modules.items():
                with _full_module(module, main):
                    if main:
                        save_module(module, outputs[name])
            with ema_weights(self.ema, self.main_module) as model, _full_module(model, main):
                if main:
                    save_module(model, outputs["model_ema"])
        if self.cfg.sample_every and self.cfg.steps % self.cfg.sample_every:
            self._sample_grid(self.cfg.steps)
        if main:
            atomic_write_json(self.out_dir / "train_summary.json", summary)
        acc.wait_for_everyone()
        return summary


__all__ = ["GlobalBatchSampler", "LoopConfig", "StepContext", "TrainTask", "complete_checkpoints", "ema_weights",
           "process_state", "sample_generators", "save_module", "shard_ranges", "train"]
