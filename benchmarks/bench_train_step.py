"""CPU training-step speed of the demo's fine-tune UNet against a diffusers
``UNet2DConditionModel`` of the same size (parameters and MACs), timed interleaved in one process.

The SnapGen model is the one the demo recipe's fine-tune stage trains (``--stage``, default
``finetune-64``): its preset (followed through ``init_from``), the latent channels of the
recipe's autoencoder, the text widths and token count of its precompute stage, its batch size
and resolution. The diffusers model is an SDXL-style ``UNet2DConditionModel`` whose widths are
chosen so that both its parameters and its MACs are within 5% of ours (checked at start).

One step = forward + MSE loss + backward + AdamW (fused, as the training loop's) + zero_grad,
in fp32. Each round runs every model once in a random order; the figures are medians over the
rounds, and the ratio is the median of the per-round ratios, so that a machine shared with other
jobs (load changes between rounds) moves both models alike. Wall time and the process's CPU time
are both recorded: with one thread, CPU time is the steadier figure on a loaded machine.

**Allocator.** In this script's fresh process glibc hands the tiny UNet's large stage-1
activations back to the OS when they are freed (its mmap and trim thresholds, which it raises
as a process frees large blocks: what happens depends on what the process allocated before), so
each step page-faults them in again: 5,600-6,700 minor faults a step for this model, none for
diffusers' (measured). A training stage does not pay that: after loading its data its heap stays
mapped (``snapgen finetune`` at 64 px: ~34 faults a step, from ``ru_minflt`` of 100- and 300-step
runs). ``--allocator steady`` (the default) therefore sets glibc's mmap and trim thresholds
(``mallopt``) before any model is built, for both models alike, so the comparison is of the
step's work; ``--allocator default`` measures the fresh-process state. Each model's faults a
step are recorded either way.

``--ref GITREF`` also times this repository's ``snapgen_cli`` at a git ref (imported from
``git archive`` under another package name) in the same rounds: before/after in one run.
``--profile`` prints torch.profiler's op mix of each model's step (self CPU time by op category).

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --ref main --out benchmarks/results/train_step_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from snapgen_cli.core.measure import count_macs, count_params
from snapgen_cli.core.text import TextLayout
from snapgen_cli.files import atomic_write_json
from snapgen_cli.recipe import DEMO_RECIPE, load_recipe
from snapgen_cli.stages.precompute import _specs as precompute_specs
from snapgen_cli.train.decoder_task import autoencoder_config

REPO = Path(__file__).resolve().parents[1]

#: diffusers UNet matched to the demo's ``tiny`` UNet (MiniLM text: 384-wide context, 4-channel
#: 8x8 latent): 2.65M params / 20.2M MACs against 2.62M / 19.7M (a grid search over the stage
#: widths; the block layout and head dims as SDXL's, `attention_head_dim` = heads in diffusers).
DIFFUSERS_TINY = dict(block_out_channels=(16, 32, 104), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                      attention_head_dim=(1, 1, 4), norm_num_groups=4)


def demo_setup(recipe_path: Path, stage_name: str) -> dict:
    """Model preset, latent shape, text layout and batch of a fine-tune stage of a recipe."""
    recipe = load_recipe(recipe_path)
    stage = recipe.stage(stage_name)
    cfg, s = stage.config, stage
    while s.config.init_from not in (None, "none"):  # the architecture comes from the initialising stage
        ref = s.config.init_from
        s = recipe.stages[s.index - 1] if ref == "previous" else recipe.stage(ref.lstrip("@").split("/")[0])
    pre = recipe.stage(cfg.data.lstrip("@").split("/")[0]).config
    ae_stage = recipe.stage(pre.vae.lstrip("@").split("/")[0]).config
    ae = autoencoder_config(ae_stage.autoencoder, **ae_stage.autoencoder_overrides)
    layout = TextLayout.from_specs(precompute_specs(pre)[0])  # the student's encoders as precompute stores them
    factor = 2 ** (len(ae["block_out_channels"]) - 1)
    return dict(stage=stage_name, model=s.config.model, batch=cfg.batch_size, resolution=cfg.resolution,
                latent=cfg.resolution // factor, latent_channels=ae["latent_channels"],
                tokens=layout.seq_len, context_dim=layout.context_dim, pooled_dim=layout.pooled_dim)


def import_ref(ref: str, tmp: Path):
    """``snapgen_cli`` as it is at git ``ref``, imported as the package ``snapgen_ref``."""
    from bench_stage_vs_ref import checkout  # this script's folder is first on sys.path

    pkg = checkout(ref, tmp) / "snapgen_cli"
    spec = importlib.util.spec_from_file_location("snapgen_ref", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["snapgen_ref"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("snapgen_ref.core.unet")


def diffusers_unet(in_channels: int, context_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        in_channels=in_channels, out_channels=in_channels, cross_attention_dim=context_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        **DIFFUSERS_TINY)


def meta_macs(build, pooled: bool, setup: dict) -> int:
    """MACs of one sample's forward, counted on the meta device (``core.measure.count_macs``)."""
    c, lat = setup["latent_channels"], setup["latent"]
    with torch.device("meta"):
        model = build()
        args = [torch.empty(1, c, lat, lat), torch.empty(1), torch.empty(1, setup["tokens"], setup["context_dim"])]
        if pooled:
            args.append(torch.empty(1, setup["pooled_dim"]))
        return count_macs(lambda: model(*args))


