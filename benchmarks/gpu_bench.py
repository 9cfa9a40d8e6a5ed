"""SnapGen against SDXL on one GPU, side by side in one process (issue 17, "What to build" 3).

    python benchmarks/gpu_bench.py                       # CUDA, the paper's sizes, ~18 min on an H200
    python benchmarks/gpu_bench.py --device cpu --quick  # tiny models in seconds (tests/test_gpu_bench.py)

Sections, in the order they run (each one's figures are written to the JSON as soon as it ends, so
a run cut short keeps what it measured; a section that would not fit in ``--budget-s`` is skipped
and says so, as are generation rows once the budget is spent; a section that fails records its
error and the run goes on):

* ``forward``: one UNet forward, SnapGen (``snapgen-t2i``, 333 text tokens, its mask) against
  SDXL's UNet (77 tokens), bf16 eager with SDPA, at batch 1 and 8: latency, and the latency ratio
  next to the MAC ratio (counted here: 645.1 G against 3380.6 G, 5.2x; the paper's figures, 5.2x);
  the tiny decoder against SD3's VAE decoder at 1024^2, batch 1 (MAC ratio 23.5x).
* ``sdxl``: diffusers' ``StableDiffusionXLPipeline`` (``core/baselines.py``: public configs, random
  weights) in bf16 with SDPA at 1024^2: 28 steps with CFG 4.5 and 4 steps without, batches 16, 4
  and 1; text encoded apart.
* ``training``: the training step of ``pretrain`` / ``finetune`` (``train/loop.py``: the flow
  loss of ``train/diffusion.py``, bf16 autocast, fused AdamW, gradient clipping, EMA) at 512^2
  and 1024^2 with the paper's per-GPU batches (128, 48; sup. G), with and without gradient
  checkpointing: samples/s, peak memory and MFU (``core/speed.py``); compiled (the loop's
  ``compile``) in the last section, ``training_compiled``, where the budget allows. Batches are
  random tensors in device memory: the data path is measured by ``benchmarks/bench_data.py``.
  Distillation with a teacher is not measured: SD3.5-Large's weights are not here (the row says so).
* ``generate``: the shipped default of ``snapgen generate`` on this device (``--dtype auto
  --compile`` default: bf16 + ``torch.compile`` with CUDA graphs on CUDA, fp32 eager on a CPU):
  28 steps with CFG 4.5 and 4 steps without, at the goals' batch (16) only, since every new shape
  compiles anew (140-170 s each on an H200's host); the first call's time (compilation) is reported
  apart. Then the compiled UNet and decoder forward
  latencies of ``forward`` again, with the ratios against SDXL's eager ones.
* ``generate_eager``: ``snapgen generate``'s pipeline (``load_pipeline`` on a saved pipeline dir,
  as the CLI loads it) in bf16 without compilation, the same rows; and the 28-step rows with SD3's
  VAE decoder (``--vae``).
* ``profiles``: where a goal of the issue is missed, the top kernels (``torch.profiler``, device
  time, share of the total) of the eager bf16 model that missed it: one generation call, one UNet
  or decoder forward, one training step (kernels inside CUDA graphs are not visible to the
  profiler, hence the eager models).

Text encoders: random 2-layer stand-ins with the real widths and lengths (CLIP-L, CLIP-G, Gemma-2:
context (333, 2304), pooled 2048), since the real weights are not here. Their time is reported
apart and left out of ``samples_per_s`` (denoising + decoding, what the goals are about); the
``samples_per_s_end_to_end`` includes the stand-ins. PNG writing is not timed. Random weights
throughout: speed does not depend on them.

Goals (issue 17): 28 steps + CFG at 1024^2 >= 4 samples/s and >= 3x SDXL's pipeline; 4 steps
without CFG >= 25 images/s at batch 16; UNet latency ratio vs SDXL >= 3.5x at batch 8; decoder
latency ratio vs SD3's >= 10x; training MFU >= 35 % at 1024^2. ``goals`` in the JSON lists each
with the figure measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from snapgen_cli.core import baselines, denoiser
from snapgen_cli.core.decoder import build_decoder, latents_to_images
from snapgen_cli.core.flow import RectifiedFlow
from snapgen_cli.core.losses import task_loss
from snapgen_cli.core.measure import count_macs, measure_latency, resolve_device, synchronize
from snapgen_cli.core.pipeline import SnapGenPipeline, load_pipeline
from snapgen_cli.core.speed import DTYPES, compile_module, mfu_report
from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip, make_tiny_gemma
from snapgen_cli.core.unet import build_unet
from snapgen_cli.train.loop import LerpEMA, _adamw, clip_grad_norm

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a tiger wearing a tuxedo, studio photo"

#: The two scales: the paper's models at 1024^2, and tiny models for a CPU check of the script.
SCALES = {
    "full": dict(res=1024, unet="snapgen-t2i", unet_overrides={}, decoder="snapgen-decoder", tiny=False,
                 text=dict(clip_l=768, clip_g=1280, gemma=2304, layers=2, gemma_len=256), steps=(28, 4),
                 batches=(16, 4, 1), forward_batches=(1, 8), runs=2, forward_runs=10,
                 train=[(512, 128), (1024, 48)], train_steps=(2, 5)),
    "quick": dict(res=64, unet="tiny", unet_overrides=dict(in_channels=16, out_channels=16), decoder="tiny",
                  tiny=True, text=dict(clip_l=32, clip_g=32, gemma=48, layers=1, gemma_len=16), steps=(2, 1),
                  batches=(2, 1), forward_batches=(1, 2), runs=1, forward_runs=2, train=[(64, 2), (128, 2)],
                  train_steps=(1, 2)),
}
#: The SD3 VAE at CPU size for ``--quick`` (16 latent channels, f=8, as SD3's).
SD3_VAE_TINY = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)
#: Seconds of each section on an H200 (full scale), for the budget; quick runs ignore it. Measured
#: 2026-12-04 (benchmarks/results/gpu_bench_h200*.json): forward 43, sdxl 69, training 63,
#: generate_eager 99, two profiles 16; generate 329 with two compiled shapes, so ~450 with the three
#: it now compiles (28 steps + CFG and 4 steps at batch 16, the UNet alone at batch 8); training_compiled
#: (two static graphs) not yet measured. All sections: ~18 minutes (their sum), more than one device call
#: (gpu_bench.sh).
COST_S = {"forward": 45, "sdxl": 70, "training": 65, "generate": 450, "generate_eager": 100, "profiles": 40,
          "training_compiled": 300}
SECTIONS = tuple(COST_S)
GOALS = {"samples_per_s_28_cfg": 4.0, "vs_sdxl_28_cfg": 3.0, "images_per_s_4_steps_b16": 25.0,
         "unet_latency_ratio_b8": 3.5, "decoder_latency_ratio": 10.0, "training_mfu_1024": 0.35}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- models


def stand_in_text_encoders(root: Path, text: dict) -> list[EncoderSpec]:
    """Random CLIP-L / CLIP-G / Gemma-2 stand-ins with ``text``'s widths (the student layout of
    core/text.py), saved where their specs point."""
    for name in ("clip_l", "clip_g"):
        make_tiny_clip(root / name, hidden_size=text[name], num_layers=text["layers"], num_heads=text[name] // 64 or 2)
    make_tiny_gemma(root / "gemma", hidden_size=text["gemma"], num_layers=text["layers"])
    clip = dict(kind="clip", max_length=77, layer="penultimate", role="channel", pooled="projection")
    return [EncoderSpec(name="clip_l", path=str(root / "clip_l"), **clip),
            EncoderSpec(name="clip_g", path=str(root / "clip_g"), **clip),
            EncoderSpec(name="gemma", kind="gemma", path=str(root / "gemma"), max_length=text["gemma_len"],
                        role="sequence")]


def save_snapgen_pipeline(root: Path, scale: dict) -> Path:
    """A SnapGen pipeline dir as a training stage writes one (random weights): the UNet preset for the
    stand-ins' text layout, the tiny decoder, the flow sampler with shift 3; and SD3's VAE in ``vae/``."""
    texts = TextEncoderStack(stand_in_text_encoders(root / "text", scale["text"]))
    torch.manual_seed(0)
    unet = build_unet(scale["unet"], **{**scale["unet_overrides"], **texts.layout.unet_kwargs()})
    decoder = build_decoder(scale["decoder"])
    vae = baselines.sd3_vae(**(SD3_VAE_TINY if scale["tiny"] else {}))
    vae.save_pretrained(root / "vae")
    latent = dict(channels=16, downsample=8, scaling_factor=vae.config.scaling_factor,
                  shift_factor=vae.config.shift_factor)
    SnapGenPipeline(unet=unet, scheduler=RectifiedFlow(shift=3.0).scheduler(1), text_encoder=texts, decoder=decoder,
                    resolution=scale["res"], latent=latent).save_pretrained(root / "pipe")
    return root / "pipe"


# ----------------------------------------------------------------------------- measurements


def generation_rows(pipe, name: str, scale: dict, device: torch.device, only_cfg: bool = False,
                    time_left=lambda: math.inf, batches: tuple[int, ...] | None = None) -> list[dict]:
    """``pipe`` (a SnapGenPipeline or diffusers' SDXL pipeline) at ``scale``'s resolution: 28 steps
    with CFG 4.5 and 4 steps without, each batch size (``batches``, default the scale's;
    :func:`generation_row`); once ``time_left()`` is spent, the remaining rows are only listed as skipped."""
    runs = [(scale["steps"][0], 4.5)] + ([] if only_cfg else [(scale["steps"][1], 1.0)])
    rows = []
    for steps, guidance in runs:
        for batch in batches or scale["batches"]:
            if time_left() <= 0:
                rows.append(dict(pipeline=name, steps=steps, guidance=guidance, batch=batch, skipped="budget"))
                continue
            rows.append(generation_row(pipe, name, scale, device, steps, guidance, batch))
    return rows


def generation_row(pipe, name: str, scale: dict, device: torch.device, steps: int, guidance: float, batch: int) -> dict:
    """One row: a warm-up call with 2 steps (1 without CFG) first -- it holds compilation, CUDA-graph
    recording and cuDNN autotuning, which depend on the shapes only -- then the timed calls."""
    sdxl = not isinstance(pipe, SnapGenPipeline)
    prompts, res = [PROMPT] * batch, scale["res"]
    row = dict(pipeline=name, steps=steps, guidance=guidance, batch=batch, resolution=res)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
    timings: list[dict] = []
    if sdxl:  # text encoded once, apart, as SnapGen's encoders are timed apart
        embeds: dict = {}

        def encode():
            pe, npe, ppe, nppe = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=guidance > 1)
            negative = dict(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe) if guidance > 1 else {}
            embeds.update(prompt_embeds=pe, pooled_prompt_embeds=ppe, **negative)

        row["text_encoding_s"] = measure_latency(encode, device, 2, 1)["latency_ms_median"] / 1e3

        def call(n=steps):
            pipe(num_inference_steps=n, guidance_scale=guidance, height=res, width=res, generator=gens(), **embeds)
    else:
        def call(n=steps):
            pipe(prompts, num_inference_steps=n, guidance_scale=guidance, size=res, batch_size=batch, generator=gens())
            timings.append(dict(pipe.last_timings))
    t0 = time.perf_counter()
    with torch.no_grad():
        call(2 if guidance > 1 else 1)
    synchronize(device)
    row["first_call_s"] = time.perf_counter() - t0
    reset_peak(device)
    m = measure_latency(call, device, scale["runs"] if batch < 16 else 1, 0)
    total = m["latency_ms_median"] / 1e3
    if sdxl:
        gen = total
        row["samples_per_s_end_to_end"] = batch / (gen + row["text_encoding_s"])
    else:
        timed = timings[1:]
        gen = statistics.median(t["denoising_s"] + t["decoding_s"] for t in timed)
        row.update(text_encoding_s=statistics.median(t["text_encoding_s"] for t in timed),
                   denoising_s=statistics.median(t["denoising_s"] for t in timed),
                   decoding_s=statistics.median(t["decoding_s"] for t in timed),
                   samples_per_s_end_to_end=batch / total, **pipe.speed_settings)
    row.update(batch_latency_s=gen, samples_per_s=batch / gen, s_per_image=gen / batch,
               peak_memory_gb=peak_memory_gb(device), runs=m["runs"])
    log(json.dumps(row))
    return row


def unet_inputs(unet, batch: int, lat: int, layout, device, dt):
    """What the pipeline passes the UNet at one guided step (x in the UNet's dtype, fp32 timesteps,
    the combined context with its mask)."""
    c = denoiser.text_dims(unet.config)
    return (torch.randn(batch, c["in_channels"], lat, lat, device=device, dtype=dt),
            torch.full((batch,), 500.0, device=device),
            (torch.randn(batch, layout.seq_len, c["context_dim"], device=device, dtype=dt),
             torch.randn(batch, c["pooled_dim"], device=device, dtype=dt),
             torch.ones(batch, layout.seq_len, dtype=torch.bool, device=device)))


def sdxl_unet_inputs(unet, batch: int, lat: int, device, dt):
    c = unet.config
    return (torch.randn(batch, c.in_channels, lat, lat, device=device, dtype=dt),
            torch.full((batch,), 500.0, device=device),
            torch.randn(batch, baselines.SDXL_CONTEXT_LEN, c.cross_attention_dim, device=device, dtype=dt),
            dict(text_embeds=torch.randn(batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                                         device=device, dtype=dt),
                 time_ids=torch.randn(batch, 6, device=device, dtype=dt)))


def timed_forward(call, device, runs: int, cudagraphs: bool) -> dict:
    def run():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        call()

    m = measure_latency(run, device, runs, 3)
    return {k: m[f"latency_ms_{q}"] for k, q in (("latency_ms", "median"), ("latency_ms_p25", "p25"),
                                                  ("latency_ms_p75", "p75"))}


def forward_section(snap, sdxl_unet, sd3_vae, scale: dict, device, dt, state: dict, compiled: bool = False,
                    batches: tuple[int, ...] | None = None) -> dict:
    """UNet and decoder forward latencies against SDXL's UNet and SD3's decoder (see module doc), at
    ``batches`` (default the scale's ``forward_batches``). ``compiled``: ``snap`` is the shipped
    (compiled) pipeline; the baselines' eager figures come from ``state`` (the eager section)."""
    lat, layout = scale["res"] // 8, snap.layout
    graphs = snap.speed_settings["compile_mode"] == "reduce-overhead"
    out: dict = dict(compiled=compiled, dtype=snap.speed_settings["dtype"], unet=[], decoder={})
    for b in batches or scale["forward_batches"]:
        x, t, cond = unet_inputs(snap.unet, b, lat, layout, device, snap.unet.dtype)
        row = dict(batch=b, snapgen=timed_forward(partial(denoiser.denoise, snap.unet, x, t, cond), device,
                                                  scale["forward_runs"], graphs))
        if compiled:
            row["sdxl"] = state["forward_eager"]["unet"][scale["forward_batches"].index(b)]["sdxl"]
        else:
            xs = sdxl_unet_inputs(sdxl_unet, b, lat, device, dt)
            row["sdxl"] = timed_forward(partial(sdxl_unet, *xs[:3], added_cond_kwargs=xs[3]), device,
                                        scale["forward_runs"], False)
        row["latency_ratio"] = row["sdxl"]["latency_ms"] / row["snapgen"]["latency_ms"]
        row["mac_ratio"] = state["macs"]["sdxl_unet"] / state["macs"]["snapgen_unet"]
        out["unet"].append(row)
        log(json.dumps(row))
    z = torch.randn(1, 16, lat, lat, device=device)
    snap_dec = timed_forward(lambda: latents_to_images(snap.decoder, z), device, scale["forward_runs"], graphs)
    if compiled:
        sd3 = state["forward_eager"]["decoder"]["sd3"]
    else:
        sd3 = timed_forward(lambda: latents_to_images(sd3_vae, z), device, scale["forward_runs"], False)
    out["decoder"] = dict(batch=1, snapgen=snap_dec, sd3=sd3, latency_ratio=sd3["latency_ms"] / snap_dec["latency_ms"],
                          mac_ratio=state["macs"]["sd3_decoder"] / state["macs"]["snapgen_decoder"],
                          note="core.decoder.latents_to_images for both: decode, to [0, 1], fp32")
    log(json.dumps(out["decoder"]))
    return out


def count_all_macs(scale: dict, layout) -> dict:
    """MACs of one forward at batch 1 (meta device): the two UNets and the two decoders."""
    lat = scale["res"] // 8
    with torch.device("meta"):
        snap_cfg = dict(build_unet(scale["unet"], **{**scale["unet_overrides"], **layout.unet_kwargs()}).config)
        sx = baselines.sdxl_unet(**(baselines.SDXL_TINY["unet"] if scale["tiny"] else {}))
        xs = sdxl_unet_inputs(sx, 1, lat, "meta", torch.float32)
        dec = build_decoder(scale["decoder"])
        vae = baselines.sd3_vae(**(SD3_VAE_TINY if scale["tiny"] else {}))
        z = torch.zeros(1, 16, lat, lat)
        return dict(snapgen_unet=denoiser.forward_macs(snap_cfg, lat, layout),
                    sdxl_unet=count_macs(lambda: sx(xs[0], xs[1], xs[2], added_cond_kwargs=xs[3])),
                    snapgen_decoder=count_macs(lambda: dec.decode(z)), sd3_decoder=count_macs(lambda: vae.decode(z)))


class TrainStep:
    """One optimizer step as ``train/loop.py`` takes it for ``pretrain`` / ``finetune``: the flow loss of
    ``train/diffusion.py`` (Eq. 1-2, logit-normal timesteps, shift 3) under bf16 autocast, backward,
    gradient clipping at 1.0 (``clip_grad_norm``), fused AdamW (``_adamw``: lr 5e-5 at batch 1024,
    wd 0.01), EMA 0.999 (``LerpEMA``)."""

    def __init__(self, unet, layout, batch: int, lat: int, device: torch.device):
        self.unet, self.device, self.obj = unet, device, RectifiedFlow(shift=3.0)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = _adamw(self.params, lr=5e-5 * batch / 1024, betas=(0.9, 0.999), weight_decay=0.01)
        self.ema = LerpEMA(self.params, decay=0.999, foreach=True)
        c = denoiser.text_dims(unet.config)
        self.g = torch.Generator(device=device).manual_seed(0)
        self.x0 = torch.randn(batch, c["in_channels"], lat, lat, device=device, generator=self.g)
        self.cond = (torch.randn(batch, layout.seq_len, c["context_dim"], device=device, generator=self.g),
                     torch.randn(batch, c["pooled_dim"], device=device, generator=self.g),
                     torch.ones(batch, layout.seq_len, dtype=torch.bool, device=device))

    def __call__(self) -> None:
        x0, obj = self.x0, self.obj
        noise = torch.randn(x0.shape, device=self.device, generator=self.g)
        sigma = obj.sample_timesteps(len(x0), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            pred, _ = denoiser.denoise(self.unet, obj.noisy(x0, noise, sigma), obj.model_timestep(sigma), self.cond)
        task_loss(pred.float(), obj.target(x0, noise, sigma)).mean().backward()
        clip_grad_norm(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.params)


def training_rows(unet, layout, scale: dict, device, compiled: bool, peak_flops: float | None) -> list[dict]:
    """samples/s, peak memory and MFU of :class:`TrainStep` at each resolution with the paper's batch,
    with and without gradient checkpointing (compiled: with it only, as sup. G trains)."""
    rows = []
    warmup, steps = scale["train_steps"]
    for res, batch in scale["train"]:
        lat = res // 8
        macs = denoiser.forward_macs(unet.config, lat, layout)
        for ckpt in (True,) if compiled else (True, False):
            row = dict(resolution=res, batch=batch, gradient_checkpointing=ckpt, compiled=compiled,
                       mixed_precision="bf16", forward_gmacs_per_sample=macs / 1e9)
            reset_peak(device)
            unet.train()
            (unet.enable_gradient_checkpointing if ckpt else unet.disable_gradient_checkpointing)()
            step = None
            try:
                step = TrainStep(unet, layout, batch, lat, device)
                t0 = time.perf_counter()
                for _ in range(warmup):
                    step()
                synchronize(device)
                row["first_steps_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                synchronize(device)
                sec = (time.perf_counter() - t0) / steps
                row.update(step_s=sec, samples_per_s=batch / sec, peak_memory_gb=peak_memory_gb(device),
                           **mfu_report(macs, batch / sec, device, ckpt, peak_flops))
            except torch.OutOfMemoryError:
                row["oom"] = True
            del step
            unet.zero_grad(set_to_none=True)
            log(json.dumps(row))
            rows.append(row)
    unet.disable_gradient_checkpointing()
    unet.eval()
    return rows


def top_kernels(fn, device, n: int = 15) -> dict:
    """The ``n`` kernels (or CPU ops, on a CPU) with the most self device time over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    cuda = device.type == "cuda"
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    top = sorted(events, key=key, reverse=True)[:n]
    return dict(time_kind="self device (CUDA) time" if cuda else "self CPU time", total_ms=total / 1e3,
                top=[dict(name=e.key[:120], ms=key(e) / 1e3, share=key(e) / total, calls=e.count) for e in top])


# ----------------------------------------------------------------------------- the run


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.scale = SCALES["quick" if args.quick else "full"]
        self.device = resolve_device(args.device)
        self.dt = DTYPES[args.dtype]
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        slug = name.replace("NVIDIA ", "").replace(" ", "_").lower()
        self.out = Path(args.out) if args.out else RESULTS / f"gpu_bench_{slug}.json"
        self.res: dict = dict(device=name, torch=torch.__version__, scale="quick" if args.quick else "full",
                              dtype=args.dtype, budget_s=args.budget_s, sections={}, goals={}, skipped={}, errors={})
        self.state: dict = {}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def row_time(self) -> float:
        """Seconds left for another generation row: the budget less what the later sections need at least."""
        return math.inf if self.args.quick else self.left() - 60

    def write(self) -> None:
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1) + "\n")
        os.replace(tmp, self.out)

    def section(self, name: str, fn) -> None:
        if name not in self.args.sections:
            return
        if not self.args.quick and self.left() < COST_S[name]:
            self.res["skipped"][name] = f"budget: {self.left():.0f} s left, the section takes ~{COST_S[name]} s"
            log(f"skipping {name}: {self.res['skipped'][name]}")
            self.write()
            return
        log(f"== {name} ({self.left():.0f} s of the budget left)")
        t0 = time.perf_counter()
        try:
            self.res["sections"][name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others' figures
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.res["errors"][name] = f"{type(exc).__name__}: {first}"
        self.res.setdefault("section_s", {})[name] = time.perf_counter() - t0
        self.write()

    # -- sections ---------------------------------------------------------------------

    def build(self, root: Path) -> None:
        sc, dev = self.scale, self.device
        self.pipe_dir = save_snapgen_pipeline(root, sc)
        self.eager = load_pipeline(self.pipe_dir, device=dev, dtype=self.args.dtype, compile=False)
        self.state["macs"] = count_all_macs(sc, self.eager.layout)
        self.res["macs"] = self.state["macs"]
        self.res["params"] = dict(snapgen_unet=sum(p.numel() for p in self.eager.unet.parameters()),
                                  snapgen_decoder=sum(p.numel() for p in self.eager.decoder.parameters()))
        torch.manual_seed(0)
        with torch.device(dev):  # random init on the device: SDXL's 3.5B parameters in seconds
            self.sdxl = baselines.sdxl_pipeline(tiny=sc["tiny"])
        self.sdxl.to(dev, self.dt)
        self.sdxl.set_progress_bar_config(disable=True)
        self.sd3_vae = baselines.sd3_vae(**(SD3_VAE_TINY if sc["tiny"] else {})).to(dev, self.dt).eval()
        self.res["params"]["sdxl_unet"] = sum(p.numel() for p in self.sdxl.unet.parameters())

    def forward_eager(self) -> dict:
        with torch.no_grad():
            out = forward_section(self.eager, self.sdxl.unet, self.sd3_vae, self.scale, self.device, self.dt,
                                  self.state)
        self.state["forward_eager"] = out
        return out

    def generate_eager(self) -> dict:
        rows = generation_rows(self.eager, "snapgen", self.scale, self.device, time_left=self.row_time)
        vae_pipe = load_pipeline(self.pipe_dir, vae=str(self.pipe_dir.parent / "vae"), device=self.device,
                                 dtype=self.args.dtype, compile=False)
        rows += generation_rows(vae_pipe, "snapgen+sd3-vae", self.scale, self.device, only_cfg=True,
                                time_left=self.row_time)
        del vae_pipe
        self.state["generate_eager"] = rows
        return dict(dtype=self.args.dtype, compile=False, rows=rows)

    def sdxl_rows(self) -> dict:
        rows = generation_rows(self.sdxl, "sdxl", self.scale, self.device, time_left=self.row_time)
        self.state["sdxl"] = rows
        return dict(dtype=self.args.dtype, attention="SDPA (diffusers AttnProcessor2_0)", rows=rows)

    def generate_shipped(self) -> dict:
        self.shipped = load_pipeline(self.pipe_dir, device=self.device, dtype="auto", compile=None)
        # Compiled, only the goals' batches: each new shape compiles anew (140-170 s a shape for the
        # UNet on an H200's host, measured 2026-12-04), so every batch would not fit one device call.
        compiled = self.shipped.speed_settings["compile"] and not self.args.quick
        rows = generation_rows(self.shipped, "snapgen", self.scale, self.device, time_left=self.row_time,
                               batches=(max(self.scale["batches"]),) if compiled else None)
        self.state["generate"] = rows
        out = dict(settings=self.shipped.speed_settings, rows=rows)
        if self.shipped.speed_settings["compile"] and "forward_eager" in self.state and self.row_time() > 0:
            with torch.no_grad():
                out["forward_compiled"] = forward_section(self.shipped, None, None, self.scale, self.device, self.dt,
                                                          self.state, compiled=True,
                                                          batches=self.scale["forward_batches"][-1:])
        return out

    def training(self, compiled: bool = False) -> dict:
        for attr in ("shipped", "sdxl", "sd3_vae"):  # training needs the memory; SDXL is measured by now
            if hasattr(self, attr):
                setattr(self, attr, None)
        reset_peak(self.device)
        sc = self.scale
        if "train_unet" not in self.state:
            torch.manual_seed(0)
            layout = TextEncoderStack.from_pretrained(self.pipe_dir / "text_encoder").layout
            self.state["layout"] = layout
            unet = build_unet(sc["unet"], **{**sc["unet_overrides"], **layout.unet_kwargs()})
            self.state["train_unet"] = unet.to(self.device)
        unet = self.state["train_unet"]
        if compiled:  # one static graph per resolution (compile_module's note)
            compile_module(unet, dynamic=False)
        peak = self.args.peak_tflops * 1e12 if self.args.peak_tflops else None
        rows = training_rows(unet, self.state["layout"], sc, self.device, compiled, peak)
        self.state["training_compiled" if compiled else "training"] = rows
        return dict(step="flow loss + bf16 autocast + fused AdamW + clip 1.0 + EMA (train/loop.py)", rows=rows,
                    distill="not measured: needs SD3.5-Large's weights (the teacher), not here")

    def profiles(self) -> dict:
        """Top kernels of the eager bf16 models behind each missed goal (module doc)."""
        missed = [k for k, g in self.res["goals"].items() if g.get("met") is False]
        if self.args.profile == "never" or (self.args.profile == "auto" and not missed):
            return dict(missed=missed, profiles={})
        sc, dev, out = self.scale, self.device, {}
        pipe = load_pipeline(self.pipe_dir, device=dev, dtype=self.args.dtype, compile=False)
        gens = lambda b: [torch.Generator().manual_seed(i) for i in range(b)]  # noqa: E731
        want = set(missed) if self.args.profile == "auto" else set(GOALS)
        b = max(sc["batches"])
        with torch.no_grad():
            if want & {"samples_per_s_28_cfg", "vs_sdxl_28_cfg"}:
                out["generate_2_steps_cfg"] = dict(batch=b, **top_kernels(
                    lambda: pipe([PROMPT] * b, num_inference_steps=2, guidance_scale=4.5, size=sc["res"],
                                 generator=gens(b)), dev))
            if "images_per_s_4_steps_b16" in want:
                out["generate_4_steps"] = dict(batch=b, **top_kernels(
                    lambda: pipe([PROMPT] * b, num_inference_steps=sc["steps"][1], guidance_scale=1.0, size=sc["res"],
                                 generator=gens(b)), dev))
            if "unet_latency_ratio_b8" in want:
                fb = sc["forward_batches"][-1]
                x, t, cond = unet_inputs(pipe.unet, fb, sc["res"] // 8, pipe.layout, dev, pipe.unet.dtype)
                fwd = partial(denoiser.denoise, pipe.unet, x, t, cond)
                out["unet_forward"] = dict(batch=fb, **top_kernels(fwd, dev))
            if "decoder_latency_ratio" in want:
                z = torch.randn(1, 16, sc["res"] // 8, sc["res"] // 8, device=dev)
                out["decoder_forward"] = dict(batch=1, **top_kernels(lambda: latents_to_images(pipe.decoder, z), dev))
        if "training_mfu_1024" in want and "train_unet" in self.state:
            res, batch = sc["train"][-1]
            one = dict(sc, train=[(res, batch)], train_steps=(0, 1))
            out["training_step"] = dict(resolution=res, batch=batch, **top_kernels(
                lambda: training_rows(self.state["train_unet"], self.state["layout"], one, dev, True, None), dev))
        return dict(missed=missed, note="eager models (kernels inside CUDA graphs are invisible to the profiler)",
                    profiles=out)

    # -- goals ------------------------------------------------------------------------

    def goals(self) -> None:
        """Each goal of the issue with the figure measured for it (the shipped pipeline's rows when
        the ``generate`` section ran, else the eager ones)."""
        sc, st, g = self.scale, self.state, {}
        cfg_steps, few = sc["steps"]
        b = max(sc["batches"])
        sdxl = {(r["steps"], r["batch"]): r for r in st.get("sdxl") or [] if "samples_per_s" in r}

        def rows(steps: int, batch: int | None = None) -> tuple[str, list[dict]]:
            """SnapGen's measured rows: the shipped pipeline's, else the eager ones."""
            for source in ("generate", "generate_eager"):
                found = [r for r in st.get(source) or [] if r["pipeline"] == "snapgen" and "samples_per_s" in r
                         and r["steps"] == steps and batch in (None, r["batch"])]
                if found:
                    return source, found
            return "", []

        def goal(key: str, measured: float | None, what: str) -> None:
            g[key] = dict(measured=measured, target=GOALS[key], what=what,
                          met=None if measured is None else measured >= GOALS[key])

        source, guided = rows(cfg_steps)
        if guided:
            goal("samples_per_s_28_cfg", max(r["samples_per_s"] for r in guided), f"{source}, best batch")
            ratios = [r["samples_per_s"] / sdxl[cfg_steps, r["batch"]]["samples_per_s"] for r in guided
                      if (cfg_steps, r["batch"]) in sdxl]
            if ratios:
                goal("vs_sdxl_28_cfg", max(ratios), f"{source} / sdxl samples/s, best batch")
        source, r4 = rows(few, b)
        if r4:
            goal("images_per_s_4_steps_b16", r4[0]["samples_per_s"], f"{source}, batch {b}")
        fwd = (self.res["sections"].get("generate") or {}).get("forward_compiled") or st.get("forward_eager")
        if fwd:
            u, d = fwd["unet"][-1], fwd["decoder"]
            kind = "compiled vs eager sdxl" if fwd["compiled"] else "eager"
            goal("unet_latency_ratio_b8", u["latency_ratio"],
                 f"{kind}, batch {u['batch']}, MAC ratio {u['mac_ratio']:.2f}")
            goal("decoder_latency_ratio", d["latency_ratio"], f"{kind}, batch 1, MAC ratio {d['mac_ratio']:.2f}")
        res = sc["train"][-1][0]
        train = [r for r in st.get("training", []) + st.get("training_compiled", [])
                 if r["resolution"] == res and r.get("mfu")]
        if train:
            goal("training_mfu_1024", max(r["mfu"] for r in train), f"best row at {res}^2")
        self.res["goals"] = g

    def main(self) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            self.build(Path(tmp))
            self.section("forward", self.forward_eager)
            self.section("sdxl", self.sdxl_rows)
            self.section("training", self.training)
            self.section("generate", self.generate_shipped)
            self.section("generate_eager", self.generate_eager)
            self.goals()
            self.section("profiles", self.profiles)
            self.section("training_compiled", lambda: self.training(compiled=True))
            self.goals()
        self.write()
        return self.res


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda[:i]; or cpu, with --quick: a check of the script")
    ap.add_argument("--quick", action="store_true", help="tiny models at 64^2, 2/1 steps: seconds on a CPU")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the eager comparisons' models")
    ap.add_argument("--out", help="the JSON file (default: benchmarks/results/gpu_bench_<gpu>.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip sections that would end after this (s)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="auto: profile only where a goal is missed")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for the MFU (default: core/speed.py's table)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("CUDA is not available here; run with --device cpu --quick to check the script")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints must not mix with the JSON
        res = Run(args).main()
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
