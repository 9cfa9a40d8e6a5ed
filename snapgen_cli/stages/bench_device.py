"""``snapgen bench-device``: parameters, MACs, latency and peak memory of a model.

Targets: ``unet`` (a SnapGen UNet preset or checkpoint), ``decoder`` (the tiny decoder,
sec. 3.2), and the paper's baselines built from their public configs with random
weights: ``sd3-decoder`` (Table 2) and ``sdxl-unet`` (sec. 3.1's starting point).
``compare`` measures other targets in the same run, at the same resolution, and
reports the ratios side by side (the machine is shared and noisy: only figures taken
in one run are compared). ``ablation_ladder`` prints every Fig. 2 step with
parameters and MACs at a 128x128 latent and its change against the previous step,
next to the change sec. 3.1 states.

``export_dir`` benchmarks the artefacts of ``snapgen export`` instead (issue 15): the latency of
one UNet step (the UNet at the sampler's batch: doubled under CFG) and of one decode on ONNX
Runtime (each ONNX precision) side by side with the PyTorch models they were exported from,
in the same run, at the export's resolution and batch; and every artefact's file size next to
the size the paper's parameter counts imply at that precision (379M UNet, 1.38M decoder:
``params x bits / 8``), with the paper's iPhone 16 Pro Max latencies (UNet 274 ms per step,
decoder 119 ms; sec. 3.2, "Discussion of Total On-Device Latency") for reference.

The result goes to ``bench.json`` in the output dir (``snapgen bench-device`` prints its
path, or the result itself with ``--json``); the table goes to stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator
from rich.table import Table

from ..config import StageSettings
from ..core import baselines
from ..core.decoder import PAPER_DECODER, TinyDecoder, build_decoder
from ..core.measure import count_macs, count_params, measure_latency, resolve_device
from ..core.unet import LADDER, PAPER_LADDER_CLAIMS, PAPER_LADDER_DELTAS, PAPER_PARAMS, SnapGenUNet, unet_config
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
    export_dir: str | None = Field(
        None, description="a `snapgen export` dir: its ONNX models on ONNX Runtime vs the PyTorch models (per UNet "
        "step, per decode) at the export's resolution and batch, and its file sizes vs the paper's")

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
        if name in PAPER_LADDER_CLAIMS:
            r["paper_claim"] = PAPER_LADDER_CLAIMS[name]
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


#: The paper's on-device latencies (iPhone 16 Pro Max, 1024^2; sec. 3.2, "Discussion of Total On-Device Latency").
PAPER_DEVICE_MS = {"unet": 274.0, "decoder": 119.0}
#: The paper's parameter counts of the exported models (for the implied file sizes).
PAPER_EXPORT_PARAMS = {"unet": PAPER_PARAMS["snapgen-t2i"], "decoder": PAPER_DECODER["params"]}


def _bits(a: dict) -> int:
    return int(a["palettize_bits"] or {"fp32": 32, "fp16": 16}[a["precision"]])


def bench_export(cfg: Config, console) -> dict:
    """ONNX Runtime vs PyTorch latency of an export's UNet step and decode, and its sizes (module doc)."""
    from pathlib import Path

    from ..core.pipeline import load_pipeline
    from ..export import onnx as ox
    from ..export.runtime import read_manifest
    from ..export.wrappers import decoder_exportable, unet_exportable

    root = Path(cfg.export_dir)
    m = read_manifest(root)
    res, batch = int(m["pipeline"]["resolution"]), int(m["pipeline"]["batch"])
    threads = torch.get_num_threads()
    source = Path(m["source"]["checkpoint"])
    pipe = load_pipeline(source) if (source / "model_index.json").is_file() else None
    modules = {"unet": lambda: unet_exportable(pipe, res).module, "decoder": lambda: decoder_exportable(pipe).module}
    rows = []
    for model in ("unet", "decoder") if cfg.runs else ():  # runs 0: the sizes only
        onnx = [a for a in m["artefacts"] if a["model"] == model and a["format"] == "onnx"]
        if not onnx:
            continue
        inputs = recorded_inputs(onnx[0])
        base = dict(model=model, resolution=res, batch=inputs[next(iter(inputs))].shape[0],
                    paper_device_ms=PAPER_DEVICE_MS[model])
        if pipe is not None:
            console.print(f"[dim]timing {model} on PyTorch ({cfg.device}) ...[/dim]")
            dev = resolve_device(cfg.device)
            module, on_dev = modules[model]().to(dev), [v.to(dev) for v in inputs.values()]
            rows.append(dict(base, runtime="pytorch", precision="fp32", device=str(dev), threads=threads,
                             **measure_latency(partial(module, *on_dev), dev, cfg.runs, cfg.warmup)))
        for a in onnx:
            console.print(f"[dim]timing {model} on ONNX Runtime ({a['precision']}) ...[/dim]")
            sess = ox.session(root / a["path"], cfg.device)
            rows.append(dict(base, runtime="onnxruntime", precision=a["precision"], device=cfg.device, threads=threads,
                             path=a["path"], **measure_latency(partial(ox.run, sess, inputs), torch.device("cpu"),
                                                               cfg.runs, cfg.warmup)))
    sizes = []
    for a in m["artefacts"]:
        row = dict(model=a["model"], format=a["format"], precision=a["precision"], palettize_bits=a["palettize_bits"],
                   bits=_bits(a), size_bytes=a["size_bytes"], params=a.get("params"), path=a["path"])
        if a.get("params"):
            row["bytes_per_param"] = a["size_bytes"] / a["params"]
        if a["model"] in PAPER_EXPORT_PARAMS:
            row["paper_params"] = PAPER_EXPORT_PARAMS[a["model"]]
            row["paper_implied_bytes"] = PAPER_EXPORT_PARAMS[a["model"]] * row["bits"] / 8
        sizes.append(row)
    for r in sizes:  # a palettized package against the fp16 one of the same model: 16 / bits predicts the ratio
        fp16 = next((x for x in sizes if (x["model"], x["format"], x["bits"]) == (r["model"], r["format"], 16)), None)
        if fp16 is not None and r is not fp16:
            r["size_vs_fp16"], r["predicted_vs_fp16"] = r["size_bytes"] / fp16["size_bytes"], r["bits"] / 16
    if pipe is None:
        console.print(f"[yellow]the export's source pipeline {source} is not here: ONNX Runtime timings only[/yellow]")
    _print_export(rows, sizes, console)
    return dict(export_dir=str(root), resolution=res, batch=batch, source_found=pipe is not None, latency=rows,
                sizes=sizes)


