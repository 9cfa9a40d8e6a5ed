"""GPU throughput of the SnapGen UNet + tiny decoder (run on a CUDA machine).

Measures, side by side in one process:

* generation throughput at 1024^2 (sec. 4.1 / Table 3 protocol: 28 Flow-Euler steps with
  classifier-free guidance, i.e. a doubled batch per step, then the decoder), in samples/s,
  for the SnapGen UNet + tiny decoder; the paper reports 1.04 samples/s on one A100 with
  the largest practical batch;
* training throughput (forward + backward + AdamW step, bf16 autocast, gradient
  checkpointing as in sup. G) at 512^2 and 1024^2, in samples/s, with peak memory;
* forward latency of the SnapGen UNet vs. the SDXL UNet, and of the tiny decoder vs. the
  SD3 decoder, at 1024^2 in bf16, with their MAC ratios.

Random weights (the figures do not depend on them). One JSON object on stdout.

    python benchmarks/gpu_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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


def generation(unet, decoder, batch: int, steps: int, tokens: int) -> dict:
    dt = torch.bfloat16
    x, _, ctx, pooled = _unet_inputs(unet, batch, 128, tokens, dt)
    ctx2, pooled2 = torch.cat([ctx, torch.zeros_like(ctx)]), torch.cat([pooled, torch.zeros_like(pooled)])
    sigmas = torch.linspace(1, 0, steps + 1, device="cuda")

    @torch.no_grad()
    def run():
        z = x
        for i in range(steps):
            v = unet(torch.cat([z, z]), sigmas[i].expand(2 * batch) * 1000, ctx2, pooled2, return_dict=False)[0]
            vc, vu = v.chunk(2)
            z = z + (sigmas[i + 1] - sigmas[i]) * (vu + 4.5 * (vc - vu))
        return decoder.decode(z, return_dict=False)[0]

    torch.cuda.reset_peak_memory_stats()
    sec = _timed(run, runs=2, warmup=1)
    return dict(batch=batch, steps=steps, seconds_per_batch=sec, samples_per_s=batch / sec,
                peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)


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
    unet = unet.to(torch.bfloat16)
    decoder = build_target(Config(model="decoder", resolution=1024), "decoder", meta=False).model.to("cuda", torch.bfloat16).eval()
    res["generation_1024_28steps_cfg"] = []
    for batch in ([8] if args.quick else [4, 8, 16]):
        res["generation_1024_28steps_cfg"].append(generation(unet, decoder, batch, 28, 333))
        log(res["generation_1024_28steps_cfg"][-1])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
