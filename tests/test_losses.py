"""The distillation losses of sec. 3.3 (Eq. 2, 4-8), the projector psi, lambda(t) of Eq. 7, the
Tab. 3 switches and the Fig. 6 per-t-bin log. (The decoder losses: tests/test_decoder.py.)"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from snapgen_cli.core.losses import (
    RATIO_EPS, DistillLoss, FeatureProjector, featkd_loss, kd_loss, lambda_t, plot_fig6, read_tbins, scaled_kd,
    task_loss, tbin_sums, timestep_aware_scaling,
)
from snapgen_cli.core.teacher import tokens_to_map
from snapgen_cli.errors import ConfigError, SnapgenError


def _rand(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


# ---------------------------------------------------------------------------- per-sample terms


def test_terms_are_per_sample_means_of_squared_errors():
    v = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]).reshape(2, 1, 2, 2)
    torch.testing.assert_close(task_loss(v, target), torch.tensor([1.0, 1.0]))  # (1+1+1+1)/4, (4+0+0+0)/4
    teacher = _rand(2, 1, 2, 2, seed=1, grad=True)
    kd = kd_loss(v, teacher)
    torch.testing.assert_close(kd, teacher.detach().square().flatten(1).mean(1))
    kd.sum().backward()
    assert teacher.grad is None and v.grad.abs().sum() > 0  # the teacher's output is detached
    projected, f_t = _rand(3, 4, 2, 2, seed=2, grad=True), _rand(3, 4, 2, 2, seed=3, grad=True)
    feat = featkd_loss(projected, f_t)
    assert feat.shape == (3,)
    torch.testing.assert_close(feat, ((f_t - projected) ** 2).detach().reshape(3, -1).mean(1))
    feat.sum().backward()
    assert f_t.grad is None and projected.grad is not None
    with pytest.raises(ValueError, match="teacher_channels=5"):
        featkd_loss(projected, _rand(3, 5, 2, 2))


def test_terms_are_float32_under_low_precision_inputs():
    v, t = _rand(2, 3, 4, 4).bfloat16(), _rand(2, 3, 4, 4, seed=1).bfloat16()
    assert task_loss(v, t).dtype == torch.float32
    torch.testing.assert_close(task_loss(v, t), ((t.float() - v.float()) ** 2).mean((1, 2, 3)))


def test_tokens_to_map_is_sd3_patch_order():
    grid = _rand(2, 6, 3, 4)  # (B, C, h, w) as SD3's PatchEmbed flattens it
    tokens = grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens_to_map(tokens, 3, 4), grid)
    with pytest.raises(ValueError, match="12 tokens"):
        tokens_to_map(tokens, 4, 4)


# ---------------------------------------------------------------------------- lambda(t), Eq. 7


def test_lambda_t_is_normalised_logit_normal_density():
    t = torch.linspace(0.001, 0.999, 999)
    lam = lambda_t(t)
    assert lambda_t(torch.tensor(0.5)).item() == 1.0  # exactly: the KD terms vanish at t = 0.5
    assert lam.max() == pytest.approx(1.0) and t[lam.argmax()] == pytest.approx(0.5, abs=1e-3)
    density = torch.exp(-torch.logit(t) ** 2 / 2) / (math.sqrt(2 * math.pi) * t * (1 - t))
    torch.testing.assert_close(lam, density / (4 / math.sqrt(2 * math.pi)))
    assert lambda_t(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]
    torch.testing.assert_close(lambda_t(torch.tensor(0.2)), lambda_t(torch.tensor(0.8)))


def test_scaled_kd_equals_one_minus_lambda_times_task_per_sample():
    sigma = torch.tensor([0.03, 0.2, 0.5, 0.71, 0.99])
    lam = lambda_t(sigma)
    task = torch.tensor([0.9, 1.3, 0.4, 2.0, 0.1])
    kd = torch.tensor([0.02, 5.0, 3.0, 0.7, 40.0])
    torch.testing.assert_close(scaled_kd(task, kd, lam), (1 - lam) * task)
    s = timestep_aware_scaling(task, kd, lam)
    torch.testing.assert_close(s, (lam * task + (1 - lam) * task).mean())  # = E[L_task] in value
    # The clamp: a zero KD loss is a zero term, not NaN.
    assert scaled_kd(task, torch.zeros(5), lam).tolist() == [0.0] * 5
    assert RATIO_EPS == 1e-6


def test_ratio_carries_no_gradient():
    sigma = torch.tensor([0.1, 0.35, 0.8])
    lam = lambda_t(sigma)
    v_s, v_t, target = _rand(3, 2, 4, 4, grad=True), _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    v_task = v_s.detach().clone().requires_grad_(True)  # L_task's own path into the student
    task, kd = task_loss(v_task, target), kd_loss(v_s, v_t)
    (g_scaled,) = torch.autograd.grad(scaled_kd(task, kd, lam).sum(), v_s)
    (g_kd,) = torch.autograd.grad(kd_loss(v_s, v_t), v_s, grad_outputs=torch.ones(3))
    factor = ((1 - lam) * task.detach() / kd.detach()).reshape(3, 1, 1, 1)
    torch.testing.assert_close(g_scaled, factor * g_kd)
    scaled_kd(task, kd_loss(v_s, v_t), lam).sum().backward()
    assert v_task.grad is None  # nothing flows into L_task through the ratio


# ---------------------------------------------------------------------------- the projector psi


def test_projector_is_two_convs_to_the_teacher_grid_and_width_and_learns():
    proj = FeatureProjector(8, 24)  # stride 2: the student's full-resolution map -> the DiT's patch grid
    convs = [m for m in proj.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (2, 2) and convs[1].kernel_size == (1, 1)
    f = _rand(2, 8, 16, 12, grad=True)
    out = proj(f)
    assert out.shape == (2, 24, 8, 6)
    featkd_loss(out, _rand(2, 24, 8, 6, seed=1)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert f.grad.abs().sum() > 0  # and on into the student
    assert proj(f, size=(5, 5)).shape == (2, 24, 5, 5)  # any other grid: resized first
    assert FeatureProjector(8, 24, stride=1)(f).shape == (2, 24, 16, 12)
    assert FeatureProjector(8, 24, stride=4)(f).shape == (2, 24, 4, 3)
    assert FeatureProjector.between(8, 24, (64, 64), (32, 32)).config.stride == 2
    assert FeatureProjector.between(8, 24, (32, 32), (32, 32)).config.stride == 1
    assert FeatureProjector.between(8, 24, (16, 16), (32, 32)).config.stride == 1
    coarse = FeatureProjector.between(8, 24, (4, 4), (8, 8))
    assert coarse(_rand(1, 8, 4, 4), size=(8, 8)).shape == (1, 24, 8, 8)
    assert FeatureProjector(8, 24, hidden_channels=4).conv1.out_channels == 4
    with pytest.raises(ConfigError, match="stride"):
        FeatureProjector(8, 24, stride=0)


def test_projector_saves_and_loads_like_the_other_models(tmp_path):
    torch.manual_seed(0)
    proj = FeatureProjector(8, 24, stride=2)
    proj.save_pretrained(tmp_path / "projector")
    again = FeatureProjector.from_pretrained(tmp_path / "projector")
    f = _rand(1, 8, 8, 8)
    assert again.config.stride == 2
    torch.testing.assert_close(again(f), proj(f))


def test_projector_on_the_tiny_unets_last_transformer_features():
    from snapgen_cli.core.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny")
    c = unet.config
    x = _rand(2, c.in_channels, 8, 8)
    out = unet(x, torch.tensor([500.0, 200.0]), _rand(2, 3, c.context_dim), _rand(2, c.pooled_dim),
               return_features=True)
    proj = FeatureProjector.between(out.features.shape[1], 40, tuple(out.features.shape[-2:]), (4, 4))
    assert proj.config.stride == 2  # stage-1 transformer layers: the latent's grid, the teacher's is half
    featkd_loss(proj(out.features), _rand(2, 40, 4, 4)).mean().backward()
    assert unet.conv_in.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- Eq. 6, Eq. 8, Tab. 3 rows


def _one_pixel():
    """Two samples of one value each: task = (y - s)^2 = [1, 4], kd = (T - s)^2 = [4, 1],
    featkd = (F - P)^2 = [9, 0.25], at sigma 0.5 (lambda 1) and 0.2."""
    s = torch.tensor([[0.0], [1.0]], requires_grad=True)
    y, teacher = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]])
    p = torch.tensor([[0.0], [0.5]], requires_grad=True)
    f_t = torch.tensor([[3.0], [0.0]])
    return s, y, teacher, p, f_t, torch.tensor([0.5, 0.2])


def test_eq6_linear_combination_on_known_values():
    s, y, teacher, p, f_t, sigma = _one_pixel()
    loss, logs = DistillLoss(t_scaling=False, lambda_kd=0.5, lambda_featkd=2.0)(s, y, sigma, teacher, p, f_t)
    assert loss.item() == pytest.approx(2.5 + 0.5 * 2.5 + 2.0 * 4.625)
    assert {k: round(v.item(), 6) for k, v in logs.items() if "/" not in k} == {"task": 2.5, "kd": 2.5, "featkd": 4.625}
    loss.backward()
    # d/ds of mean(task) + 0.5 mean(kd): (-2(y - s) + 0.5 * -2(T - s)) / 2
    torch.testing.assert_close(s.grad, torch.tensor([[-1.0 - 1.0], [-2.0 + 0.5]]))
    torch.testing.assert_close(p.grad, 2.0 * torch.tensor([[-3.0], [0.5]]))  # 2 * -2(F - P) / 2


def test_eq8_scaling_on_known_values():
    s, y, teacher, p, f_t, sigma = _one_pixel()
    lam = lambda_t(sigma)
    loss, logs = DistillLoss(lambda_kd=0.5, lambda_featkd=2.0)(s, y, sigma, teacher, p, f_t)  # lambdas unused
    assert loss.item() == pytest.approx(2 * 2.5)  # each S is E[L_task] in value: Eq. 8 counts it twice
    torch.testing.assert_close(logs["scaled_kd"], ((1 - lam) * torch.tensor([1.0, 4.0])).mean())
    torch.testing.assert_close(logs["scaled_featkd"], logs["scaled_kd"])
    torch.testing.assert_close(logs["lambda"], lam.mean())
    loss.backward()
    task, kd, feat = torch.tensor([1.0, 4.0]), torch.tensor([4.0, 1.0]), torch.tensor([9.0, 0.25])
    d_task, d_kd = torch.tensor([-2.0, -4.0]), torch.tensor([-4.0, 2.0])  # d/ds of (y-s)^2 and (T-s)^2
    expect_s = (2 * lam * d_task + (1 - lam) * task / kd * d_kd) / 2
    torch.testing.assert_close(s.grad.flatten(), expect_s)
    expect_p = (1 - lam) * task / feat * torch.tensor([-6.0, 1.0]) / 2
    torch.testing.assert_close(p.grad.flatten(), expect_p)
    assert p.grad[0].item() == 0.0  # sigma = 0.5: lambda = 1, no teacher supervision


def test_kd_terms_give_exactly_zero_gradient_at_lambda_one():
    b = 3
    sigma = torch.full((b,), 0.5)
    proj = FeatureProjector(4, 6)
    v_s, target, v_t = _rand(b, 2, 4, 4, grad=True), _rand(b, 2, 4, 4, seed=1), _rand(b, 2, 4, 4, seed=2)
    f_s, f_t = _rand(b, 4, 8, 8, seed=3, grad=True), _rand(b, 6, 4, 4, seed=4)
    loss, _ = DistillLoss()(v_s, target, sigma, v_t, proj(f_s), f_t)
    loss.backward()
    ref = v_s.detach().clone().requires_grad_(True)
    (2 * task_loss(ref, target).mean()).backward()  # lambda L_task in each of the two S terms
    assert torch.equal(v_s.grad, ref.grad)
    assert all(torch.count_nonzero(p.grad) == 0 for p in proj.parameters())
    assert torch.count_nonzero(f_s.grad) == 0


@pytest.mark.parametrize(("kd", "featkd", "t_scaling", "logged"), [
    (False, False, False, {"task"}),
    (False, False, True, {"task"}),
    (True, False, False, {"task", "kd"}),
    (True, True, False, {"task", "kd", "featkd"}),
    (True, True, True, {"task", "kd", "featkd", "scaled_kd", "scaled_featkd", "lambda"}),
    (False, True, True, {"task", "featkd", "scaled_featkd", "lambda"}),
])
def test_tab3_rows_are_settings_and_off_terms_are_not_computed(kd, featkd, t_scaling, logged):
    s, y, teacher, p, f_t, sigma = _one_pixel()
    lam = lambda_t(sigma)
    fn = DistillLoss(kd=kd, featkd=featkd, t_scaling=t_scaling, t_bins=0)
    loss, logs = fn(s, y, sigma, teacher if kd else None, p if featkd else None, f_t if featkd else None)
    assert set(logs) == logged
    task = torch.tensor([1.0, 4.0])
    if not kd and not featkd:
        torch.testing.assert_close(loss, task.mean())
    elif t_scaling and kd != featkd:  # one S of Eq. 7
        torch.testing.assert_close(loss, (lam * task + (1 - lam) * task).mean())


def test_missing_inputs_and_bad_weights_are_clear_errors():
    s, y, _, _, _, sigma = _one_pixel()
    with pytest.raises(SnapgenError, match="v_teacher="):
        DistillLoss(featkd=False)(s, y, sigma)
    with pytest.raises(SnapgenError, match="feat_student="):
        DistillLoss(kd=False)(s, y, sigma)
    with pytest.raises(ConfigError, match="lambda_kd"):
        DistillLoss(lambda_kd=-1.0)
    with pytest.raises(ConfigError, match="eps"):
        DistillLoss(eps=0.0)


# ---------------------------------------------------------------------------- Fig. 6: per-t-bin log


def test_tbin_sums_bin_per_sample_terms_by_sigma():
    sigma = torch.tensor([0.05, 0.07, 0.5, 0.99, 1.0, 0.0])
    task = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    logs = tbin_sums(sigma, {"task": task}, bins=10)
    assert set(logs) == {f"tbin/{k}/{i}" for k in ("n", "task") for i in range(10)}  # every bin, zeros too
    assert [logs[f"tbin/n/{i}"].item() for i in range(10)] == [3, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert [logs[f"tbin/task/{i}"].item() for i in range(10)] == [9, 0, 0, 0, 0, 3, 0, 0, 0, 9]


def test_losses_jsonl_aggregates_to_per_bin_means_and_draws_fig6(tmp_path):
    """Three steps logged the way train/loop.py writes them (floats, a phase prefix on one run's
    keys is allowed); the per-bin means equal the direct computation over all samples."""
    fn = DistillLoss(featkd=False)
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "run" / "losses.jsonl"
    path.parent.mkdir()
    all_sigma, all_task, all_kd = [], [], []
    with path.open("w") as f:
        for step in range(1, 4):
            sigma = torch.rand(16, generator=gen)
            v_s, target, v_t = (torch.randn(16, 2, 4, 4, generator=gen) for _ in range(3))
            loss, logs = fn(v_s, target, sigma, v_t)
            all_sigma.append(sigma), all_task.append(task_loss(v_s, target)), all_kd.append(kd_loss(v_s, v_t))
            f.write(json.dumps({"step": step, "loss": loss.item(), **{k: v.item() for k, v in logs.items()}}) + "\n")
    sigma, task, kd = torch.cat(all_sigma), torch.cat(all_task), torch.cat(all_kd)
    means = read_tbins(path)
    idx = (sigma * 10).long().clamp(max=9)
    for i in range(10):
        n = int((idx == i).sum())
        assert means["n"][i] == n
        if n:
            assert means["task"][i] == pytest.approx(task[idx == i].mean().item(), rel=1e-5)
            assert means["kd"][i] == pytest.approx(kd[idx == i].mean().item(), rel=1e-5)
        else:
            assert math.isnan(means["task"][i])
    assert read_tbins(path, start=2, end=2)["n"] == [float((idx[16:32] == i).sum()) for i in range(10)]
    prefixed = [{"step": 1, **{f"distill/{k}": v for k, v in json.loads(line).items() if k != "step"}}
                for line in path.read_text().splitlines()]
    assert read_tbins(prefixed)["n"] == means["n"]

    png = plot_fig6(path, tmp_path / "fig6" / "fig6.png")
    assert png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (640, 400)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank
    with pytest.raises(SnapgenError, match="none of featkd"):
        plot_fig6(path, tmp_path / "x.png", terms=("featkd",))


def test_read_tbins_without_tbin_keys_is_a_clear_error(tmp_path):
    path = tmp_path / "losses.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    with pytest.raises(SnapgenError, match="t_bins"):
        read_tbins(path)
