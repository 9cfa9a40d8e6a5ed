"""The shared accelerate training loop: learning, exact resume after SIGKILL, 2-process DDP ==
1 process, NaN guard, atomic checkpoints, EMA, alternating GAN phases, deterministic data."""

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _loop_script import FlowTask, GanTask, ShardedTensors, ToyVelocity
from conftest import kill_after, launch_argv
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from snapgen_cli.errors import ConfigError, SnapgenError
from snapgen_cli.train.loop import (
    GlobalBatchSampler,
    LerpEMA,
    LoopConfig,
    StepContext,
    TrainTask,
    clip_grad_norm,
    complete_checkpoints,
    shard_ranges,
    train,
)

SCRIPT = Path(__file__).with_name("_loop_script.py")


def _cfg(**kw) -> LoopConfig:
    base = dict(steps=10, batch_size=4, lr=1e-2, lr_reference_batch=4, checkpoint_every=5, keep_checkpoints=None,
                tracker="none", shuffle_window_shards=2)  # the toy sets come in shards (_loop_script.ShardedTensors)
    return LoopConfig(**{**base, **kw})


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = list(path.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _assert_same_run(a: Path, b: Path, tol: float, outputs=("model", "model_ema")) -> None:
    la, lb = _losses(a), _losses(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (ra["step"], k)
    for sub in outputs:
        wa, wb = _weights(a / sub), _weights(b / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(SCRIPT.parents[1])}


def test_overfit_loss_falls_and_outputs_are_written(tmp_path):
    out = tmp_path / "run"
    summary = train(FlowTask(n=8), _cfg(steps=60, checkpoint_every=25, keep_checkpoints=2, sample_every=30,
                                        tracker="tensorboard", log_every=10), out)
    losses = [r["loss"] for r in _losses(out)]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    # Outputs: raw and EMA weights apart, loadable the diffusers way; EMA lags the raw weights.
    raw, ema = ToyVelocity.from_pretrained(out / "model"), ToyVelocity.from_pretrained(out / "model_ema")
    assert any(not torch.equal(p, q) for p, q in zip(raw.parameters(), ema.parameters()))
    assert summary["model"] == str(out / "model") and summary["model_ema"] == str(out / "model_ema")
    assert json.loads((out / "train_summary.json").read_text())["final_losses"]["loss"] == pytest.approx(losses[-1])
    # Checkpoints: 25, 50 and the final 60, pruned to the last 2; renames left no .tmp dirs.
    assert [p.name for p in complete_checkpoints(out)] == ["step_000050", "step_000060"]
    assert not list((out / "checkpoints").glob("*.tmp")) and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000030.png", "step_000060.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_lr_is_scaled_linearly_with_the_global_batch(tmp_path):
    cfg = _cfg(steps=1, lr=5e-5, lr_reference_batch=1024, batch_size=4, grad_accum=2,
               lr_overrides={"discriminator": 1e-4})
    summary = train(GanTask(), cfg, tmp_path)
    assert summary["global_batch"] == 8
    assert summary["lr"] == pytest.approx({"generator": 5e-5 * 8 / 1024, "discriminator": 1e-4 * 8 / 1024})


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_and_warmup_are_logged_per_step(tmp_path, schedule):
    cfg = _cfg(steps=8, lr=1e-2, lr_warmup_steps=2, lr_schedule=schedule)
    train(FlowTask(), cfg, tmp_path)
    lrs = [r["lr/model"] for r in _losses(tmp_path)]
    assert lrs[:3] == pytest.approx([0.0, 5e-3, 1e-2])  # linear warm-up over 2 steps, then the peak
    # steps 4-8 use the schedule's factor at s = 3..7; linear/cosine reach 0 at s = 8 (after the last step)
    expected = {"constant": [1e-2] * 5,
                "linear": [1e-2 * (8 - s) / 6 for s in range(3, 8)],
                "cosine": [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(3, 8)]}
    assert lrs[3:] == pytest.approx(expected[schedule])


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train(FlowTask(), _cfg(steps=15), ref)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(killed), "--steps", "15",
                             "--checkpoint-every", "5", "--step-delay", "0.3"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after(proc, killed / "checkpoints" / "step_000005", timeout=240)
    done = [p.name for p in complete_checkpoints(killed)]
    assert done and done[-1] in ("step_000005", "step_000010")
    assert not (killed / "model").exists()

    summary = train(FlowTask(), _cfg(steps=15), killed, resume="auto")
    assert summary["resumed_from"] == str(killed / "checkpoints" / done[-1])
    _assert_same_run(ref, killed, tol=1e-6)


def test_a_run_continues_from_another_runs_newest_checkpoint(tmp_path):
    """``resume=<another run's output dir>`` (the demo's teacher, trained in two stages): that run's
    newest intact checkpoint; the two runs together compute what one uninterrupted run does."""
    ref, first, second = tmp_path / "ref", tmp_path / "first", tmp_path / "second"
    train(FlowTask(), _cfg(steps=10), ref)
    train(FlowTask(), _cfg(steps=6), first)  # checkpoints at steps 5 and 6 (the last)
    summary = train(FlowTask(), _cfg(steps=10), second, resume=first)
    assert summary["resumed_from"] == str(first / "checkpoints" / "step_000006")
    assert [r["step"] for r in _losses(second)] == [7, 8, 9, 10]
    for ra, rb in zip(_losses(ref)[6:], _losses(second), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6, rel=1e-6), ra["step"]
    for sub in ("model", "model_ema"):
        wa, wb = _weights(ref / sub), _weights(second / sub)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^resume: .*empty holds no complete checkpoint \(in checkpoints/\)$"):
        train(FlowTask(), _cfg(steps=10), tmp_path / "third", resume=tmp_path / "empty")
    # the second run's settings must be the first's: a changed lr or betas is refused, naming both values
    with pytest.raises(ConfigError, match=r"^resume: .*step_000006 was trained with lr 0\.01 \('model' optimizer, "
                                          r"param group 0\), this run sets 0\.02; .*set lr as there"):
        train(FlowTask(), _cfg(steps=10, lr=2e-2), tmp_path / "fourth", resume=first)
    with pytest.raises(ConfigError, match=r"was trained with betas \[0\.9, 0\.999\].*sets \[0\.9, 0\.99\]"):
        train(FlowTask(), _cfg(steps=10, betas=(0.9, 0.99)), tmp_path / "fifth", resume=first)
    refused = tmp_path / "fourth" / "checkpoints"
    assert not refused.exists() or not list(refused.iterdir())  # nothing trained


def _launch(out: Path, *args: str) -> list[dict]:
    """Both toy tasks (into OUT/flow and OUT/gan) for 6 steps in 2 processes; their summaries."""
    res = subprocess.run([*launch_argv(), str(SCRIPT), "--task", "both", "--out", str(out), "--steps", "6", *args],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [(s["num_processes"], s["global_batch"]) for s in summaries] == [(2, 4), (2, 4)]
    return summaries


GAN_OUTPUTS = ("model", "model_ema", "discriminator")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """Both toy tasks, 6 steps of 1 process x batch 4 (flow with sample grids at steps 3 and 6), and
    the GAN task with the batch in 2 accumulated micro-batches (``gan_accum``)."""
    one = tmp_path_factory.mktemp("one")
    train(FlowTask(), _cfg(steps=6, batch_size=4, sample_every=3), one / "flow")
    train(GanTask(), _cfg(steps=6, batch_size=4), one / "gan")
    train(GanTask(), _cfg(steps=6, batch_size=2, grad_accum=2), one / "gan_accum")
    return one


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """The same global batch of 4 as :func:`one_process`: 2 processes x batch 2, DDP."""
    out = tmp_path_factory.mktemp("ddp")
    _launch(out, "--batch-size", "2")
    return out


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(one_process, ddp_run):
    """Flow task and the two-phase GAN task: 2 processes x batch 2 == 1 process x batch 4."""
    _assert_same_run(one_process / "flow", ddp_run / "flow", tol=1e-5)
    _assert_same_run(one_process / "gan", ddp_run / "gan", tol=1e-5, outputs=GAN_OUTPUTS)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """The global batch of 4 sharded: 2 processes x batch 1 x 2 accumulated micro-batches, FSDP."""
    out = tmp_path_factory.mktemp("fsdp")
    summaries = _launch(out, "--fsdp", "--batch-size", "1", "--grad-accum", "2", "--sample-every", "3")
    assert [s["fsdp"] for s in summaries] == [True, True]
    return out


def _same_checkpoint(a: Path, b: Path) -> None:
    """Checkpoints ``a`` and ``b`` hold the same files, tensor names, shapes and dtypes and the same
    manifest (up to the files' checksums)."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.glob("*.safetensors"):
        ta, tb = load_file(f), load_file(b / f.name)
        assert {k: (v.shape, v.dtype) for k, v in ta.items()} == {k: (v.shape, v.dtype) for k, v in tb.items()}, f.name
    ma, mb = (json.loads((c / "checkpoint.json").read_text()) for c in (a, b))
    assert {**ma, "files": None} == {**mb, "files": None}


def test_two_process_fsdp_equals_ddp_and_one_process(tmp_path, one_process, ddp_run, fsdp_run):
    """FSDP (sharded weights, gradients, AdamW state and EMA; gradient accumulation without a
    reduce-scatter per micro-batch) computes what DDP and one process compute, and saves full
    tensors: the same checkpoints, final and EMA models and sample grids."""
    # FSDP vs DDP: the same 2-process data, the gradients reduced in another order (reduce-scatter of
    # the 2 accumulated micro-batches vs all-reduce of one), and the EMA updated per tensor instead
    # of torch._foreach: the runs differ by float32 rounding, ~1e-7 here; 1e-6 catches anything more.
    _assert_same_run(ddp_run / "flow", fsdp_run / "flow", tol=1e-6)
    # FSDP vs 1 process x batch 4: the DDP test's tolerance (the batch mean is summed in another
    # order, and 6 AdamW steps at lr 1e-2 carry the rounding into the weights). The GAN's phases
    # alternate per micro-batch, so its generator is updated before the discriminator's last
    # micro-batch: accumulated, it equals 1 process accumulating the same way, not the whole batch.
    _assert_same_run(one_process / "flow", fsdp_run / "flow", tol=1e-5)
    _assert_same_run(one_process / "gan_accum", fsdp_run / "gan", tol=1e-5, outputs=GAN_OUTPUTS)
    for task, ref in (("flow", "flow"), ("gan", "gan_accum")):
        for step in ("step_000005", "step_000006"):
            _same_checkpoint(one_process / ref / "checkpoints" / step, fsdp_run / task / "checkpoints" / step)
    for sub in ("model", "model_ema"):  # saved as the plain model (FSDP's wrapper class is FSDPToyVelocity)
        config = (fsdp_run / "flow" / sub / "config.json").read_text()
        assert config == (one_process / "flow" / sub / "config.json").read_text()
        ToyVelocity.from_pretrained(fsdp_run / "flow" / sub)
    # Sample grids need every process for the sharded forward; the main one saves them (EMA weights).
    for png in ("step_000003.png", "step_000006.png"):
        a, b = (np.asarray(Image.open(r / "flow" / "samples" / png), dtype=np.int16) for r in (one_process, fsdp_run))
        assert np.abs(a - b).max() <= 1, png  # uint8 pixels of weights equal to 1e-5
    # With one process fsdp=true is a no-op: the plain run, to the bit.
    train(FlowTask(), _cfg(steps=6, batch_size=4, sample_every=3, fsdp=True), tmp_path / "flow")
    _assert_same_run(one_process / "flow", tmp_path / "flow", tol=0)


def _resumable(run: Path, to: Path) -> Path:
    """A copy of a 6-step ``run`` of both tasks as if killed after the checkpoint of step 5."""
    for task in ("flow", "gan"):
        shutil.copytree(run / task, to / task, ignore=shutil.ignore_patterns("model*", "discriminator", "samples",
                                                                           "step_000006", "train_summary.json"))
    return to


def test_checkpoints_resume_across_fsdp_and_one_process(tmp_path, one_process, fsdp_run):
    """A checkpoint holds full tensors whichever way it was written: FSDP's step 5 resumes in one
    process, and one process's step 5 resumes sharded over 2, both to the uninterrupted run."""
    sharded = _resumable(fsdp_run, tmp_path / "from_fsdp")  # written with 2 accumulated micro-batches
    for task, cfg in (("flow", _cfg(steps=6, batch_size=4)), ("gan", _cfg(steps=6, batch_size=2, grad_accum=2))):
        summary = train(FlowTask() if task == "flow" else GanTask(), cfg, sharded / task, resume="auto")
        assert summary["resumed_from"] == str(sharded / task / "checkpoints" / "step_000005")
    _assert_same_run(one_process / "flow", sharded / "flow", tol=1e-5)
    _assert_same_run(one_process / "gan_accum", sharded / "gan", tol=1e-5, outputs=GAN_OUTPUTS)
    plain = _resumable(one_process, tmp_path / "from_one")
    summaries = _launch(plain, "--fsdp", "--batch-size", "2", "--resume", "auto")
    assert [(s["fsdp"], s["resumed_from"]) for s in summaries] == [
        (True, str(plain / t / "checkpoints" / "step_000005")) for t in ("flow", "gan")]
    _assert_same_run(one_process / "flow", plain / "flow", tol=1e-5)
    _assert_same_run(one_process / "gan", plain / "gan", tol=1e-5, outputs=GAN_OUTPUTS)


def test_bf16_mixed_precision_runs_and_the_next_run_may_change_it(tmp_path):
    train(FlowTask(), _cfg(steps=3, mixed_precision="bf16"), tmp_path / "bf16")
    train(FlowTask(), _cfg(steps=3), tmp_path / "fp32")
    low, full = _losses(tmp_path / "bf16")[-1]["loss"], _losses(tmp_path / "fp32")[-1]["loss"]
    assert low == pytest.approx(full, rel=5e-2) and low != full


def test_grad_accumulation_equals_the_bigger_batch(tmp_path):
    train(FlowTask(), _cfg(steps=4, batch_size=4), tmp_path / "big")
    train(FlowTask(), _cfg(steps=4, batch_size=2, grad_accum=2), tmp_path / "accum")
    _assert_same_run(tmp_path / "big", tmp_path / "accum", tol=1e-5)


def test_nan_guard_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(SnapgenError, match=r"step 7: non-finite loss term 'loss' = nan; training stopped, "
                                           r"last good checkpoint: .*step_000005"):
        train(FlowTask(nan_at=7), _cfg(steps=10), tmp_path)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000005"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp")) and not (tmp_path / "model").exists()
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # The kept checkpoint resumes cleanly once the cause is gone.
    summary = train(FlowTask(), _cfg(steps=10), tmp_path, resume="auto")
    assert summary["resumed_from"].endswith("step_000005")
    assert [r["step"] for r in _losses(tmp_path)] == list(range(1, 11))


def test_alternating_phases_step_each_optimizer_in_turn(tmp_path):
    task = GanTask()
    g0, d0 = ({k: v.clone() for k, v in m.state_dict().items()} for m in (task.g, task.d))
    summary = train(task, _cfg(steps=6, batch_size=8, checkpoint_every=6), tmp_path)
    assert [phase for phase, _ in task.calls] == ["generator", "discriminator"] * 6
    for phase, grads in task.calls:  # a phase only leaves gradients in its own trainables
        assert grads == {"generator": phase == "generator", "discriminator": phase == "discriminator"}
    assert set(summary["final_losses"]) == {"generator/loss", "generator/grad_norm", "discriminator/loss",
                                            "discriminator/real", "discriminator/fake", "discriminator/grad_norm"}
    # Non-diffusers trainables are saved as safetensors; both moved; both optimizers took 6 steps.
    g, d = (load_file(tmp_path / sub / "model.safetensors") for sub in ("model", "discriminator"))
    assert not torch.equal(g["weight"], g0["weight"]) and not torch.equal(d["0.weight"], d0["0.weight"])
    ckpt = tmp_path / "checkpoints" / "step_000006"
    for name in ("generator", "discriminator"):
        state = load_file(ckpt / f"optimizer.{name}.safetensors")
        steps = {k: int(v) for k, v in state.items() if k.endswith("/step")}
        assert len(steps) == len(list(task.trainables()[name].parameters())) and set(steps.values()) == {6}


def test_gradient_checkpointing_switch_keeps_the_numbers(tmp_path):
    task = FlowTask(n=4, unet=True)
    train(task, _cfg(steps=2, batch_size=2, gradient_checkpointing=True), tmp_path / "ckpt")
    assert task.model.gradient_checkpointing
    train(FlowTask(n=4, unet=True), _cfg(steps=2, batch_size=2), tmp_path / "plain")
    _assert_same_run(tmp_path / "ckpt", tmp_path / "plain", tol=1e-5)
    with pytest.raises(ConfigError, match="gradient_checkpointing: ToyVelocity does not support it"):
        train(FlowTask(), _cfg(gradient_checkpointing=True), tmp_path / "toy")


@pytest.mark.slow  # inductor compiles the forward and backward with a C++ compiler
def test_compile_switch_keeps_the_numbers(tmp_path):
    train(FlowTask(n=4), _cfg(steps=2, batch_size=2, compile=True), tmp_path / "compiled")
    train(FlowTask(n=4), _cfg(steps=2, batch_size=2), tmp_path / "plain")
    # float rounding only: inductor fuses and reorders the fp32 arithmetic
    _assert_same_run(tmp_path / "compiled", tmp_path / "plain", tol=1e-5)
    summary = json.loads((tmp_path / "compiled" / "train_summary.json").read_text())
    assert "mfu" not in summary  # MFU is a CUDA figure (core/speed.py)


def test_bad_resume_and_config_are_clear_errors(tmp_path):
    train(FlowTask(), _cfg(steps=5), tmp_path)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; resume with resume='auto'"):
        train(FlowTask(), _cfg(steps=5), tmp_path, resume=None)
    with pytest.raises(ConfigError, match="resume: .*nowhere' is not a complete checkpoint directory"):
        train(FlowTask(), _cfg(steps=5), tmp_path, resume=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="past steps=3"):
        train(FlowTask(), _cfg(steps=3), tmp_path, resume="auto")
    with pytest.raises(ConfigError, match=r"lr_overrides: unknown trainables \['disc'\]"):
        train(FlowTask(), _cfg(lr_overrides={"disc": 1e-4}), tmp_path / "other")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        LoopConfig(stepz=3)


SHARDS = [range(0, 5), range(5, 8), range(8, 15), range(15, 19), range(19, 25), range(25, 27), range(27, 32)]


def _stream(shards=SHARDS, p=1, r=0, b=4, a=1, start=0, steps=24, window=3, seed=3) -> list[list[int]]:
    return list(GlobalBatchSampler(shards, b, p, r, a, seed=seed, start_step=start, steps=steps, window=window))


def test_global_batches_split_across_processes_and_resume_without_replay():
    one = [range(10)]
    single = _stream(one, b=4, steps=6)
    r0, r1 = _stream(one, p=2, r=0, b=2, steps=6), _stream(one, p=2, r=1, b=2, steps=6)
    assert [x + y for x, y in zip(r0, r1)] == single  # each process takes its slice
    stream = [i for b in single for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert _stream(one, b=4, start=4, steps=6) == single[4:]
    assert _stream(one, b=2, a=2, steps=6) == [half for b in single for half in (b[:2], b[2:])]
    # One window is the plain per-epoch permutation seeded by (seed, epoch), as before windows existed.
    for epoch in (0, 1):
        seed = int(np.random.SeedSequence([3, epoch]).generate_state(1, np.uint64)[0])
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist()
        assert stream[10 * epoch:10 * epoch + 10] == perm
    assert _stream(SHARDS, window=0) == _stream(SHARDS, window=7) != _stream(SHARDS, window=3)


def _windows(epoch: list[int], window: int = 3) -> list[set[int]]:
    """Cut an epoch's order into windows of ``window`` whole shards; fail if it is not such a run."""
    shard_of = {i: k for k, r in enumerate(SHARDS) for i in r}
    windows, i = [], 0
    while i < len(epoch):
        members = set(list(dict.fromkeys(shard_of[x] for x in epoch[i:]))[:window])
        size = sum(len(SHARDS[k]) for k in members)
        assert {shard_of[x] for x in epoch[i:i + size]} == members, (i, members)
        windows.append(members)
        i += size
    return windows


def test_shard_windows_shuffle_shards_then_samples_within_windows():
    stream = [i for b in _stream() for i in b]  # 24 steps x 4 = 96 positions = 3 epochs of 32
    epochs = [stream[e * 32:(e + 1) * 32] for e in range(3)]
    assert all(sorted(e) == list(range(32)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    windows = [_windows(e) for e in epochs]
    assert all([len(w) for w in ws] == [3, 3, 1] for ws in windows)  # 7 shards in windows of 3
    assert len({frozenset(map(frozenset, ws)) for ws in windows}) > 1  # the shards are shuffled per epoch
    shard_of = {i: k for k, r in enumerate(SHARDS) for i in r}
    assert any(shard_of[x] != shard_of[y] for x, y in zip(epochs[0][:14], epochs[0][1:15]))  # samples mixed
    with pytest.raises(AssertionError):  # the check above has teeth: a global shuffle is no run of windows
        _windows(_stream(window=0)[0] + [i for b in _stream(window=0)[1:8] for i in b])
    # Deterministic by seed; resume at any step equals the uninterrupted stream.
    assert _stream() == _stream() and _stream(seed=4) != _stream()
    for k in (1, 7, 8, 13):
        assert _stream(start=k) == _stream()[k:]
    # P processes x batch b == 1 process x batch P*b, micro-batch by micro-batch (with accumulation too).
    for p, b, a in ((2, 2, 1), (3, 3, 2), (4, 1, 3)):
        ranks = [_stream(p=p, r=r, b=b, a=a) for r in range(p)]
        single = _stream(b=p * b, a=a)
        assert [sum((rank[i] for rank in ranks), []) for i in range(len(single))] == single, (p, b, a)


def test_shard_ranges_must_cover_the_dataset_in_order():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def shard_ranges(self):
            return [range(3, 6), range(0, 3)]

    with pytest.raises(SnapgenError, match=r"Bad.shard_ranges\(\) must cut \[0, 6\) into consecutive ranges"):
        shard_ranges(Bad())
    assert shard_ranges(torch.utils.data.TensorDataset(torch.zeros(5))) == [range(5)]


class _IndexTask(TrainTask):
    """Records the sample indices of every micro-batch the loop feeds it."""

    def __init__(self):
        self.model, self.seen = torch.nn.Linear(1, 1), []
        self.data = ShardedTensors(torch.arange(20.0)[:, None], shard=3)

    def trainables(self):
        return {"model": self.model}

    def dataset(self):
        return self.data

    def collate(self, items):
        return torch.stack([x for (x,) in items])

    def loss(self, phase: str, batch: torch.Tensor, ctx: StepContext):
        self.seen.append(batch[:, 0].long().tolist())
        return ctx.models["model"](batch.to(ctx.device)).pow(2).mean(), {}


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loop_feeds_the_shard_window_order(tmp_path, workers):
    task = _IndexTask()
    train(task, _cfg(steps=9, batch_size=4, grad_accum=2, seed=5, num_workers=workers), tmp_path)
    shards = task.data.shard_ranges()
    assert len(shards) == 7
    assert task.seen == _stream(shards, b=4, a=2, steps=9, window=2, seed=5)


def test_default_workers_are_none_on_cpu_and_spare_cores_on_an_accelerator(monkeypatch):
    from snapgen_cli.train.loop import _workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _workers(LoopConfig(), cpu) == 0 and _workers(LoopConfig(num_workers=3), cpu) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _workers(LoopConfig(), cuda) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 cores per process: one for it, one worker
    assert _workers(LoopConfig(), cuda) == 1 and _workers(LoopConfig(num_workers=0), cuda) == 0


# --- checkpoints: safetensors + JSON only, fsynced, checked on resume ---------------------------


def _ckpt_files(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}


def test_checkpoints_are_safetensors_and_json_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    train(GanTask(), _cfg(steps=5), tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_000005"
    files = _ckpt_files(ckpt)
    assert set(files) == {"checkpoint.json", "ema.safetensors", "weights.generator.safetensors",
                          "weights.discriminator.safetensors", "optimizer.generator.safetensors",
                          "optimizer.discriminator.safetensors"}
    manifest = json.loads(files["checkpoint.json"])
    assert (manifest["format"], manifest["version"], manifest["loop"]) == ("snapgen-checkpoint", 1, {"step": 5})
    for name, data in files.items():  # nothing pickled: each file is JSON or safetensors, listed with its sha256
        if name != "checkpoint.json":
            assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            assert load_file(ckpt / name)
    assert manifest["schedulers"]["generator"]["lr_lambdas"] == [None]
    assert manifest["ema"]["optimization_step"] == 5
    # Every file, then the dir, fsynced before the rename; the parent dir after it.
    tmp = str(ckpt) + ".tmp"
    rename = events.index(("replace", tmp, str(ckpt)))
    synced = [e[1] for e in events[:rename] if e[0] == "fsync"]
    assert {f"{tmp}/{name}" for name in files} | {tmp} <= set(synced)
    assert synced.index(tmp) > max(synced.index(f"{tmp}/{name}") for name in files)
    assert ("fsync", str(ckpt.parent)) in events[rename:]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _accelerate_checkpoint(path: Path, task: FlowTask) -> None:
    """A checkpoint as snapgen wrote it before format 1 (``accelerator.save_state``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    class Steps:
        def state_dict(self):
            return {"step": 5}

        def load_state_dict(self, state):
            pass

    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    model, opt, sched = acc.prepare(task.model, opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=0))
    acc.register_for_checkpointing(EMAModel(model.parameters()), Steps())
    acc.save_state(str(path))
    AcceleratorState._reset_state(reset_partial_state=False)


def test_the_loops_ema_update_is_diffusers_to_the_bit():
    """LerpEMA (one fused lerp a step) computes diffusers' EMAModel update exactly: the same shadow
    weights to the bit through the warm-up's changing decay, and the same state to save."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = ToyVelocity(hidden=64)  # tensors of up to 2,304 floats: the vectorised kernels' main loops
    params = list(model.parameters())
    ours, theirs = LerpEMA(params, decay=0.99, foreach=True), EMAModel(params, decay=0.99, foreach=True)
    start = [s.clone() for s in ours.shadow_params]
    diffusers_step, own = EMAModel.step, []  # which of our updates took diffusers' own path
    with mock.patch.object(EMAModel, "step", autospec=True,
                           side_effect=lambda e, ps: (own.append(e is ours), diffusers_step(e, ps))[1]):
        for _ in range(30):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn_like(p) * 0.1)
            ours.step(params)
            theirs.step(params)
    assert sum(own) == 9  # the warm-up's first 9 steps (decay < 0.5); the other 21 are lerps
    for a, b, s0 in zip(ours.shadow_params, theirs.shadow_params, start, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, s0)  # the negative control: the shadows moved
    state = lambda e: {k: v for k, v in e.state_dict().items() if k != "shadow_params"}  # noqa: E731
    assert state(ours) == state(theirs) and ours.cur_decay_value == theirs.cur_decay_value
    # A frozen parameter (copied, not averaged) takes diffusers' own path.
    params[0].requires_grad_(False)
    ours.step(params)
    theirs.step(params)
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True))
    assert torch.equal(ours.shadow_params[0], params[0])


def test_clip_grad_norm_is_torchs_to_the_bit():
    """``clip_grad_norm`` (the loop's and gpu_bench's) leaves the gradients and the norm exactly as
    torch's ``clip_grad_norm_`` does, whether the norm is above max_norm (clipped) or within it."""
    torch.manual_seed(0)
    params = list(ToyVelocity(hidden=64).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    for max_norm in (0.5 * float(total), 2.0 * float(total)):
        grads = [p.grad.clone() for p in params]
        theirs = torch.nn.utils.clip_grad_norm_(params, max_norm)
        expected = [p.grad.clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        ours = clip_grad_norm(params, max_norm)
        assert torch.equal(ours, theirs)
        assert all(torch.equal(p.grad, e) for p, e in zip(params, expected, strict=True))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True)) == (max_norm > total)


def test_clipping_skips_only_the_identity_multiply(tmp_path, monkeypatch):
    """The loop's gradient clipping (``_Run._clip``: no multiply by 1.0 when the norm is within
    max_grad_norm) trains to the bit what accelerate's clip_grad_norm_ trains, through clipped and
    unclipped steps alike."""
    from snapgen_cli.train import loop

    cfg = _cfg(steps=10, max_grad_norm=1.0)
    train(FlowTask(), cfg, tmp_path / "ours")
    norms = [r["grad_norm"] for r in _losses(tmp_path / "ours")]
    assert min(norms) < 1.0 < max(norms)  # both kinds of step happened (the test is not vacuous)
    monkeypatch.setattr(loop._Run, "_clip", lambda self, params, max_norm: self.acc.clip_grad_norm_(params, max_norm))
    train(FlowTask(), cfg, tmp_path / "accelerate")
    _assert_same_run(tmp_path / "ours", tmp_path / "accelerate", tol=0)


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    # An old-format (accelerate) checkpoint whose pickles carry a payload: refused unread.
    old = tmp_path / "old"
    _accelerate_checkpoint(old / "checkpoints" / "step_000005", FlowTask())
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        torch.save(_Payload(marker), old / "checkpoints" / "step_000005" / name)
    with pytest.raises(ConfigError) as err:
        train(FlowTask(), _cfg(steps=10), old, resume="auto")
    assert not marker.exists()
    assert str(err.value) == (f"{old / 'checkpoints' / 'step_000005'}: a checkpoint of an older snapgen (accelerate's "
                              "pickled save_state), not loaded since unpickling can run code; train into a new "
                              f"--out, or move {old / 'checkpoints'} away to start over")

    # A checkpoint whose tensors or manifest were swapped for a payload, checksums updated to match.
    run = tmp_path / "run"
    train(FlowTask(), _cfg(steps=5), run)
    ckpt = run / "checkpoints" / "step_000005"
    payload = pickle.dumps(_Payload(marker))
    (ckpt / "ema.safetensors").write_bytes(payload)
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    manifest["files"]["ema.safetensors"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(ckpt / 'ema.safetensors'))}: not a valid safetensors "
                                           r"file \(.*\); checkpoint step_000005 is corrupt: resume from another one "
                                           r"\(resume='auto' takes the newest intact one\)$") as err:
        train(FlowTask(), _cfg(steps=10), run, resume=ckpt)
    assert "\n" not in str(err.value) and not marker.exists()
    (ckpt / "checkpoint.json").write_bytes(payload)
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(ckpt / 'checkpoint.json'))}: not valid JSON "):
        train(FlowTask(), _cfg(steps=10), run, resume=ckpt)
    assert not marker.exists()
    pickle.loads(payload)  # the control: unpickling it does run the command
    assert marker.exists()


