"""Issue 17's fast paths, checked on the CPU (``core/speed.py``): the pipeline's ``--dtype`` and
``--compile``, the timings ``snapgen generate`` reports, and the MFU arithmetic of the training loop.

A tiny pipeline dir as a training stage writes one: a random ``tiny`` SnapGen UNet, a tiny random
CLIP text encoder, the ``tiny`` preset of the tiny decoder (sec. 3.2). 64 px images, 3 steps, CFG 4.5.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from snapgen_cli.core import denoiser
from snapgen_cli.core.decoder import build_decoder
from snapgen_cli.core.flow import RectifiedFlow
from snapgen_cli.core.pipeline import SnapGenPipeline, load_pipeline
from snapgen_cli.core.speed import (
    compile_cache_dir,
    inference_dtype,
    mfu,
    mfu_report,
    peak_bf16_flops,
    training_flops_per_sample,
)
from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip
from snapgen_cli.core.unet import build_unet, unet_config
from snapgen_cli.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread

SIZE, STEPS = 64, 3
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast")
    make_tiny_clip(root / "clip", hidden_size=32)
    clip = EncoderSpec(name="clip_l", kind="clip", path=str(root / "clip"), max_length=16, layer="penultimate",
                       role="channel", pooled="projection")
    torch.manual_seed(0)
    unet = build_unet("tiny", block_channels=(16, 32, 32), attention_head_dim=16, context_dim=32, pooled_dim=32,
                      in_channels=16, out_channels=16)
    SnapGenPipeline(unet=unet, scheduler=RectifiedFlow().scheduler(1), text_encoder=TextEncoderStack([clip]),
                    decoder=build_decoder("tiny"), resolution=SIZE,
                    latent=dict(channels=16, downsample=8)).save_pretrained(root / "pipe")
    return root / "pipe"


def _pixels(pipe) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.5, generator=gens).images
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def _latents(pipe) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.5, generator=gens, output_type="latent").images


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def fp32_pixels(pipe_dir) -> np.ndarray:
    return _pixels(load_pipeline(pipe_dir))


@pytest.fixture(scope="module")
def fp32_latents(pipe_dir) -> torch.Tensor:
    return _latents(load_pipeline(pipe_dir))


def test_defaults_on_cpu_are_fp32_eager_and_on_cuda_bf16_compiled():
    assert inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype("auto", "cuda") == torch.bfloat16
    assert inference_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match=r"^--dtype: expected auto, fp32, bf16, fp16, got 'fp8'$"):
        inference_dtype("fp8", "cpu")


def test_bf16_runs_and_is_close_to_fp32(pipe_dir, fp32_pixels, fp32_latents):
    pipe = load_pipeline(pipe_dir, dtype="bf16")
    assert pipe.unet.dtype == pipe.decoder.dtype == torch.bfloat16
    assert pipe.speed_settings == {"dtype": "bf16", "compile": False, "compile_mode": None}
    latents = _latents(pipe)
    assert latents.dtype == torch.float32  # the sampler's state stays fp32
    # Thresholds: bf16 keeps 8 mantissa bits (0.4% per rounding). Measured here: latents 0.6% from
    # fp32 after 3 guided steps, images at 62.6 dB PSNR (max one 8-bit level; the random tiny
    # decoder's images are nearly flat, so the latents are the sharper check).
    assert 0 < _rel(latents, fp32_latents) < 0.02
    assert _psnr(_pixels(pipe), fp32_pixels) > 50.0


def test_the_default_load_is_the_saved_fp32_pipeline(pipe_dir, fp32_pixels):
    pipe = load_pipeline(pipe_dir, dtype="auto", compile=None)  # the CPU defaults: fp32, eager
    assert pipe.speed_settings == {"dtype": "fp32", "compile": False, "compile_mode": None}
    np.testing.assert_array_equal(_pixels(pipe), fp32_pixels)


@pytest.mark.slow  # inductor compiles the UNet and the decoder with a C++ compiler: ~80 s on one core
def test_compile_gives_the_eager_image_and_caches_its_kernels(pipe_dir, fp32_pixels, fp32_latents, tmp_path,
                                                              monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "snapgen" / "inductor"
    from torch._dynamo.utils import counters

    pipe = load_pipeline(pipe_dir, compile=True)
    assert pipe.speed_settings == {"dtype": "fp32", "compile": True, "compile_mode": "default"}
    graphs = counters["stats"]["unique_graphs"]
    latents = _latents(pipe)
    # The UNet compiles once for its 3 steps at one shape: one graph, no recompilation (a RoPE table
    # cached from inside the graph used to force a second compilation of the whole model).
    assert counters["stats"]["unique_graphs"] - graphs == 1
    # Tolerance: inductor fuses and reorders fp32 arithmetic, float rounding only: latents within
    # 1e-5 (relative; measured 3e-7), and a pixel moves by at most one 8-bit level, rarely (4e-5 of them).
    assert _rel(latents, fp32_latents) < 1e-5
    got = _pixels(pipe)
    assert np.abs(got - fp32_pixels).max() <= 1.0
    assert np.mean(got != fp32_pixels) < 0.01
    assert any(p.is_file() for p in (tmp_path / "snapgen" / "inductor").rglob("*"))  # a second run finds them


def test_generate_reports_settings_and_timings(pipe_dir, run_cli, tmp_path):
    code, out, err = run_cli("generate", *PROMPTS, "--checkpoint", pipe_dir, "--steps", 2, "--out", tmp_path / "g",
                             "--no-grid", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert (res["dtype"], res["compile"]) == ("fp32", False)
    assert set(res["timings"]) == {"text_encoding_s", "denoising_s", "decoding_s"}
    assert all(v > 0 for v in res["timings"].values())
    assert res["samples_per_s"] == pytest.approx(2 / (res["timings"]["denoising_s"] + res["timings"]["decoding_s"]))


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "Invalid value for '--dtype': 'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'."),
    (["--backend", "onnxruntime", "--dtype", "bf16"], "error: --dtype/--compile: the onnxruntime backend runs the "
                                                      "exported models; choose their precision with --onnx-precision"),
])
def test_bad_values_are_one_line_errors(pipe_dir, run_cli, tmp_path, args, message):
    code, _, err = run_cli("generate", "a cat", "--checkpoint", pipe_dir, "--out", tmp_path / "x", *args)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(message)


def test_eval_takes_the_same_flags(run_cli):
    code, out, _ = run_cli("eval", "--help")
    assert code == 0 and "--dtype [auto|fp32|bf16|fp16]" in out and "--compile / --no-compile" in out


# ----------------------------------------------------------------------------- MFU


def test_mfu_arithmetic_with_a_stated_peak():
    # 1 GMAC forward, 100 samples/s on a 1 TFLOP/s device: 2 FLOPs/MAC x 3 (fwd + bwd) = 0.6,
    # and with gradient checkpointing one more forward: 2 x 4 = 0.8.
    assert training_flops_per_sample(10**9, False) == 6 * 10**9
    assert mfu(10**9, 100.0, 1e12, gradient_checkpointing=False) == pytest.approx(0.6)
    assert mfu(10**9, 100.0, 1e12, gradient_checkpointing=True) == pytest.approx(0.8)
    rep = mfu_report(10**9, 100.0, torch.device("cpu"), True, peak_flops=1e12)
    assert rep["mfu"] == pytest.approx(0.8) and rep["flops_per_sample"] == 8 * 10**9
    assert mfu_report(10**9, 100.0, torch.device("cpu"), True) == {
        "mfu": None, "note": "MFU is reported on CUDA only (device cpu)"}


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H200", 989.4e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", None),
                                        ("NVIDIA H100 PCIe", None), ("Tesla T4", None)])
def test_peak_table(name, peak):
    assert peak_bf16_flops(name) == peak


def test_forward_macs_is_bench_devices_count():
    # The MFU's MACs: one forward at a 128x128 latent (1024^2) with the student's 333 text tokens and
    # the mask the training loop passes, against bench-device's count (no mask; a mask adds no MACs):
    # 645.1 G (README's model figures; the paper: ~647 G).
    from snapgen_cli.stages.bench_device import Config, meta_figures

    macs = denoiser.forward_macs(unet_config("snapgen-t2i"), 128, types.SimpleNamespace(seq_len=333))
    assert macs == meta_figures(Config(model="unet", preset="snapgen-t2i", resolution=1024, runs=0), "unet")["macs"]
    assert macs == pytest.approx(645.1e9, rel=1e-4)