def malloc_thresholds(mmap: int, trim: int, top_pad: int | None = None) -> bool:
    """Pin glibc's mmap and trim thresholds (bytes; ``mallopt``, which also stops their dynamic
    raise) and optionally its top pad. False where the C library is not glibc or refuses a value."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    settings = [(m_mmap_threshold, mmap), (m_trim_threshold, trim)]
    if top_pad is not None:
        settings.append((m_top_pad, top_pad))
    return all(mallopt(opt, value) == 1 for opt, value in settings)


def steady_allocator() -> bool:
    """glibc: keep freed memory mapped (no mmap for large blocks, no trimming), as a training
    stage's warm heap behaves. False where the C library is not glibc (nothing changed)."""
    return malloc_thresholds(mmap=32 << 20, trim=1 << 30, top_pad=64 << 20)


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _category(op: str) -> str:
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "gemm"
    if "conv" in op:
        return "conv"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention"
    if "adam" in op:
        return "optimizer"
    if "norm" in op:
        return "norm"
    if op in ("aten::copy_", "aten::cat", "aten::clone", "aten::stack"):
        return "copy/cat"
    return "other (elementwise, views, ...)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=DEMO_RECIPE)
    ap.add_argument("--stage", default="finetune-64", help="the fine-tune stage whose UNet and batch are timed")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--ref", default=None, help="also time snapgen_cli at this git ref (before/after in one run)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS", help="print each model's op mix over STEPS")
    ap.add_argument("--allocator", choices=["steady", "default"], default="steady",
                    help="steady: glibc keeps freed memory mapped, as in a training stage (see above)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args()
    if args.allocator == "steady" and not steady_allocator():
        sys.exit("--allocator steady needs glibc's mallopt; use --allocator default")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = demo_setup(args.recipe, args.stage)
    b, c, lat, n = setup["batch"], setup["latent_channels"], setup["latent"], setup["tokens"]

    from snapgen_cli.core.unet import build_unet

    kw = dict(in_channels=c, out_channels=c, context_dim=setup["context_dim"], pooled_dim=setup["pooled_dim"])
    builders = {"snapgen": lambda: build_unet(setup["model"], **kw),
                "diffusers": lambda: diffusers_unet(c, setup["context_dim"])}
    tmp = tempfile.TemporaryDirectory()
    if args.ref:
        ref_unet = import_ref(args.ref, Path(tmp.name))
        builders[f"snapgen@{args.ref}"] = lambda: ref_unet.build_unet(setup["model"], **kw)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, lat, lat, generator=g)
    t = torch.rand(b, generator=g) * 1000
    ctx = torch.randn(b, n, setup["context_dim"], generator=g)
    pooled = torch.randn(b, setup["pooled_dim"], generator=g)
    lengths = torch.randint(n // 3, n + 1, (b,), generator=g)  # padded captions, as MiniLM's
    mask = torch.arange(n)[None] < lengths[:, None]
    target = torch.randn(b, c, lat, lat, generator=g)

    models, rows = {}, {}
    for name, build in builders.items():
        torch.manual_seed(0)
        m = build().train()
        rows[name] = dict(params=count_params(m), macs_per_sample=meta_macs(build, name != "diffusers", setup))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        if name == "diffusers":
            def fwd(m=m):
                return m(x, t, ctx, encoder_attention_mask=mask).sample
        else:
            def fwd(m=m):
                return m(x, t, ctx, pooled, encoder_attention_mask=mask).sample
        models[name] = (m, opt, fwd)
    ours = rows["snapgen"]
    for r in rows.values():
        r["params_vs_snapgen"] = r["params"] / ours["params"]
        r["macs_vs_snapgen"] = r["macs_per_sample"] / ours["macs_per_sample"]
    d = rows["diffusers"]
    assert abs(d["params_vs_snapgen"] - 1) < 0.05 and abs(d["macs_vs_snapgen"] - 1) < 0.05, d

    def step(name):
        m, opt, fwd = models[name]
        F.mse_loss(fwd(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in models:  # warm-up (oneDNN primitives, allocator)
        for _ in range(3):
            step(name)
    load_before = os.getloadavg()
    wall, cpu, faults = {k: [] for k in models}, {k: [] for k in models}, {k: [] for k in models}
    for _ in range(args.rounds):
        for name in random.sample(list(models), len(models)):
            f0, w0, c0 = _minor_faults(), time.perf_counter(), time.process_time()
            step(name)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(_minor_faults() - f0)
    for name, r in rows.items():
        r["minor_page_faults_per_step"] = statistics.median(faults[name])
        r["step_s_wall"] = statistics.median(wall[name])
        r["step_s_cpu"] = statistics.median(cpu[name])
        r["samples_per_s_wall"] = b / r["step_s_wall"]
        r["samples_per_s_cpu"] = b / r["step_s_cpu"]
        # samples/s of this model over diffusers', the median of the per-round ratios
        for kind, times in (("wall", wall), ("cpu", cpu)):
            ratios = [d / s for s, d in zip(times[name], times["diffusers"], strict=True)]
            r[f"speed_vs_diffusers_{kind}"] = statistics.median(ratios)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    step(name)
            cats, calls = Counter(), Counter()
            for e in prof.key_averages():
                if e.key.startswith("aten::"):
                    cats[_category(e.key)] += e.self_cpu_time_total / args.profile / 1e3
                    calls[_category(e.key)] += e.count // args.profile
            rows[name]["profile_ms_per_step"] = {k: round(v, 2) for k, v in cats.most_common()}
            rows[name]["profile_aten_calls_per_step"] = dict(calls.most_common())

    result = dict(benchmark="train_step_speed", setup=setup, threads=torch.get_num_threads(), rounds=args.rounds,
                  allocator=args.allocator,
                  cpus=len(os.sched_getaffinity(0)), loadavg_before=load_before, loadavg_after=os.getloadavg(),
                  torch=torch.__version__, models=rows)
    for name, r in rows.items():
        print(f"{name:>16}: {r['params'] / 1e6:.2f}M params, {r['macs_per_sample'] / 1e6:.1f}M MACs/sample | "
              f"step {1e3 * r['step_s_wall']:.1f} ms wall, {1e3 * r['step_s_cpu']:.1f} ms CPU, "
              f"{r['minor_page_faults_per_step']:.0f} page faults | "
              f"speed vs diffusers {r['speed_vs_diffusers_wall']:.3f}x wall, {r['speed_vs_diffusers_cpu']:.3f}x CPU",
              file=sys.stderr)
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