def test_resume_refuses_a_non_checkpoint_and_a_checkpoint_of_another_model(tmp_path):
    (tmp_path / "some_dir").mkdir()
    with pytest.raises(ConfigError, match=r"^resume: '.*some_dir' is not a complete checkpoint directory \(no "
                                          r"checkpoint.json; e.g. .*step_000005\), or pass resume='auto'$"):
        train(FlowTask(), _cfg(steps=5), tmp_path / "new", resume=tmp_path / "some_dir")
    out = tmp_path / "run"
    train(FlowTask(), _cfg(steps=5), out)
    ckpt = out / "checkpoints" / "step_000005"
    before = _ckpt_files(ckpt)
    fix = f"; train into a new --out, or move {out / 'checkpoints'} away to start over$"
    wider = FlowTask()
    wider.model = ToyVelocity(hidden=32)
    with pytest.raises(ConfigError, match=rf"^resume: {re.escape(str(ckpt))} is a checkpoint of another model "
                                          r"\(trainable 'model' tensor 'conv_in.weight': of shape \[16, 4, 3, 3\] "
                                          r"there, of shape \[32, 4, 3, 3\] in this run\)" + fix):
        train(wider, _cfg(steps=10), out, resume="auto")
    with pytest.raises(ConfigError, match=rf"^resume: {re.escape(str(ckpt))} is a checkpoint of other trainables "
                                          r"\(model; this run trains generator, discriminator\)" + fix):
        train(GanTask(), _cfg(steps=10), out, resume="auto")
    assert _ckpt_files(ckpt) == before and [p.name for p in complete_checkpoints(out)] == ["step_000005"]


