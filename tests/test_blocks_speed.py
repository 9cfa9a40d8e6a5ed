"""The CPU speed rewrites of core/blocks.py compute what the plain formulations compute.

Each rewritten block is compared with the formulation it replaced (written out here from
nn.Linear / nn.RMSNorm / a padded nn.Conv2d / chunked GEGLU calls), in float64 so that only
float reordering can differ, forward and gradients; a negative control shows each comparison
can fail.
"""

import pytest
import torch
import torch.nn.functional as F

from snapgen_cli.core.blocks import (
    Attention,
    DepthwiseConv2d,
    FeedForward,
    RMSNorm,
    _RMSNormFunction,
    apply_rope,
    attention_bias,
    rope_2d,
)


def _reference_attention(a: Attention, x, context=None, mask=None, rope=None):
    """The previous Attention.forward: three nn.Linear calls, QK RMSNorm on the (B, heads, N, D)
    transpose, RoPE there, MQA as a broadcast of the one K/V head, a boolean SDPA mask."""
    b, n, _ = x.shape
    ctx = x if context is None else context
    q = a.to_q(x).view(b, n, a.heads, a.head_dim).transpose(1, 2)
    k = a.to_k(ctx).view(b, ctx.shape[1], a.kv_heads, a.head_dim).transpose(1, 2)
    v = a.to_v(ctx).view(b, ctx.shape[1], a.kv_heads, a.head_dim).transpose(1, 2)
    if a.norm_q is not None:
        q = F.rms_norm(q, (a.head_dim,), a.norm_q.weight, a.norm_q.eps)
        k = F.rms_norm(k, (a.head_dim,), a.norm_k.weight, a.norm_k.eps)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if a.kv_heads != a.heads:
        k, v = k.expand(b, a.heads, -1, -1), v.expand(b, a.heads, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return a.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _grads(module, out, *inputs):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(out.square().sum(), [*params, *inputs])


def _assert_same(module, new, ref, *inputs):
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)
    for g_new, g_ref in zip(_grads(module, new, *inputs), _grads(module, ref, *inputs), strict=True):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mqa", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_equals_the_plain_formulation(mqa, qk_norm):
    torch.manual_seed(0)
    a = Attention(64, None, head_dim=16, mqa=mqa, qk_norm=qk_norm).double()
    c = Attention(64, 48, head_dim=16, mqa=mqa, qk_norm=qk_norm).double()
    x = torch.randn(3, 12, 64, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(3, 7, 48, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3], [5]])
    cos, sin = rope_2d(3, 4, 16, 10000.0)
    rope = (cos.double(), sin.double())
    _assert_same(a, a(x, rope=rope), _reference_attention(a, x, rope=rope), x)  # self-attention + RoPE
    _assert_same(c, c(x, ctx, mask), _reference_attention(c, x, ctx, mask), x, ctx)  # masked cross-attention
    bias = attention_bias(mask, torch.float64)  # the bias the UNet makes once gives the same result
    torch.testing.assert_close(c(x, ctx, bias), c(x, ctx, mask), rtol=0, atol=0)
    torch.testing.assert_close(c(x, ctx, mask.long()), c(x, ctx, mask), rtol=0, atol=0)  # a 0/1 mask
    # negative controls: the comparisons see RoPE and the mask
    assert not torch.allclose(a(x, rope=rope), _reference_attention(a, x), atol=1e-3)
    assert not torch.allclose(c(x, ctx, mask), _reference_attention(c, x, ctx), atol=1e-3)


def test_mqa_fold_keeps_heads_and_tokens_in_place():
    """Negative control of the fold: the same attention with the heads' query weights permuted
    gives a different output (a fold that mixed heads and tokens up would not see it)."""
    torch.manual_seed(0)
    a = Attention(64, head_dim=16, mqa=True).double()
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    ref = _reference_attention(a, x)
    with torch.no_grad():
        a.to_q.weight.copy_(a.to_q.weight.view(4, 16, 64).flip(0).reshape(64, 64))
    assert not torch.allclose(a(x), ref, atol=1e-3)


