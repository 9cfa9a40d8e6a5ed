"""``snapgen bench-device``: parameters, MACs, latency and peak memory of a model.

Targets: ``unet`` (a SnapGen UNet preset or checkpoint), ``decoder`` (the tiny decoder,
sec. 3.2), and the paper's baselines built from their public configs with random
weights: ``sd3-decoder`` (Table 2) and ``sdxl-unet`` (sec. 3.1's starting point).
``compare`` measures other targets in the same run, at the same resolution, and
reports the ratios side by side (the machine is shared and noisy: only figures taken
in one run are compared). ``ablation_ladder`` prints every Fig. 2 step with
parameters and MACs at a 128x128 latent and its change against the previous step,
next to the change sec. 3.1 states.

The result goes to ``bench.json`` in the output dir (``snapgen bench-device`` prints its
path, or the result itself with ``--json``); the table goes to stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator
from rich.table import Table

from ..config import StageSettings
from ..core import baselines
from ..core.decoder import PAPER_DECODER, TinyDecoder, build_decoder
from ..core.measure import count_macs, count_params, measure_latency, resolve_device
from ..core.unet import LADDER, PAPER_LADDER_DELTAS, PAPER_PARAMS, SnapGenUNet, unet_config
from ..files import atomic_write_json, find_model_dir
from .base import PlanItem, StageContext

Target = Literal["unet", "decoder", "sd3-decoder", "sdxl-unet"]
#: The result, written into the output dir (the CLI prints its path).
RESULT_FILE = "bench.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Token counts of the text conditioning: 77 CLIP tokens, plus 256 Gemma tokens for the
#: T2I stack (see core/text.py). Used for the UNet's cross-attention input.
CLIP_TOKENS, GEMMA_TOKENS = 77, 256

#: Paper figures (Table 2) for the decoders, for the report.
PAPER_DECODERS = {"snapgen-decoder": PAPER_DECODER, "sd3-decoder": dict(params=49.55e6, macs=4970e9)}


class Config(StageSettings):
    model: Target = Field(
        "unet", description="what to measure; sd3-decoder and sdxl-unet are the paper's baselines (public configs, "
        "random weights)")
    preset: str | None = Field(
        None, description="model preset (unet: snapgen-t2i, snapgen-imagenet, tiny, ladder-a..f; decoder: "
        "snapgen-decoder, tiny); default: snapgen-t2i / snapgen-decoder")
    checkpoint: str | None = Field(None, description="a saved model dir (save_pretrained) instead of a preset")
    resolution: int = Field(1024, gt=0, description="image resolution in pixels, a multiple of 32 (latent = /8)")
    batch_size: int = Field(1, gt=0, description="images per forward pass")
    context_len: int | None = Field(
        None, gt=0, description="text tokens for cross-attention (default: 77 CLIP, +256 Gemma for snapgen-t2i)")
    device: str = Field("cpu", description="cpu, cuda[:i] or mps")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of the timed runs")
    runs: int = Field(5, ge=0, description="timed runs (0: parameters and MACs only)")
    warmup: int = Field(1, ge=0, description="untimed runs before the timed ones")
    compare: list[Target] = Field(
        default_factory=list, description="also measure this target in the same run and report ratios (repeatable)")
    ablation_ladder: bool = Field(False, description="params/MACs of each Fig. 2 step at a 128x128 latent vs. the paper")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("expected a multiple of 32 (latent = resolution/8, divisible by 4)")
        return v


@dataclass
class Built:
    """A model plus how to make its inputs and call it."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[[torch.device, torch.dtype], tuple]
    call: Callable[[torch.nn.Module, tuple], object]


def _unet(cfg: Config, preset: str | None, meta: bool) -> Built:
    if cfg.checkpoint and preset is None:
        path = find_model_dir(cfg.checkpoint)
        model = (SnapGenUNet.from_config(SnapGenUNet.load_config(path)) if meta
                 else SnapGenUNet.from_pretrained(path))
        name = str(path)
    else:
        preset = preset or cfg.preset or "snapgen-t2i"
        model = SnapGenUNet(**unet_config(preset))
        name = preset
    c = model.config
    n = cfg.context_len or (CLIP_TOKENS + GEMMA_TOKENS if c.context_dim > 2048 else CLIP_TOKENS)
    lat = cfg.resolution // 8

    def make(dev, dt):
        b = cfg.batch_size
        return (torch.randn(b, c.in_channels, lat, lat, device=dev, dtype=dt), torch.full((b,), 500.0, device=dev),
                torch.randn(b, n, c.context_dim, device=dev, dtype=dt), torch.randn(b, c.pooled_dim, device=dev, dtype=dt))

    return Built(name, model, make, lambda m, x: m(*x, return_dict=False))