def _corrupt(ckpt: Path, how: str) -> str:
    """Damage checkpoint ``ckpt`` (whatever its format) in way ``how``; return the file's name."""
    files = sorted((p for p in ckpt.iterdir() if p.is_file()), key=lambda p: (p.stat().st_size, p.name))
    path = ckpt / "checkpoint.json" if how == "manifest" else files[-1]  # else the largest file
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "flip":
        path.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    else:
        path.write_bytes(b"")
    return path.name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    train(FlowTask(), _cfg(steps=15, grad_accum=2, batch_size=2), out)
    return out


@pytest.mark.parametrize("how", ["empty", "truncate", "flip", "manifest"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference_run, how):
    cfg = _cfg(steps=15, grad_accum=2, batch_size=2)
    train(FlowTask(), cfg, tmp_path)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000005", "step_000010", "step_000015"]
    name = _corrupt(tmp_path / "checkpoints" / "step_000015", how)
    log = io.StringIO()
    summary = train(FlowTask(), cfg, tmp_path, resume="auto", console=Console(file=log, width=80))
    assert summary["resumed_from"] == str(tmp_path / "checkpoints" / "step_000010")
    warning = [line for line in log.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and re.fullmatch(
        rf"warning: step_000015 is not intact \({re.escape(str(tmp_path / 'checkpoints' / 'step_000015' / name))}: "
        r".+\); resuming from step_000010, the newest intact checkpoint", warning[0]), warning
    _assert_same_run(reference_run, tmp_path, tol=1e-6)
    # The rewritten step 15 is intact again: a further resume takes it.
    assert train(FlowTask(), cfg, tmp_path, resume="auto")["resumed_from"].endswith("step_000015")


def test_no_intact_checkpoint_or_a_corrupt_chosen_one_is_a_one_line_error(tmp_path):
    train(FlowTask(), _cfg(steps=10), tmp_path)
    ckpts = tmp_path / "checkpoints"
    _corrupt(ckpts / "step_000010", "truncate")
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(ckpts / 'step_000010' / 'optimizer.model.safetensors'))}"
                                           r": \d+ bytes, checkpoint.json says \d+; checkpoint step_000010 is corrupt: "
                                           r"resume from another one \(resume='auto' takes the newest intact one\)$"):
        train(FlowTask(), _cfg(steps=10), tmp_path, resume=ckpts / "step_000010")
    _corrupt(ckpts / "step_000005", "empty")
    with pytest.raises(SnapgenError, match=rf"^{re.escape(str(ckpts))}: no intact checkpoint \(step_000010 is not "
                                           r"intact \(.*\); step_000005 is not intact \(.*\)\); move the folder away "
                                           r"to start over, or restore one$") as err:
        train(FlowTask(), _cfg(steps=10), tmp_path, resume="auto")
    assert "\n" not in str(err.value) and len(complete_checkpoints(tmp_path)) == 2  # nothing deleted


