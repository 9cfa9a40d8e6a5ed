"""``snapgen distill`` end to end on tiny models (sec. 3.3, Eq. 4-8): a tiny SD3 DiT teacher
trained by ``finetune --model sd3-tiny`` on its own (teacher-role) text features, then the
tiny UNet student distilled from it. The loss terms themselves: tests/test_losses.py; the
teacher's feature capture: tests/test_teacher.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import FAST  # the kd fixture lives in conftest: test_step_distill shares it

from snapgen_cli.core import denoiser
from snapgen_cli.core.losses import FeatureProjector
from snapgen_cli.core.pipeline import SnapGenPipeline
from snapgen_cli.core.teacher import load_teacher
from snapgen_cli.stages import distill
from snapgen_cli.stages.base import StageContext


def _distill_cfg(root: Path, **kw) -> distill.Config:
    base = dict(data=str(root / "pre"), init_from=str(root / "student"), teacher=str(root / "teacher"),
                batch_size=4, lr=1e-3, gradient_checkpointing=False, **FAST)
    return distill.Config(**{**base, **kw})


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def _teacher_mse(root: Path, student_dir: Path) -> float:
    """E ||v_teacher - v_student||^2 over the data at fixed noise levels (the student's EMA weights)."""
    from snapgen_cli.core.teacher import teacher_forward
    from snapgen_cli.core.text import combine
    from snapgen_cli.data.shards import ShardDataset, encoder_features, read_manifest
    from snapgen_cli.train.diffusion import TextRole

    manifest = read_manifest(root / "pre")
    ds = ShardDataset(root / "pre")
    batch = torch.utils.data.default_collate([{k: v for k, v in ds[i].items() if k not in ("key", "caption")}
                                              for i in range(len(ds))])
    student = denoiser.load(student_dir / "unet").eval()
    teacher = load_teacher(str(root / "teacher"), "unet")
    s_layout = TextRole(manifest, "student", root / "pre").layout
    t_layout = TextRole(manifest, "teacher", root / "pre").layout
    x0 = batch["latents.32"].float()
    g = torch.Generator().manual_seed(0)
    errs = []
    with torch.no_grad():
        for sigma in (0.2, 0.5, 0.8):
            xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
            ts = torch.full((len(x0),), sigma * 1000)
            v_s, _ = denoiser.denoise(student, xt, ts, combine(encoder_features(batch, manifest), s_layout))
            tc, tp, _ = combine(encoder_features(batch, manifest, "teacher"), t_layout)
            v_t, _ = teacher_forward(teacher, xt, ts, tc, tp, return_features=False)
            errs.append(((v_s - v_t) ** 2).mean().item())
    return float(np.mean(errs))


def test_the_teacher_never_gets_gradients_and_stays_unchanged(kd, tmp_path):
    from snapgen_cli.stages.training import inputs
    from snapgen_cli.train.distill import DistillTask
    from snapgen_cli.train.loop import train

    cfg = _distill_cfg(kd, steps=3, seed=0)
    task = DistillTask(cfg, *inputs(cfg, StageContext(out_dir=tmp_path)))
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in task.unet.state_dict().items()}
    projector = {k: v.clone() for k, v in task.projector.state_dict().items()}
    train(task, cfg, tmp_path / "kd")
    assert all(torch.equal(before[k], v) for k, v in task.teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters()) and not task.teacher.training
    # the student and the projector did train (the projector's only gradient is Eq. 5's)
    assert any(not torch.equal(student[k], v) for k, v in task.unet.state_dict().items())
    assert all(not torch.equal(projector[k], v) for k, v in task.projector.state_dict().items())


def test_distill_trains_the_student_and_projector(kd, tmp_path):
    out = tmp_path / "kd"
    summary = distill.run(_distill_cfg(kd, steps=4), StageContext(out_dir=out))
    rows = _losses(out)
    assert {"task", "kd", "featkd", "scaled_kd", "scaled_featkd", "lambda"} <= rows[0].keys()
    assert any(k.startswith("tbin/kd/") for k in rows[0]) and (out / "fig6.png").stat().st_size > 1000
    proj = FeatureProjector.from_pretrained(out / "projector")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in proj.modules()) == 2
    assert summary["projector_params"] == sum(p.numel() for p in proj.parameters())
    assert summary["trainables"].keys() == {"unet", "projector"}
    # the output is the student's pipeline, loadable the diffusers way
    pipe = SnapGenPipeline.from_pretrained(out)
    assert type(pipe.unet).__name__ == "SnapGenUNet" and pipe.unet.config.block_channels == [32, 64, 128]


def test_distill_plan_reports_the_teacher_the_student_and_the_projector(kd, tmp_path):
    items = distill.plan(_distill_cfg(kd), StageContext(out_dir=tmp_path / "kd"))
    assert items[0].model.startswith("unet from") and "t-scaling (Eq. 8)" in items[0].notes
    teacher = load_teacher(str(kd / "teacher"), "unet")
    assert items[1].params == sum(p.numel() for p in teacher.parameters())
    assert items[2].model.startswith("projector")
    assert not (tmp_path / "kd").exists()


def test_kd_pulls_the_student_to_the_teacher_much_more_than_the_task_alone(kd, tmp_path):
    """Overfit 150 steps on the four samples from the same start: with output KD (Eq. 4) the
    student's velocity ends far closer to the teacher's than with L_task alone (Tab. 3's first
    row), which fits the data its own way (measured 0.16 vs 0.52; 0.49 at the start)."""
    start = _teacher_mse(kd, kd / "student")
    runs = {}
    for name, kw in (("task", dict(kd=False, featkd=False)), ("kd", dict(t_scaling=False, featkd=False))):
        distill.run(_distill_cfg(kd, steps=150, lr=2e-3, ema_decay=0.0, **kw), StageContext(out_dir=tmp_path / name))
        runs[name] = _teacher_mse(kd, tmp_path / name)
    print("student-teacher MSE: start", start, runs)
    assert runs["kd"] < 0.5 * runs["task"] and runs["kd"] < 0.5 * start


def test_two_processes_equal_one_process(kd, tmp_path, accelerate_launch):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["distill", "--data", str(kd / "pre"), "--init-from", str(kd / "student"), "--teacher", str(kd / "teacher"),
            "--resolution", "32", "--lr", "1e-3", "--lr-reference-batch", "4", "--tracker", "none",
            "--no-gradient-checkpointing", "--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "snapgen_cli", *argv, "--out", str(one), "--batch-size", "4"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([*accelerate_launch, "-m", "snapgen_cli", *argv, "--out", str(two), "--batch-size", "2",
                          "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["global_batch"] == 4
    la, lb = _losses(one), _losses(two)
    for key in ("loss", "task", "kd", "featkd"):
        np.testing.assert_allclose([r[key] for r in la], [r[key] for r in lb], rtol=0, atol=1e-6, err_msg=key)
    for sub, load in (("unet", denoiser.load), ("projector", FeatureProjector.from_pretrained)):
        wa, wb = load(one / sub).state_dict(), load(two / sub).state_dict()
        # as for pretrain (test_train_e2e): within a small part of one AdamW step (lr 1e-3)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 0.05 * 1e-3, sub