def _decoder(cfg: Config, meta: bool) -> Built:
    if cfg.checkpoint:
        path = find_model_dir(cfg.checkpoint)
        model = TinyDecoder.from_config(TinyDecoder.load_config(path)) if meta else TinyDecoder.from_pretrained(path)
        name = str(path)
    else:
        name = cfg.preset or "snapgen-decoder"
        model = build_decoder(name)
    ch, lat = model.config.latent_channels, cfg.resolution // 8
    return Built(name, model, lambda dev, dt: (torch.randn(cfg.batch_size, ch, lat, lat, device=dev, dtype=dt),),
                 lambda m, x: m.decode(x[0], return_dict=False))


def _sd3_decoder(cfg: Config, meta: bool) -> Built:
    vae = baselines.sd3_vae()
    vae.encoder = None  # only the decoder is measured (Table 2)
    lat = cfg.resolution // 8
    return Built("sd3-decoder", vae, lambda dev, dt: (torch.randn(cfg.batch_size, 16, lat, lat, device=dev, dtype=dt),),
                 lambda m, x: m.decode(x[0], return_dict=False))


def _sdxl_unet(cfg: Config, meta: bool) -> Built:
    unet = baselines.sdxl_unet()
    lat, b = cfg.resolution // 8, cfg.batch_size
    n = cfg.context_len or baselines.SDXL_CONTEXT_LEN

    def make(dev, dt):
        return (torch.randn(b, 4, lat, lat, device=dev, dtype=dt), torch.full((b,), 500.0, device=dev),
                torch.randn(b, n, 2048, device=dev, dtype=dt),
                dict(text_embeds=torch.randn(b, 1280, device=dev, dtype=dt), time_ids=torch.randn(b, 6, device=dev, dtype=dt)))

    return Built("sdxl-unet", unet, make, lambda m, x: m(x[0], x[1], x[2], added_cond_kwargs=x[3], return_dict=False))


def build_target(cfg: Config, target: Target, meta: bool, preset: str | None = None) -> Built:
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        if target == "unet":
            return _unet(cfg, preset, meta)
        if target == "decoder":
            return _decoder(cfg, meta)
        if target == "sd3-decoder":
            return _sd3_decoder(cfg, meta)
        return _sdxl_unet(cfg, meta)


