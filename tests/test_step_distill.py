"""``snapgen step-distill`` (sec. 3.4, Eq. 9) on tiny models: the kd fixture's DiT teacher as the
few-step teacher and discriminator backbone, its tiny UNet student as the generator."""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from conftest import FAST
from rich.console import Console

from snapgen_cli.core.discriminator import FeatureHeads
from snapgen_cli.core.losses import StepDistillLoss
from snapgen_cli.core.pipeline import SnapGenPipeline
from snapgen_cli.core.teacher import load_teacher, teacher_block_features, teacher_forward
from snapgen_cli.errors import ConfigError
from snapgen_cli.stages import step_distill
from snapgen_cli.stages.base import StageContext
from snapgen_cli.stages.training import inputs
from snapgen_cli.train.loop import StepContext, _Run, read_checkpoint, sample_generators
from snapgen_cli.train.step_distill import StepDistillTask, few_step_grid


def _cfg(root: Path, **kw) -> step_distill.Config:
    base = dict(data=str(root / "pre"), init_from=str(root / "student"), teacher=str(root / "teacher"),
                disc_blocks=[0, 1], disc_hidden=32, batch_size=4, grad_accum=1, lr=1e-3, gradient_checkpointing=False,
                **FAST)
    return step_distill.Config(**{**base, **kw})


class _Harness:
    """The task inside the loop's real set-up (optimizers, phase freezing) without its step loop."""

    def __init__(self, root: Path, tmp: Path, **kw):
        AcceleratorState._reset_state(reset_partial_state=False)
        self.cfg = _cfg(root, seed=0, **kw)
        set_seed(0)  # the heads' initial weights, as `seeded` sets them in a stage
        self.task = StepDistillTask(self.cfg, *inputs(self.cfg, StageContext(out_dir=tmp)))
        self.run = _Run(self.task, self.cfg, tmp, Accelerator(cpu=True), Console(quiet=True))
        self.run._build()
        ds = self.task.dataset()
        self.batch = self.task.collate([ds[i] for i in range(self.cfg.batch_size)])

    def ctx(self, step: int = 1) -> StepContext:
        gens = sample_generators(self.cfg.seed, step, range(self.cfg.batch_size))
        return StepContext(step, 0, {**self.run.models, **self.run.frozen}, gens, self.run.acc)

    def backward(self, phase: str, step: int = 1, ctx: StepContext | None = None):
        names = self.task.phases()[phase]
        with self.run._only_trainable(names):
            loss, logs = self.task.loss(phase, self.batch, ctx or self.ctx(step))
            loss.backward()
        return loss, logs

    def update(self, phase: str) -> None:
        for n in self.task.phases()[phase]:
            self.run.optimizers[n].step()
            self.run.optimizers[n].zero_grad(set_to_none=True)


