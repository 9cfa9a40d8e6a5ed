"""GPU throughput of the SnapGen UNet + tiny decoder (run on a CUDA machine).

Measures, side by side in one process:

* generation throughput at 1024^2 through the shipped pipeline (``SnapGenPipeline``, what
  ``snapgen generate`` runs): 28 Flow-Euler steps with the shift-3 grid and classifier-free
  guidance (both branches batched into one UNet call per step), then the tiny decoder, in
  samples/s. Text encoding is timed apart (``encode_prompt``): with ``--text-encoders
  stand-in`` (the default: no CLIP/Gemma weights needed) the encoders are random 2-layer
  models with the real widths, so their time is reported but is not the real encoders'.
  The paper reports 1.04 samples/s on one A100 with the largest practical batch;
* training throughput (forward + backward + AdamW step, bf16 autocast, gradient
  checkpointing as in sup. G) at 512^2 and 1024^2, in samples/s, with peak memory;
* forward latency of the SnapGen UNet vs. the SDXL UNet, and of the tiny decoder vs. the
  SD3 decoder, at 1024^2 in bf16, with their MAC ratios.

Random UNet / decoder weights (the figures do not depend on them). One JSON object on stdout.

    python benchmarks/gpu_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from snapgen_cli.stages.bench_device import Config, build_target, meta_figures


def _timed(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / runs


def _unet_inputs(model, batch: int, latent: int, tokens: int, dt):
    c = model.config
    dev = "cuda"
    return (torch.randn(batch, c.in_channels, latent, latent, device=dev, dtype=dt), torch.full((batch,), 500.0, device=dev),
            torch.randn(batch, tokens, c.context_dim, device=dev, dtype=dt), torch.randn(batch, c.pooled_dim, device=dev, dtype=dt))


def stand_in_text_encoders(root: Path) -> list:
    """Random 2-layer CLIP-L / CLIP-G / Gemma-2 stand-ins with the real widths and lengths (the
    student layout: context (333, 2304), pooled 2048), saved where their specs point."""
    from snapgen_cli.core.text import EncoderSpec, make_tiny_clip, make_tiny_gemma

    make_tiny_clip(root / "clip_l", hidden_size=768, num_layers=2, num_heads=12)
    make_tiny_clip(root / "clip_g", hidden_size=1280, num_layers=2, num_heads=20)
    make_tiny_gemma(root / "gemma", hidden_size=2304, num_layers=2)
    clip = dict(kind="clip", max_length=77, layer="penultimate", role="channel", pooled="projection")
    return [EncoderSpec(name="clip_l", path=str(root / "clip_l"), **clip),
            EncoderSpec(name="clip_g", path=str(root / "clip_g"), **clip),
            EncoderSpec(name="gemma", kind="gemma", path=str(root / "gemma"), max_length=256, role="sequence")]


def generation(pipe, batch: int, steps: int) -> dict:
    """``snapgen generate``'s path: encode_prompt (timed apart), then sample_latents (the
    shipped sampler, CFG 4.5 batched) + decode_latents (the tiny decoder)."""
    from snapgen_cli.core.flow import Guidance

    prompts = ["a tiger wearing a tuxedo"] * batch
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
    text_s = _timed(lambda: pipe.encode_prompt(prompts), runs=3, warmup=1)
    cond = pipe.encode_prompt(prompts)

    def run():
        return pipe.decode_latents(pipe.sample_latents(cond, gens(), steps, Guidance(scale=4.5), size=1024))

    torch.cuda.reset_peak_memory_stats()
    sec = _timed(run, runs=2, warmup=1)
    return dict(batch=batch, steps=steps, guidance=4.5, seconds_per_batch=sec, samples_per_s=batch / sec,
                text_encoding_s_per_batch=text_s, peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)


def training(unet, batch: int, latent: int, tokens: int) -> dict:
    unet.train()
    unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-5, weight_decay=0.01)
    x, t, ctx, pooled = _unet_inputs(unet, batch, latent, tokens, torch.float32)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(x, t, ctx, pooled, return_dict=False)[0]
        loss = (out.float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    sec = _timed(step, runs=3, warmup=1)
    unet.disable_gradient_checkpointing()
    unet.eval()
    del opt
    torch.cuda.empty_cache()
    return dict(batch=batch, latent=latent, samples_per_s=batch / sec, peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)


def forward_pair(target_a: str, target_b: str, preset_a: str, res: int) -> dict:
    cfg = Config(model=target_a, preset=preset_a, resolution=res, runs=1)
    out = {}
    for tgt in (target_a, target_b):
        macs = meta_figures(cfg, tgt)["macs"]
        real = build_target(cfg, tgt, meta=False)
        model = real.model.to("cuda", torch.bfloat16).eval()
        inputs = real.make_inputs(torch.device("cuda"), torch.bfloat16)
        with torch.no_grad():
            sec = _timed(lambda: real.call(model, inputs), runs=10, warmup=3)
        out[tgt] = dict(name=real.name, gmacs=macs / 1e9, latency_ms=1e3 * sec)
        del model, real, inputs
        torch.cuda.empty_cache()
    out["mac_ratio"] = out[target_b]["gmacs"] / out[target_a]["gmacs"]
    out["latency_ratio"] = out[target_b]["latency_ms"] / out[target_a]["latency_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes")
    ap.add_argument("--text-encoders", choices=["stand-in", "student"], default="stand-in",
                    help="random stand-ins with the real widths, or the real CLIP-L/G + Gemma-2 (weights needed)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    res["unet_vs_sdxl_1024"] = forward_pair("unet", "sdxl-unet", "snapgen-t2i", 1024)
    log(res["unet_vs_sdxl_1024"])
    res["decoder_vs_sd3_1024"] = forward_pair("decoder", "sd3-decoder", "snapgen-decoder", 1024)
    log(res["decoder_vs_sd3_1024"])
    torch.manual_seed(0)
    cfg = Config(model="unet", preset="snapgen-t2i", resolution=1024)
    unet = build_target(cfg, "unet", meta=False).model.to("cuda")
    res["training"] = []
    for batch, latent in ([(32, 64), (8, 128)] if args.quick else [(32, 64), (64, 64), (8, 128), (16, 128), (32, 128)]):
        try:
            res["training"].append(training(unet, batch, latent, 333))
        except torch.OutOfMemoryError:
            res["training"].append(dict(batch=batch, latent=latent, oom=True))
            torch.cuda.empty_cache()
        log(res["training"][-1])
    from snapgen_cli.core.flow import RectifiedFlow
    from snapgen_cli.core.pipeline import SnapGenPipeline
    from snapgen_cli.core.text import TextEncoderStack, spec_set

    decoder = build_target(Config(model="decoder", resolution=1024), "decoder", meta=False).model
    with tempfile.TemporaryDirectory() as tmp:
        specs = stand_in_text_encoders(Path(tmp)) if args.text_encoders == "stand-in" else spec_set("student")
        pipe = SnapGenPipeline(unet=unet.eval(), scheduler=RectifiedFlow(shift=3.0).scheduler(1),
                               text_encoder=TextEncoderStack(specs), decoder=decoder, resolution=1024)
    pipe = pipe.to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    res["generation_1024_28steps_cfg"] = dict(text_encoders=args.text_encoders, runs=[])
    for batch in ([8] if args.quick else [4, 8, 16]):
        res["generation_1024_28steps_cfg"]["runs"].append(generation(pipe, batch, 28))
        log(res["generation_1024_28steps_cfg"]["runs"][-1])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