def meta_figures(cfg: Config, target: Target, preset: str | None = None) -> dict:
    """Parameters and MACs of ``target``, counted on the meta device (nothing allocated)."""
    built = build_target(cfg, target, meta=True, preset=preset)
    macs = count_macs(lambda: built.call(built.model, built.make_inputs(torch.device("meta"), torch.float32)))
    return dict(model=target, name=built.name, params=count_params(built.model), macs=macs, gmacs=macs / 1e9,
                resolution=cfg.resolution, latent=cfg.resolution // 8, batch_size=cfg.batch_size)


def measure_target(cfg: Config, target: Target, preset: str | None = None, console=None) -> dict:
    """Params and MACs (meta device) and, if ``cfg.runs``, latency + memory on ``cfg.device``."""
    row = meta_figures(cfg, target, preset)
    if cfg.runs:
        if console:
            console.print(f"[dim]timing {target} ({row['name']}) at {cfg.resolution}px on {cfg.device} ...[/dim]")
        dev, dt = resolve_device(cfg.device), _DTYPES[cfg.dtype]
        torch.manual_seed(0)
        real = build_target(cfg, target, meta=False, preset=preset)
        model = real.model.to(dev).eval()
        if dt != torch.float32:
            model = model.to(dt)
        inputs = real.make_inputs(dev, dt)
        row.update(measure_latency(lambda: real.call(model, inputs), dev, cfg.runs, cfg.warmup),
                   device=str(dev), dtype=cfg.dtype, threads=torch.get_num_threads())
        del real, model, inputs
    return row


def ablation_ladder(cfg: Config) -> list[dict]:
    """Each Fig. 2 step at a 128x128 latent (sec. 3.1's measuring point), with deltas."""
    ladder_cfg = cfg.model_copy(update=dict(resolution=1024, runs=0, checkpoint=None))
    rows, prev = [], None
    for name, what in LADDER:
        r = measure_target(ladder_cfg, "unet", preset=name)
        r.update(step=name, change=what, paper=PAPER_LADDER_DELTAS.get(name, {}))
        if prev:
            r["delta_params_pct"] = 100 * (r["params"] / prev["params"] - 1)
            r["delta_macs_pct"] = 100 * (r["macs"] / prev["macs"] - 1)
        rows.append(r)
        prev = r
    return rows


def _ratios(main: dict, other: dict) -> dict:
    out = dict(params=other["params"] / main["params"], macs=other["macs"] / main["macs"])
    if "latency_ms_median" in main and "latency_ms_median" in other:
        out["latency"] = other["latency_ms_median"] / main["latency_ms_median"]
    return out


def run(cfg: Config, ctx: StageContext) -> dict:
    console = ctx.console
    if cfg.ablation_ladder:
        rows = ablation_ladder(cfg)
        _print_ladder(rows, console)
        result = dict(ablation_ladder=rows)
    else:
        main = measure_target(cfg, cfg.model, console=console)
        paper = PAPER_PARAMS.get(main["name"]) if cfg.model == "unet" else PAPER_DECODERS.get(main["name"], {}).get("params")
        if paper:
            main["paper_params"] = paper
            main["params_vs_paper_pct"] = 100 * (main["params"] / paper - 1)
        if main["name"] in PAPER_DECODERS:
            main["paper_macs"] = PAPER_DECODERS[main["name"]]["macs"]
            main["macs_vs_paper_pct"] = 100 * (main["macs"] / main["paper_macs"] - 1)
        result = dict(main)
        if cfg.compare:
            others = [measure_target(cfg, t, console=console) for t in cfg.compare]
            result["compare"] = others
            result["ratios"] = {o["name"]: _ratios(main, o) for o in others}
        _print_rows([main] + result.get("compare", []), console)
    atomic_write_json(ctx.out_dir / RESULT_FILE, result)
    return result


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    if cfg.ablation_ladder:
        return [PlanItem(model=f"unet ladder ({len(LADDER)} steps)", outputs=[str(ctx.out_dir / RESULT_FILE)])]
    items = []
    for t in [cfg.model, *cfg.compare]:
        built = build_target(cfg, t, meta=True)
        items.append(PlanItem(model=f"{t}:{built.name}", params=count_params(built.model),
                              outputs=[str(ctx.out_dir / RESULT_FILE)], notes=f"{cfg.resolution}px, {cfg.runs} runs"))
    return items


def _print_rows(rows: list[dict], console) -> None:
    t = Table(title="bench-device")
    for col in ("model", "params (M)", "GMACs", "latency ms (median)", "p25-p75", "peak mem (MB)"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        lat = f"{r['latency_ms_median']:.1f}" if "latency_ms_median" in r else "-"
        spread = f"{r['latency_ms_p25']:.1f}-{r['latency_ms_p75']:.1f}" if "latency_ms_p25" in r else "-"
        mem = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        t.add_row(f"{r['model']}:{r['name']}", f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.1f}", lat, spread, mem)
    console.print(t)


def _print_ladder(rows: list[dict], console) -> None:
    t = Table(title="Fig. 2 ablation ladder (128x128 latent)")
    for col in ("step", "change", "params (M)", "GMACs", "d params", "d MACs", "paper d params", "paper d MACs"):
        t.add_column(col)
    for r in rows:
        p = r["paper"]
        fmt = lambda v: "-" if v is None else f"{v:+.1f}%"  # noqa: E731
        t.add_row(r["step"], r["change"], f"{r['params'] / 1e6:.1f}", f"{r['gmacs']:.1f}",
                  fmt(r.get("delta_params_pct")), fmt(r.get("delta_macs_pct")), fmt(p.get("params")), fmt(p.get("macs")))
    console.print(t)