def test_rmsnorm_training_path_equals_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 5, 3, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)  # float32: bitwise the same forward
    xd = x.double().requires_grad_()
    ours64, ref64 = RMSNorm(16, eps=1e-6).double(), torch.nn.RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        ours64.weight.copy_(ours.weight)
        ref64.weight.copy_(ours.weight)
    grads = torch.autograd.grad((ours64(xd) * xd.detach().cos()).sum(), [ours64.weight, xd])
    grads_ref = torch.autograd.grad((ref64(xd) * xd.detach().cos()).sum(), [ref64.weight, xd])
    for g_new, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-12, atol=1e-12)
    w = ours64.weight.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: _RMSNormFunction.apply(t, w, 1e-6),
                                    (xd[:1, :2, :1].detach().requires_grad_(), w))
    # inference and half precision run nn.RMSNorm itself
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.bfloat16()(x.bfloat16()), ref.bfloat16()(x.bfloat16()), rtol=0, atol=0)


def test_depthwise_conv_small_maps_equal_the_padded_conv():
    torch.manual_seed(0)
    for size in (1, 2, 4):
        for stride in (1, 2):
            dw = DepthwiseConv2d(8, stride)
            x = torch.randn(3, 8, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
            new, ref = dw(x), F.conv2d(x, dw.weight, dw.bias, stride, 1, 1, 8)
            torch.testing.assert_close(new, ref, rtol=0, atol=0)
            for g_new, g_ref in zip(_grads(dw, new, x), _grads(dw, ref, x), strict=True):
                torch.testing.assert_close(g_new, g_ref, rtol=1e-5, atol=1e-6)


def test_split_geglu_equals_the_chunked_projection():
    torch.manual_seed(0)
    ff = FeedForward(24, 3, gated=True).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    h, gate = ff.proj_in(x).chunk(2, dim=-1)
    _assert_same(ff, ff(x), ff.proj_out(h * F.gelu(gate)), x)
    value, _ = ff.proj_in(x).chunk(2, dim=-1)  # negative control: gating by the other half differs
    assert not torch.allclose(ff(x), ff.proj_out(gate * F.gelu(value)))


def test_train_step_benchmark_times_the_demo_finetune_unet_against_a_same_size_diffusers_unet():
    """benchmarks/bench_train_step.py reads the model, batch, latent and text shapes from the demo
    recipe (the dry-run plan's 2,617,604 parameters) and its diffusers UNet stays within 5% of
    that model's parameters and MACs."""
    import importlib.util
    from pathlib import Path

    from snapgen_cli.core.unet import build_unet

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setup = bench.demo_setup(bench.DEMO_RECIPE, "finetune-64")
    assert setup == dict(stage="finetune-64", model="tiny", batch=32, resolution=64, latent=8, latent_channels=4,
                         tokens=16, context_dim=384, pooled_dim=384)
    kw = dict(in_channels=4, out_channels=4, context_dim=384, pooled_dim=384)
    ours = bench.meta_macs(lambda: build_unet("tiny", **kw), True, setup)
    theirs = bench.meta_macs(lambda: bench.diffusers_unet(4, 384), False, setup)
    with torch.device("meta"):
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters())
                            for m in (build_unet("tiny", **kw), bench.diffusers_unet(4, 384)))
    assert n_ours == 2_617_604
    assert abs(n_theirs / n_ours - 1) < 0.05 and abs(theirs / ours - 1) < 0.05, (n_theirs, theirs, ours)


def test_train_step_benchmark_steady_allocator_stops_the_page_faults_of_freed_activations():
    """``--allocator steady`` (glibc mallopt) keeps freed blocks mapped: twenty live 786 kB tensors
    (the tiny UNet's stage-1 GEGLU size) allocated and freed again fault no page in once warm. The
    negative control pins glibc's default thresholds (128 kB, without the dynamic raise that makes a
    process's faults depend on what it allocated before): every block is mapped and faulted in anew."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    script = (
        "import sys, torch; sys.path.insert(0, %r); import bench_train_step as b\n"
        "if sys.argv[1] == 'steady':\n"
        "    assert b.steady_allocator()\n"
        "else:\n"
        "    assert b.malloc_thresholds(mmap=128 << 10, trim=128 << 10)\n"
        "def churn():\n"
        "    xs = [torch.empty(32, 64, 96).fill_(1.0) for _ in range(20)]\n"
        "    del xs\n"
        "for _ in range(3): churn()\n"
        "f0 = b._minor_faults()\n"
        "for _ in range(10): churn()\n"
        "print((b._minor_faults() - f0) / 10)\n"
    ) % str(bench)
    faults = {mode: float(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                         check=True).stdout.split()[-1]) for mode in ("steady", "pinned")}
    assert faults["steady"] < 10, faults
    assert faults["pinned"] > 1000, faults  # 20 x 192 pages of 4 kB faulted in again