def test_pruning_keeps_the_checkpoint_to_fall_back_to_below_a_corrupt_newer_one(tmp_path):
    train(FlowTask(), _cfg(steps=15, keep_checkpoints=2), tmp_path)
    _corrupt(tmp_path / "checkpoints" / "step_000015", "empty")
    # Resumed from 10 with checkpoints every 3 steps: 12 is written below the corrupt 15, then NaN at 14.
    with pytest.raises(SnapgenError, match="step 14: non-finite"):
        train(FlowTask(nan_at=14), _cfg(steps=15, keep_checkpoints=1, checkpoint_every=3), tmp_path, resume="auto")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000012", "step_000015"]
    summary = train(FlowTask(), _cfg(steps=15, keep_checkpoints=1, checkpoint_every=3), tmp_path, resume="auto")
    assert summary["resumed_from"].endswith("step_000012")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000015"]


def test_the_entry_point_closes_a_process_group_left_up(tmp_path):
    """`train` leaves a distributed group up for later stages; the console entry point (and the
    launched test script) destroys it on exit, not the interpreter's teardown (a gloo rank aborted
    there once on CI)."""
    import torch.distributed as dist

    from snapgen_cli.cpu import close_process_group

    close_process_group()  # nothing up: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group(wait=True)  # one rank: no barrier to wait at
    assert not dist.is_initialized()


def test_the_entry_point_waits_for_the_other_ranks_only_after_a_success(monkeypatch):
    """On exit 0 every rank reaches the barrier; after an error another rank may never get there,
    so the group goes without waiting."""
    import snapgen_cli.cpu
    from snapgen_cli import cli

    waits = []
    monkeypatch.setattr(snapgen_cli.cpu, "close_process_group", lambda wait=False: waits.append(wait))
    for argv, code in ((["--help"], 0), (["no-such-command"], 2)):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == code
    assert waits == [True, False]
