"""The distillation teacher (sec. 3.3, Eq. 4-5): presets vs. the published sizes, loading,
the output and last-block feature targets, and that the teacher stays frozen."""

import pytest
import torch
from torch import nn

from snapgen_cli.core import denoiser, text
from snapgen_cli.core.teacher import (
    PUBLISHED_PARAMS,
    JointAttnProcessor,
    build_teacher,
    check_teacher,
    count_teacher_params,
    data_overrides,
    freeze,
    load_teacher,
    teacher_config,
    teacher_forward,
    teacher_head,
    use_joint_attn_processor,
)
from snapgen_cli.errors import ConfigError

# Exact counts on the meta device: weights + the positional table the checkpoints hold.
EXACT = {"sd35-large": 8_146_280_768, "sd35-medium": 2_469_663_936}


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return freeze(build_teacher("tiny", **kw))


def _inputs(b=2, c=4, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g), torch.tensor([120.0, 870.0][:b]),
            torch.randn(b, 7, 64, generator=g), torch.randn(b, 64, generator=g))


@pytest.mark.parametrize("preset", ["sd35-large", "sd35-medium"])
def test_presets_match_published_sizes(preset):
    with torch.device("meta"):
        model = build_teacher(preset)
    n = count_teacher_params(model)
    assert n == EXACT[preset]
    # The published figures have one decimal (in B): the count rounds to them; within 2%.
    assert round(n / 1e9, 1) == PUBLISHED_PARAMS[preset] / 1e9
    assert abs(n / PUBLISHED_PARAMS[preset] - 1) < 0.02
    c = model.config
    assert c.caption_projection_dim == c.num_attention_heads * c.attention_head_dim == model.inner_dim
    assert (c.in_channels, c.joint_attention_dim, c.pooled_projection_dim, c.qk_norm) == (16, 4096, 2048, "rms_norm")


def test_sd35_presets_take_the_teacher_text_layout():
    layout = text.TextLayout.from_specs(text.teacher())  # declared widths: no weights loaded
    assert data_overrides(layout, 16) == dict(in_channels=16, out_channels=16, joint_attention_dim=4096,
                                              pooled_projection_dim=2048)
    with torch.device("meta"):
        check_teacher(build_teacher("sd35-large"), layout, 16)
        check_teacher(build_teacher("sd35-medium"), layout, 16)
        with pytest.raises(ConfigError) as exc:
            check_teacher(build_teacher("sd35-large"), text.TextLayout.from_specs(text.student()), 4)
    msg = str(exc.value)
    assert "\n" not in msg and "--teacher" in msg and "in_channels 16 (data: 4)" in msg
    assert "joint_attention_dim 4096 (data: 2304)" in msg


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="sd35-large"):
        teacher_config("sd4")


def test_tiny_is_small_and_takes_data_widths():
    model = build_teacher("tiny", in_channels=16, out_channels=16, joint_attention_dim=96, pooled_projection_dim=80)
    assert 2e5 < count_teacher_params(model) < 2e6
    assert model.pos_embed.proj.in_channels == 16 and model.context_embedder.in_features == 96
    assert model.proj_out.out_features == 2 * 2 * 16


def test_tiny_forward_shapes_and_dtypes():
    model = _tiny()
    x, t, ctx, pooled = _inputs(h=16, w=8)  # non-square: rows and columns must not swap
    v, f = teacher_forward(model, x, t, ctx, pooled)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert f.shape == (2, model.inner_dim, 8, 4) and f.dtype == torch.float32
    assert torch.equal(v, model(x, ctx, pooled, t).sample)  # the plain forward's output, unchanged
    v2, none = teacher_forward(model, x, 500.0, ctx, pooled, return_features=False)  # a scalar timestep
    assert none is None and v2.shape == x.shape
    bf = _tiny().to(torch.bfloat16)  # inputs cast to the teacher's dtype, outputs float32
    vb, fb = teacher_forward(bf, x, t, ctx, pooled)
    assert vb.dtype == fb.dtype == torch.float32
    assert (vb - v).abs().max() < 0.1 * v.abs().max()


@pytest.mark.parametrize("hw", [(16, 16), (16, 8)])
def test_last_block_feature_through_the_head_reproduces_the_output(hw):
    model = _tiny()
    x, t, ctx, pooled = _inputs(h=hw[0], w=hw[1])
    v, f = teacher_forward(model, x, t, ctx, pooled)
    torch.testing.assert_close(teacher_head(model, f, t, pooled), v, rtol=1e-5, atol=1e-5)

    def err(feature):
        return (teacher_head(model, feature, t, pooled) - v).abs().max().item()

    # Negative control: one block earlier is not the feature the head turns into the output --
    # off by >1e-2 (the last block's residual update; random weights), 1000x the tolerance above.
    _, f_early = teacher_forward(model, x, t, ctx, pooled, layer=-2)
    assert f_early.shape == f.shape and err(f_early) > 1e-2
    if hw[0] == hw[1]:  # nor is the same feature on a transposed grid (column-major tokens)
        assert err(f.transpose(2, 3)) > 1e-1


