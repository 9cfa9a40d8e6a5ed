"""Rectified flow (sec. 3.3, Eq. 1-3), DDPM + Heun (sup. H), CFG schedules."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from snapgen_cli.core.flow import (
    DDPM, IMAGENET_VARIED_CFG, Guidance, Objective, RectifiedFlow, guided, make_objective,
    objective_from_scheduler, sample, time_shift,
)
from snapgen_cli.core.unet import build_unet
from snapgen_cli.errors import ConfigError


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_flow_forward_process_and_velocity_target_closed_form():
    flow = RectifiedFlow()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.noisy(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = flow.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    # Moving along the velocity from x_t by -t reaches x_0 (the path is straight).
    torch.testing.assert_close(flow.predict_x0(xt, v, t), x0)
    torch.testing.assert_close(flow.model_timestep(t), torch.tensor([0.0, 250.0, 1000.0]))


def test_logit_normal_timesteps_statistics_and_shift():
    n = 20000
    plain = RectifiedFlow(shift=1.0).sample_timesteps(n, torch.Generator().manual_seed(0))
    logits = torch.logit(plain.double())
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
    assert 0 < plain.min() and plain.max() < 1
    shifted = RectifiedFlow(shift=3.0).sample_timesteps(n, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.median() > 0.7  # shift 3 moves the median from 0.5 to 0.75: lower SNR


def test_per_sample_generators_make_draws_independent_of_batch_split():
    flow, ddpm = RectifiedFlow(), DDPM()
    whole = flow.sample_timesteps(6, _gens(6))
    halves = torch.cat([flow.sample_timesteps(3, _gens(6)[:3]), flow.sample_timesteps(3, _gens(6)[3:])])
    assert torch.equal(whole, halves)
    assert torch.equal(ddpm.sample_timesteps(6, _gens(6)), torch.cat([ddpm.sample_timesteps(1, [g]) for g in _gens(6)]))


def test_time_shift_formula_matches_diffusers_scheduler_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    torch.testing.assert_close(sched.sigmas, time_shift(unshifted, 3.0))
    assert time_shift(0.5, 3.0) == 0.75 and time_shift(0.3, 1.0) == 0.3


def test_inference_grid_is_the_shifted_uniform_grid():
    sched = RectifiedFlow(shift=3.0).scheduler(4)
    expected = [3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(sched.sigmas, torch.tensor(expected))
    torch.testing.assert_close(sched.timesteps, torch.tensor(expected[:-1]) * 1000)


def test_euler_sampler_is_eq3_and_solves_point_mass_exactly():
    """For data x0 = c the exact velocity at (x, sigma) is (x - c) / sigma; Eq. 3 reaches c."""
    c = torch.tensor([1.5, -2.0, 0.25]).reshape(1, 3, 1, 1)
    calls = []

    def velocity(x, t, cond):
        calls.append(t.clone())
        return (x - c) / (t / 1000).reshape(-1, 1, 1, 1)

    noise = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample(velocity, noise, steps=7, cond=None)
    torch.testing.assert_close(out, c.expand_as(out), atol=1e-5, rtol=0)
    assert len(calls) == 7 and calls[0].shape == (2,)

    # One step of the sampler equals Eq. 3 in closed form for an arbitrary velocity.
    v = torch.randn(2, 3, 1, 1)
    one = sample(lambda x, t, cond: v, noise, steps=1, cond=None)
    torch.testing.assert_close(one, noise + (0.0 - 1.0) * v)


def _tiny_unet_fn():
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    ctx = torch.randn(2, 5, 64)
    pooled = torch.randn(2, 64)
    cond, uncond = (ctx, pooled), (torch.zeros_like(ctx), torch.zeros_like(pooled))

    def fn(x, t, c):
        return unet(x, t, c[0], c[1]).sample

    return fn, cond, uncond


def test_guidance_one_is_a_single_conditional_pass_and_cfg_one_batched_pass():
    fn, cond, uncond = _tiny_unet_fn()
    batches = []

    def counted(x, t, c):
        batches.append(x.shape[0])
        return fn(x, t, c)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    guided_out = sample(counted, noise, 3, cond, uncond, Guidance(scale=1.0))
    plain = sample(fn, noise, 3, cond)
    assert batches == [2] * 3
    torch.testing.assert_close(guided_out, plain)

    batches.clear()
    cfg = sample(counted, noise, 3, cond, uncond, Guidance(scale=4.0))
    assert batches == [4] * 3  # one UNet call per step on [uncond; cond]
    assert not torch.allclose(cfg, plain)


def test_batched_cfg_equals_the_two_call_form():
    """u + w (c - u) from one batched call on [uncond; cond] equals two separate calls."""
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    ctx, pooled = torch.randn(2, 5, 64), torch.randn(2, 64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    cond = (ctx, pooled, mask)
    uncond = (torch.zeros_like(ctx), torch.zeros_like(pooled), torch.ones_like(mask))

    def fn_masked(x, t, c):
        return unet(x, t, c[0], c[1], encoder_attention_mask=c[2]).sample

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        two_calls = fn_masked(x, t, uncond) + 3.5 * (fn_masked(x, t, cond) - fn_masked(x, t, uncond))
        batched = guided(fn_masked, x, t, cond, uncond, 3.5)
    torch.testing.assert_close(batched, two_calls, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, fn_masked(x, t, cond))  # guidance changed the prediction
    with pytest.raises(TypeError, match="cannot batch"):
        guided(fn_masked, x, t, "c", "u", 2.0)


def test_guidance_interval_and_varied_cfg_schedule():
    g = Guidance(scale=2.0, interval=(1, 3))
    assert [g.scale_at(i, 5) for i in range(5)] == [1.0, 2.0, 2.0, 1.0, 1.0]
    ramp = [IMAGENET_VARIED_CFG.scale_at(i, 30) for i in range(30)]
    assert ramp[:10] == [1.0] * 10
    assert ramp[10] == pytest.approx(1.1) and ramp[29] == pytest.approx(5.4)
    assert ramp[20] == pytest.approx(1.1 + 4.3 * 10 / 19)
    assert all(b > a for a, b in zip(ramp[10:], ramp[11:]))
    # Outside the interval the sampler skips the unconditional branch (c = 1, u = 0 below).
    passes = []
    sample(_recorder(passes), torch.zeros(1, 1), 5, torch.ones(1, 1), torch.zeros(1, 1), g)
    assert passes == [[1.0], [0.0, 1.0], [0.0, 1.0], [1.0], [1.0]]
    with pytest.raises(ConfigError, match="interval"):
        Guidance(scale=2.0, interval=(3, 3))
    with pytest.raises(ValueError, match="uncond"):
        sample(lambda x, t, c: x, torch.zeros(1, 1), 2, torch.ones(1, 1), None, Guidance(scale=2.0))


def _recorder(passes):
    """A model_fn that records the condition values of each call's batch."""
    return lambda x, t, c: passes.append(c.flatten().tolist()) or torch.zeros_like(x)