def recorded_inputs(a: dict) -> dict[str, torch.Tensor]:
    """Seeded inputs of the shapes an artefact was exported and gated at (``example_shapes``: the
    export's resolution and batch; the UNet at its CFG batch): floats N(0, 1), integers 0."""
    g = torch.Generator().manual_seed(0)
    shapes = a["example_shapes"]  # keys sorted in the JSON: the graph's input list gives the order
    return {i["name"]: torch.randn(shapes[i["name"]], generator=g) if i["dtype"].startswith("float")
            else torch.zeros(shapes[i["name"]], dtype=torch.int64) for i in a["inputs"]}


def _print_export(rows: list[dict], sizes: list[dict], console) -> None:
    t = Table(title="bench-device: exported models, per UNet step / per decode")
    for col in ("model", "runtime", "precision", "batch", "latency ms (median)", "p25-p75", "paper iPhone ms"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["model"], r["runtime"], r["precision"], str(r["batch"]), f"{r['latency_ms_median']:.1f}",
                  f"{r['latency_ms_p25']:.1f}-{r['latency_ms_p75']:.1f}", f"{r['paper_device_ms']:.0f}")
    console.print(t)
    t = Table(title="artefact sizes")
    for col in ("model", "format", "precision", "MiB", "bytes/param", "paper-implied MiB", "vs fp16 (predicted)"):
        t.add_column(col)
    for r in sizes:
        bits = f" {r['palettize_bits']}-bit" if r["palettize_bits"] else ""
        paper = f"{r['paper_implied_bytes'] / 2**20:.1f}" if "paper_implied_bytes" in r else "-"
        ratio = f"{r['size_vs_fp16']:.3f} ({r['predicted_vs_fp16']:.3f})" if "size_vs_fp16" in r else "-"
        t.add_row(r["model"], r["format"], r["precision"] + bits, f"{r['size_bytes'] / 2**20:.2f}",
                  f"{r.get('bytes_per_param', 0):.2f}", paper, ratio)
    console.print(t)


def run(cfg: Config, ctx: StageContext) -> dict:
    console = ctx.console
    if cfg.export_dir:
        result = bench_export(cfg, console)
        atomic_write_json(ctx.out_dir / RESULT_FILE, result)
        return result
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
    if cfg.export_dir:
        return [PlanItem(model=f"export {cfg.export_dir}", inputs=[cfg.export_dir],
                         outputs=[str(ctx.out_dir / RESULT_FILE)], notes=f"ONNX Runtime vs PyTorch, {cfg.runs} runs")]
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
        claim = r.get("paper_claim", "-")  # a stated direction without a number
        fmt = lambda v, none="-": none if v is None else f"{v:+.1f}%"  # noqa: E731
        t.add_row(r["step"], r["change"], f"{r['params'] / 1e6:.1f}", f"{r['gmacs']:.1f}",
                  fmt(r.get("delta_params_pct")), fmt(r.get("delta_macs_pct")), fmt(p.get("params"), claim),
                  fmt(p.get("macs"), claim))
    console.print(t)