def test_hook_is_removed_after_each_call():
    model = _tiny()
    x, t, ctx, pooled = _inputs()

    def hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    assert hooks() == 0
    teacher_forward(model, x, t, ctx, pooled)
    assert hooks() == 0
    _, f = teacher_forward(model, x, t, ctx, pooled, return_features=False)
    assert f is None and hooks() == 0
    with pytest.raises(RuntimeError):  # a failing forward (wrong context width) leaves no hook either
        teacher_forward(model, x, t, torch.randn(2, 7, 65), pooled)
    assert hooks() == 0


def test_load_round_trip_is_frozen(tmp_path):
    model = build_teacher("tiny")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    x, t, ctx, pooled = _inputs()
    want, _ = teacher_forward(freeze(model), x, t, ctx, pooled)
    for where in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # pipeline dir or the transformer dir
        loaded = load_teacher(where)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert loaded.dtype == torch.float32  # CPU default
        torch.testing.assert_close(teacher_forward(loaded, x, t, ctx, pooled)[0], want, rtol=0, atol=0)
    assert load_teacher(tmp_path / "pipe", dtype="bfloat16").dtype == torch.bfloat16


def test_offload_gives_the_same_outputs(tmp_path):
    build_teacher("tiny").save_pretrained(tmp_path / "t")
    x, t, ctx, pooled = _inputs()
    v, f = teacher_forward(load_teacher(tmp_path / "t"), x, t, ctx, pooled)
    off = load_teacher(tmp_path / "t", offload=True, device="cpu")
    assert off.device.type == "meta"  # weights live in the offload map, streamed in at each call
    v2, f2 = teacher_forward(off, x, t, ctx, pooled)
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(f2, f)
    torch.testing.assert_close(teacher_head(off, f2, t, pooled), v)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
@pytest.mark.parametrize("where, reason", [
    ("missing", "no such directory"),  # a missing dir
    ("stabilityai/stable-diffusion-3.5-large", "cannot load"),  # a hub id, offline (conftest) and not cached
    ("unet", "its config is a SnapGenUNet, not an SD3Transformer2DModel"),  # another model's dir
])
def test_load_failures_are_one_line_naming_the_option(tmp_path, where, reason):
    path = where if "/" in where else str(tmp_path / where)
    if where == "unet":
        from snapgen_cli.core.unet import build_unet

        build_unet("tiny").save_pretrained(path)
    with pytest.raises(ConfigError) as exc:
        load_teacher(path)
    msg = str(exc.value)
    assert "\n" not in msg and "pass --teacher" in msg and repr(path) in msg and reason in msg
    assert exc.value.exit_code == 2


def test_teacher_gets_no_gradients():
    teacher = _tiny()
    x, t, ctx, pooled = _inputs()
    torch.manual_seed(2)
    student = nn.Conv2d(4, 4, 3, padding=1)
    projector = nn.Sequential(nn.Conv2d(4, 16, 1), nn.Conv2d(16, teacher.inner_dim, 2, stride=2))  # psi, Eq. 5
    v_t, f_t = teacher_forward(teacher, x, t, ctx, pooled)
    assert not v_t.requires_grad and not f_t.requires_grad
    v = student(x)
    loss = (v - v_t).pow(2).mean() + (projector(v) - f_t).pow(2).mean()  # Eq. 4 + Eq. 5
    loss.backward()
    assert all(p.grad is not None for p in [*student.parameters(), *projector.parameters()])
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # grad=True: gradients reach the inputs through the frozen teacher (a critic), never its weights.
    xg = x.clone().requires_grad_(True)
    v_g, f_g = teacher_forward(teacher, xg, t, ctx, pooled, grad=True)
    (v_g.square().mean() + f_g.square().mean()).backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("dual", [(), (0,)], ids=["mmdit", "mmdit-x"])
def test_joint_attn_processor_is_diffusers_function(dual, tmp_path):
    """The teacher's attention processor (QK norms before the head transpose, the fused RMSNorm
    backward on the CPU) computes diffusers' JointAttnProcessor2_0: the same forward bits, with
    and without autograd, and the same gradients up to float rounding; the builders install it."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.manual_seed(0)
    ref = build_teacher("tiny", dual_attention_layers=dual, num_layers=2)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in ref.attn_processors.values())
    ours = use_joint_attn_processor(build_teacher("tiny", dual_attention_layers=dual, num_layers=2))
    ours.load_state_dict(ref.state_dict())
    assert {type(p) for p in ours.attn_processors.values()} == {JointAttnProcessor}
    x, t, ctx, pooled = _inputs()

    def run(model):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                     return_dict=False)[0]

    with torch.no_grad():
        assert torch.equal(run(ours), run(ref))
    out_ours, out_ref = run(ours), run(ref)
    assert torch.equal(out_ours, out_ref)
    (out_ours * out_ref.detach()).sum().backward()
    (out_ref * out_ref.detach()).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    norm_grads = [b.grad for name, b in ref.named_parameters() if "norm_q" in name or "norm_added_k" in name]
    assert norm_grads and all(g.abs().sum() > 0 for g in norm_grads)  # the QK norms are on the checked path
    # installed wherever a DiT is built or loaded
    assert {type(p) for p in denoiser.build(dict(ref.config)).attn_processors.values()} == {JointAttnProcessor}
    ref.save_pretrained(tmp_path / "dit")
    assert {type(p) for p in denoiser.load(tmp_path / "dit").attn_processors.values()} == {JointAttnProcessor}
    assert {type(p) for p in load_teacher(tmp_path / "dit", subfolder=None).attn_processors.values()} == {
        JointAttnProcessor}