def _grads(module) -> list:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("disc_text", [False, True])
def test_gradients_stay_where_they_belong(kd, tmp_path, disc_text):
    h = _Harness(kd, tmp_path / "a", disc_text=disc_text)
    h.backward("generator")
    assert all(g is None for g in _grads(h.task.heads)), "the generator's loss left gradients in the heads"
    assert all(g is None for g in _grads(h.task.teacher))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(h.task.unet))
    h.update("generator")
    h.backward("discriminator")
    assert all(g is None for g in _grads(h.task.unet)), "the discriminator's loss left gradients in the student"
    assert all(g is None for g in _grads(h.task.teacher))
    after_g = [g.clone() for g in _grads(h.task.heads)]
    assert sum(g.abs().sum() for g in after_g) > 0
    if disc_text:  # the prompt's projection learns too (it starts at zero, like the output layer)
        assert all(p.grad.abs().sum() > 0 for p in h.task.heads.cond.parameters())

    # the discriminator's update after a generator step equals a discriminator step alone
    alone = _Harness(kd, tmp_path / "b", disc_text=disc_text)
    alone.backward("discriminator")
    for a, b in zip(after_g, _grads(alone.task.heads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_discriminator_loss_starts_at_its_analytic_value(kd, tmp_path):
    """Zero-initialised heads give logits 0: the log form of Eq. 9 is 2 ln 2, hinge is 2."""
    for kind, value in (("non-saturating", 2 * math.log(2)), ("hinge", 2.0)):
        h = _Harness(kd, tmp_path / kind, adv_loss=kind)
        loss, logs = h.backward("discriminator")
        assert loss.item() == pytest.approx(value, abs=1e-6)
        assert logs["D_real/h0"] == 0 and logs["D_fake/h1"] == 0


def test_guided_kd_target_is_the_teachers_cfg_combination(kd, tmp_path, monkeypatch):
    """kd_guidance w: L_kd's target is v_u + w (v_c - v_u), the teacher with its text and without
    (all encoders dropped), from one call on [uncond; cond] as the sampler guides; w = 1 is the
    plain conditional velocity from one call on the batch."""
    from snapgen_cli.core.text import unconditional
    from snapgen_cli.train import step_distill as task_module

    calls = []

    def counted(model, x, *args, **kw):
        calls.append(len(x))
        return teacher_forward(model, x, *args, **kw)

    monkeypatch.setattr(task_module, "teacher_forward", counted)
    h = _Harness(kd, tmp_path / "g", kd_guidance=3.0)
    ctx = h.ctx()
    d = h.task.draw(h.batch, ctx)
    b = len(d.x_t)
    teacher, ts = h.task.frozen_teacher.module(ctx), h.task.objective.model_timestep(d.t)
    uncond = unconditional(h.task.teacher_text.layout, b)[:2]
    assert all(c.abs().sum() == 0 for c in uncond) and d.teacher_cond[0].abs().sum() > 0
    both = tuple(torch.cat([u, c]) for u, c in zip(uncond, d.teacher_cond, strict=True))
    v_u, v_c = teacher_forward(teacher, torch.cat([d.x_t, d.x_t]), torch.cat([ts, ts]), *both,
                               return_features=False)[0].chunk(2)
    assert (v_c - v_u).abs().max() > 1e-4  # the text matters, so the guidance does too
    calls.clear()
    torch.testing.assert_close(h.task.kd_target(ctx, d), v_u + 3.0 * (v_c - v_u), rtol=0, atol=0)
    assert calls == [2 * b]
    plain = _Harness(kd, tmp_path / "p")
    d1 = plain.task.draw(plain.batch, plain.ctx())
    v_plain, _ = teacher_forward(teacher, d1.x_t, ts, *d1.teacher_cond, return_features=False)
    calls.clear()
    torch.testing.assert_close(plain.task.kd_target(plain.ctx(), d1), v_plain, rtol=0, atol=0)
    assert calls == [b]


#: A direction with entries +-1 (a uniform offset would vanish in the heads' LayerNorm).
_DIRECTION = torch.tensor([1.0, -1.0] * 8)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]


def _gaussians(shift: float, n: int, g: torch.Generator) -> tuple[list, list]:
    real = [torch.randn(n, 6, 16, generator=g) + shift * _DIRECTION, torch.randn(n, 6, 16, generator=g)]
    fake = [torch.randn(n, 6, 16, generator=g), torch.randn(n, 6, 16, generator=g)]
    return real, fake


@pytest.mark.parametrize("shift", [1.0, 0.0])
def test_heads_separate_shifted_features_and_not_identical_ones(shift):
    torch.manual_seed(0)
    heads = FeatureHeads(16, (3, 7), hidden=32)
    loss_fn = StepDistillLoss()
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        real, fake = _gaussians(shift, 32, g)
        s = torch.rand(32, generator=g)
        loss, _ = loss_fn.discriminator(heads(real, s), heads(fake, s), ["a", "b"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = _gaussians(shift, 512, g)
    s = torch.rand(512, generator=g)
    with torch.no_grad():
        _, logs = loss_fn.discriminator(heads(real, s), heads(fake, s), ["a", "b"])
    if shift:
        assert logs["acc/a"] > 0.9, logs  # head a sees a shifted first feature map
    else:
        assert abs(logs["acc/a"] - 0.5) < 0.1 and abs(logs["acc/b"] - 0.5) < 0.1, logs


def test_a_generator_step_raises_the_fixed_discriminators_score_of_fakes(kd, tmp_path):
    h = _Harness(kd, tmp_path / "g", adv_weight=50.0, kd=False, lr=1e-4, lr_overrides={"discriminator": 3e-3},
                 disc_logit_mean=-1.0)  # lower noise levels: real and fake differ more, D learns in few steps
    for step in range(1, 41):  # teach D to tell this student's fakes from real latents
        _, logs = h.backward("discriminator", step)
        h.update("discriminator")
    assert logs["adv_d"] < 2 * math.log(2) - 0.1  # D has learnt something

    def fake_score() -> float:
        h.task._fake = None  # score the student as it is now, not the generator phase's cached fakes
        _, logs = h.task.loss("discriminator", h.batch, h.ctx(99))
        return sum(float(v) for k, v in logs.items() if k.startswith("D_fake/"))

    before = fake_score()
    h.backward("generator", 99)
    h.update("generator")
    assert fake_score() > before + 1e-3


def test_teacher_block_features_stop_after_the_last_head(kd):
    teacher = load_teacher(str(kd / "teacher"), "unet")
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, b in enumerate(teacher.transformer_blocks)]
    g = torch.Generator().manual_seed(0)
    c = teacher.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    feats = teacher_block_features(teacher, x, torch.tensor([300.0, 700.0]), ctx, pooled, [1, 0])
    assert calls == [0, 1]  # block 2 never ran
    for h in hooks:
        h.remove()
    _, full = teacher_forward(teacher, x, torch.tensor([300.0, 700.0]), ctx, pooled, layer=1)
    torch.testing.assert_close(feats[0], full.flatten(2).transpose(1, 2))


def test_step_distill_trains_checkpoints_change_and_the_pipeline_samples_few_steps(kd, tmp_path):
    out = tmp_path / "sd"
    summary = step_distill.run(_cfg(kd, steps=4, checkpoint_every=2, keep_checkpoints=None),
                               StageContext(out_dir=out))
    assert summary["trainables"].keys() == {"unet", "discriminator"}
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert {"generator/adv_g", "generator/S", "generator/kd", "discriminator/adv_d", "discriminator/acc/h0",
            "discriminator/D_real/h1", "discriminator/D_fake/h1"} <= rows[-1].keys()
    # checkpoints hold different weights (a known failure of public LADD reimplementations)
    _, w2 = read_checkpoint(out / "checkpoints" / "step_000002")
    _, w4 = read_checkpoint(out / "checkpoints" / "step_000004")
    for name in ("unet", "discriminator"):
        assert any(not torch.equal(w2[f"weights.{name}.safetensors"][k], w4[f"weights.{name}.safetensors"][k])
                   for k in w2[f"weights.{name}.safetensors"])
    init = SnapGenPipeline.from_pretrained(kd / "student").unet.state_dict()
    pipe = SnapGenPipeline.from_pretrained(out)
    assert any(not torch.equal(init[k], v) for k, v in pipe.unet.state_dict().items())
    assert pipe.sampler_defaults == (4, 1.0)
    assert pipe.config.sampler["distilled_steps"] == [4, 8]
    # generate / eval without --steps / --guidance sample as the model was distilled; given ones win
    from snapgen_cli.stages import generate
    from snapgen_cli.stages.base import sampler_defaults

    cfg = sampler_defaults(generate.Config(prompts=["a red circle"]), pipe)
    assert (cfg.steps, cfg.guidance) == (4, 1.0)
    cfg = sampler_defaults(generate.Config(prompts=["a red circle"], steps=8, guidance=2.0), pipe)
    assert (cfg.steps, cfg.guidance) == (8, 2.0)
    plain = sampler_defaults(generate.Config(prompts=["a red circle"]), SnapGenPipeline.from_pretrained(kd / "student"))
    assert (plain.steps, plain.guidance) == (28, 4.5)
    assert FeatureHeads.from_pretrained(out / "discriminator").config.blocks == [0, 1]


def test_the_student_trains_on_the_few_step_grid(kd, tmp_path):
    h = _Harness(kd, tmp_path / "grid")
    grid = few_step_grid(h.task.objective, [4, 8])
    sched = h.task.objective.scheduler(4).sigmas
    assert grid.shape == (12, 2) and torch.allclose(grid[:4, 0], sched[:4]) and grid[3, 1] == 0
    draws = torch.cat([h.task.draw(h.batch, h.ctx(s)).t for s in range(1, 30)])
    assert set(draws.tolist()) <= set(grid[:, 0].tolist()) and len(set(draws.tolist())) > 6


def test_bad_disc_blocks_are_one_clear_error(kd, tmp_path, run_cli):
    code, _, err = run_cli("step-distill", "--data", str(kd / "pre"), "--init-from", str(kd / "student"),
                           "--teacher", str(kd / "teacher"), "--disc-blocks", "0", "--disc-blocks", "5",
                           "--resolution", "32", "--steps", "1", "--tracker", "none", "--out", str(tmp_path / "bad"))
    assert code == 2 and "disc_blocks" in err and "3 blocks" in err, err


def test_step_distill_help_and_paper_plan(run_cli):
    code, out, _ = run_cli("step-distill", "--help")
    assert code == 0 and "--disc-blocks" in out and "--student-steps" in out and "--adv-loss" in out


@pytest.mark.parametrize("kernel", [3, 1])
def test_conv_heads_see_the_token_grid_and_linear_heads_do_not(kernel):
    """Real token maps are spatially smooth (every token of a 4x4 grid is the sample's one vector),
    fake ones have independent tokens with the same per-token distribution: a 3x3 conv head learns
    to tell them apart, a token-wise (linear) head cannot (the negative control)."""
    torch.manual_seed(0)
    heads = FeatureHeads(16, (0,), hidden=32, kernel_size=kernel)
    loss_fn = StepDistillLoss()
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def maps(n: int) -> tuple[list, list]:
        return [torch.randn(n, 1, 16, generator=g).expand(n, 16, 16)], [torch.randn(n, 16, 16, generator=g)]

    for _ in range(150):
        real, fake = maps(32)
        s = torch.rand(32, generator=g)
        loss, _ = loss_fn.discriminator(heads(real, s, (4, 4)), heads(fake, s, (4, 4)), ["a"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = maps(512)
    s = torch.rand(512, generator=g)
    with torch.no_grad():
        _, logs = loss_fn.discriminator(heads(real, s, (4, 4)), heads(fake, s, (4, 4)), ["a"])
    if kernel > 1:
        assert logs["acc/a"] > 0.9 and logs["adv_d"] < 1.0, logs
    else:  # the loss, not the accuracy: a smooth map's mean logit spreads more, which skews acc
        assert logs["adv_d"] > 2 * math.log(2) - 0.02, logs


def test_conv_heads_need_the_grid_and_an_odd_kernel():
    heads = FeatureHeads(16, (0,), hidden=8, kernel_size=3)
    with pytest.raises(ValueError, match="token grid"):
        heads([torch.randn(2, 16, 16)], torch.rand(2))
    with pytest.raises(ValueError, match="token grid"):
        heads([torch.randn(2, 16, 16)], torch.rand(2), (3, 4))
    with pytest.raises(ConfigError, match="disc_kernel"):
        FeatureHeads(16, (0,), kernel_size=2)


@pytest.mark.parametrize("text", [True, False])
def test_text_conditioned_heads_tell_matched_prompts_from_mismatched_ones(text):
    """Real pairs: token features that carry their prompt's embedding; fake pairs: features drawn
    the same way for another, independent prompt, judged with the first. Both sides have the same
    feature and prompt distributions, only the pairing differs: heads with ``cond_dim`` (ADD's
    projection) learn it, plain heads cannot (the negative control)."""
    torch.manual_seed(0)
    heads = FeatureHeads(16, (0,), hidden=32, cond_dim=8 if text else 0)
    loss_fn = StepDistillLoss()
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def features(c: torch.Tensor) -> list[torch.Tensor]:
        f = torch.randn(len(c), 6, 16, generator=g)
        f[..., :8] += 2 * c[:, None]
        return [f]

    def judged(n: int):
        c, other = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        s = torch.rand(n, generator=g)
        cond = c if text else None
        return heads(features(c), s, cond=cond), heads(features(other), s, cond=cond)

    for _ in range(150):
        loss, _ = loss_fn.discriminator(*judged(32), ["a"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, logs = loss_fn.discriminator(*judged(512), ["a"])
    if text:
        assert logs["acc/a"] > 0.9 and logs["adv_d"] < 1.0, logs
    else:
        assert abs(logs["acc/a"] - 0.5) < 0.1 and logs["adv_d"] > 2 * math.log(2) - 0.02, logs


def test_text_conditioned_heads_start_at_zero_and_need_their_embedding():
    heads = FeatureHeads(16, (0, 1), hidden=8, cond_dim=4)
    f = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    assert all(torch.equal(lg, torch.zeros(2, 5)) for lg in heads(f, torch.rand(2), cond=torch.randn(2, 4)))
    with pytest.raises(ValueError, match="cond_dim 4 got no text embedding"):
        heads(f, torch.rand(2))
    with pytest.raises(ValueError, match="cond_dim 0 got a text embedding"):
        FeatureHeads(16, (0,), hidden=8)(f[:1], torch.rand(2), cond=torch.randn(2, 4))


def test_the_few_step_benchmark_pairs_after_with_before_seed_by_seed():
    """``benchmarks/step_distill_eval.py``'s summary: each after-N row minus before-N on the seeds
    both have (a seed only one side has is left out), with the standard error over seeds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sde", Path(__file__).parents[1] / "benchmarks" /
                                                  "step_distill_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(seed, alignment, fid):
        return dict(seed=seed, alignment=alignment, fid=fid, steps=4)

    rows = {"before-4": [run(0, 0.25, 280.0), run(1, 0.30, 270.0)],
            "after-4/x": [run(0, 0.35, 270.0), run(1, 0.30, 280.0), run(2, 0.9, 1.0)],
            "after-8": [run(0, 0.5, 1.0)], "many": [run(0, 0.5, 1.0)]}
    paired = bench.paired_differences(rows)
    assert list(paired) == ["after-4/x"]  # no before-8; "many" is not an after row
    p = paired["after-4/x"]
    assert p["seeds"] == [0, 1] and p["seeds_alignment_up"] == 1 and p["seeds_fid_lower"] == 1
    assert p["alignment_diff"] == pytest.approx(0.05) and p["alignment_se"] == pytest.approx(0.05)
    assert p["fid_diff"] == pytest.approx(0.0) and p["fid_se"] == pytest.approx(10.0)