def test_ddpm_add_noise_and_epsilon_target():
    ddpm = DDPM()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()[t].reshape(-1, 1, 1, 1)
    xt = ddpm.noisy(x0, eps, t)
    torch.testing.assert_close(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(xt, ref.add_noise(x0, eps, t))
    assert torch.equal(ddpm.target(x0, eps, t), eps)
    torch.testing.assert_close(ddpm.predict_x0(xt, eps, t), x0, atol=1e-4, rtol=1e-4)
    steps = ddpm.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert steps.dtype == torch.int64 and steps.min() >= 0 and steps.max() <= 999
    assert abs(steps.float().mean() - 499.5) < 15
    assert torch.equal(ddpm.model_timestep(t), t.float())


def test_heun_sampler_runs_30_steps_and_recovers_point_mass():
    """With the exact epsilon for data x0 = c, Heun's 30 steps land on c."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sigma_train = ((1 - abar) / abar).sqrt().numpy()  # Heun's sigma at each integer step
    c = torch.tensor([0.5, -1.0]).reshape(1, 2)
    steps_seen = []

    def eps_fn(x_in, t, cond):
        # Heun feeds x / sqrt(sigma^2 + 1) with x = c + sigma * eps, at a fractional t.
        steps_seen.append(float(t[0]))
        sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(1000), sigma_train)).float()[:, None]
        return (x_in * (sigma**2 + 1).sqrt() - c) / sigma

    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    out = sample(eps_fn, noise, 30, None, objective=DDPM())
    assert len(steps_seen) == 2 * 30 - 1 and steps_seen[0] == pytest.approx(999.0)
    torch.testing.assert_close(out, c.expand_as(out), atol=1e-4, rtol=0)


def test_heun_guidance_counts_sampling_steps_not_model_calls():
    passes = []
    sample(_recorder(passes), torch.zeros(1, 1), 3, torch.ones(1, 1), torch.zeros(1, 1),
           Guidance(scale=2.0, interval=(1, 2)), objective=DDPM())
    # Heun: step 0 = calls 0-1, step 1 = calls 2-3 (guided), step 2 = call 4 (last step is first order).
    assert passes == [[1.0], [1.0], [0.0, 1.0], [0.0, 1.0], [1.0]]


def test_make_objective_and_protocol():
    assert isinstance(make_objective("flow"), Objective) and isinstance(make_objective("ddpm"), Objective)
    assert make_objective("flow", shift=1.0).shift == 1.0
    with pytest.raises(ConfigError, match="objective: expected one of flow, ddpm, got 'edm'"):
        make_objective("edm")
    with pytest.raises(ConfigError, match="shift"):
        RectifiedFlow(shift=0)


def test_saved_sampler_gives_back_its_objective():
    """A pipeline stores the objective as its scheduler; reading it back gives the same objective."""
    for objective in (RectifiedFlow(shift=2.5), DDPM(beta_start=2e-4)):
        back = objective_from_scheduler(objective.scheduler(1))
        assert type(back) is type(objective)
        assert (back.shift if isinstance(back, RectifiedFlow) else back.beta_start) == pytest.approx(
            objective.shift if isinstance(objective, RectifiedFlow) else objective.beta_start)
    with pytest.raises(ConfigError, match="not a SnapGen sampler"):
        objective_from_scheduler(DDPMScheduler())
