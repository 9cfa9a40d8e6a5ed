"""``snapgen export``: a saved pipeline -> ONNX and Core ML artefacts, each behind a numeric parity gate.

The paper's point is generation on a phone (sec. 3.2, Tab. 2; "Discussion of Total On-Device
Latency": 1024^2 in ~1.4 s on an iPhone 16 Pro Max, UNet 274 ms per step, decoder 119 ms;
the contributions paragraph: a Core ML Diffusers app). This stage converts every model of a
pipeline dir (``pretrain`` ... ``step-distill`` output) -- the UNet, the tiny decoder and each
text encoder of the stack -- through the export wrappers (``export/wrappers.py``), and writes::

    <out>/export.json        the manifest (below); the CLI prints its path
    <out>/onnx/              unet.onnx, decoder.onnx, text.<encoder>.onnx (+ .fp16.onnx variants)
    <out>/coreml/            Unet.mlpackage (or UnetChunk1 + UnetChunk2), VAEDecoder.mlpackage,
                             TextEncoder*.mlpackage, vocab.json + merges.txt (CLIP's BPE files),
                             README.md (what a Swift app needs: ``export.coreml.write_swift_resources``)
    <out>/tokenizers/<name>/ each encoder's tokenizer (``AutoTokenizer.from_pretrained``)
    <out>/scheduler/         the sampler (diffusers scheduler config: shift, objective)

**Parity gate.** Every artefact is run on fixed seeded inputs against the PyTorch wrapper in
fp32; the PSNR of each output (Apple's formula, ``export/parity.py``) must reach
``parity_fp32_db`` (60 dB) for fp32 ONNX and ``parity_fp16_db`` (35 dB) for fp16 and
palettized artefacts; else the stage fails with exit 1 and one line naming the model, format,
measured dB and threshold, and nothing is written (the export is built in a temporary folder
and moved into place only when every gate passed: an earlier export stays intact).

* ONNX: dynamic batch and latent axes (up to the export resolution), checked at the export
  size (``batch``; the UNet at its CFG batch) and at ``parity_resolutions`` with another batch
  size (default: half the resolution; the text encoders: another batch only). One graph for
  every size, instead of one export per size: a runtime can generate smaller images and any
  batch, and the CFG batch needs a dynamic batch anyway.
* Core ML (``export/coreml.py``): fixed shapes (``resolution``, ``batch``; the UNet at the CFG
  batch ``2 x batch`` when the sampler guides), fp16 compute, fp32 outputs. Core ML's
  ``predict`` exists only on macOS, so on Linux the gate runs the PyTorch twin of what was
  converted (the wrapper in the compute precision, palettized weights applied back), and the
  converted program's structure (names, shapes, op types, weight bit-widths) is recorded.

**The Core ML seam** (``_coreml`` below) calls three functions of ``snapgen_cli/export/coreml.py``::

    export_coreml(module, example_inputs: dict[str, Tensor], output_names: list[str], path: Path, *,
                  precision, palettize_bits, minimum_target, ane_layout, attention, chunks) -> dict
    inspect_mlpackage(path) -> dict      # inputs/outputs/shapes/dtypes, op types, weight bit-widths, size
    coreml_twin(module, *, precision, palettize_bits) -> nn.Module  # fp32 in, fp32 out; leaves `module` as is

``module`` is the fp32 export wrapper (named inputs in ``example_inputs`` order); Core ML runs
after ONNX for every model. The stage records ``export_coreml``'s dict and
``inspect_mlpackage``'s (one per package file) under the artefact's ``export`` and ``structure`` keys.

**What a runtime needs** (``export.json``): the sampler (steps, guidance, objective, shift, the
sigmas and model timesteps of the default step count; the scheduler config), the text stack
(each encoder's tokenizer folder, max length, padding, feature widths, and the SD3-style
layout that combines them: ``core.text.combine``; the unconditional input for CFG is every
encoder dropped: zero context and pooled, all attended) and per artefact the inputs/outputs
with shapes and dtypes, precision, palettization, files and sizes, the parity figures and
``export_s`` (seconds to make it; an fp16 ONNX variant: the fp32 export plus its conversion).
``snapgen generate --backend onnxruntime --checkpoint <out>`` runs the whole pipeline from it
(``export/runtime.py``). A Swift app uses the ``coreml/`` folder with Apple's ``StableDiffusion``
package conventions for the resource names; SnapGen's sampler (Flow-Euler with the shift,
Eq. 3), the text-feature combination and CFG are the app's own (as the manifest describes
them): Apple's pipelines do not implement a rectified-flow UNet with this conditioning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..config import UNSET_IS_PREVIOUS, StageSettings
from ..errors import ConfigError, SnapgenError
from ..files import atomic_write_json
from .base import PlanItem, StageContext

#: The manifest, written into the output dir last (the CLI prints its path).
RESULT_FILE = "export.json"
MANIFEST_VERSION = 1
Format = Literal["onnx", "coreml"]
Component = Literal["text", "unet", "decoder"]
#: Sub-folders an export owns: replaced as a whole by the next export into the same dir.
OWNED_DIRS = ("onnx", "coreml", "tokenizers", "scheduler")
#: Resource names of Apple's Swift ``StableDiffusion`` package (``.mlpackage``; Xcode compiles them to
#: ``.mlmodelc``); text encoders: ``TextEncoder``, ``TextEncoder2`` for the first two CLIPs.
COREML_NAMES = {"unet": "Unet", "decoder": "VAEDecoder"}


class Config(StageSettings):
    checkpoint: str | None = Field(None, description="pipeline dir (a training stage's output); default: previous "
                                                     "stage", json_schema_extra=UNSET_IS_PREVIOUS)
    formats: list[Format] = Field(default_factory=lambda: ["onnx", "coreml"], description="artefact formats")
    components: list[Component] = Field(default_factory=lambda: ["text", "unet", "decoder"],
                                        description="models to export: the text encoders, the UNet, the decoder")
    resolution: int | None = Field(None, gt=0, description="image size in pixels (default: the pipeline's training "
                                                           "resolution); Core ML's fixed shape, ONNX's largest")
    batch: int = Field(1, gt=0, description="images per call (the UNet's Core ML batch doubles under CFG)")
    steps: int | None = Field(None, gt=0, description="sampling steps recorded in export.json (default: the "
                                                      "pipeline's: 28, or the 4/8 it was step-distilled for)")
    guidance: float | None = Field(None, gt=0, description="CFG scale recorded in export.json (default: the "
                                                           "pipeline's: 4.5, or 1 after step distillation)")
    onnx_opset: int = Field(18, ge=18, description="ONNX opset (the dynamo exporter; 18 or later)")
    onnx_fp16: bool = Field(True, description="also write an fp16 ONNX variant (fp32 inputs/outputs), gated at "
                                              "parity_fp16_db")
    onnx_optimize: bool = Field(False, description="run onnxscript's graph optimiser (2x the export time; ONNX "
                                                   "Runtime optimises at load anyway)")
    precision: Literal["fp16", "fp32"] = Field("fp16", description="Core ML compute precision")
    palettize: bool = Field(False, description="Core ML: k-means weight palettization")
    palettize_bits: int = Field(6, description="Core ML palettization bits: 4, 6 or 8")
    minimum_target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] = Field(
        "iOS17", description="Core ML minimum deployment target")
    ane_layout: bool = Field(False, description="Core ML: linear layers as 1x1 convs in the (B, C, 1, S) layout "
                                                "(Apple's neural-engine practice)")
    attention: Literal["original", "split_einsum", "split_einsum_v2"] = Field(
        "original", description="Core ML attention implementation: original (GPU) or split_einsum[_v2] (ANE)")
    chunks: Literal[1, 2] = Field(1, description="Core ML: the UNet in 1 package or 2 (Apple's UnetChunk1 + "
                                                 "UnetChunk2)")
    parity_fp32_db: float = Field(60.0, gt=0, description="parity gate for fp32 artefacts (PSNR, dB)")
    parity_fp16_db: float = Field(35.0, gt=0, description="parity gate for fp16 and palettized artefacts (PSNR, dB)")
    parity_resolutions: list[int] = Field(default_factory=list, description="more image sizes the ONNX gate checks "
                                          "(default: half the resolution, where the UNet allows it)")
    seed: int = Field(0, ge=0, description="seed of the parity inputs")

    @field_validator("palettize_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 6, 8):
            raise ValueError("expected 4, 6 or 8")
        return v

    @field_validator("formats", "components")
    @classmethod
    def _nonempty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("expected at least one")
        return list(dict.fromkeys(v))


# ------------------------------------------------------------------------------------------ plan


def _pipeline_configs(ckpt: Path, ctx: StageContext) -> tuple[dict | None, dict | None, list[dict]]:
    """(UNet config, decoder config, encoder specs) of the pipeline at ``ckpt``, from its files or
    the plan of the stage that writes it (what is unknown is ``None`` / empty)."""
    import json

    if (ckpt / "model_index.json").is_file():
        read = lambda sub: json.loads((ckpt / sub / "config.json").read_text())  # noqa: E731
        return read("unet"), read("decoder"), read("text_encoder").get("specs", [])
    return ctx.planned_for(ckpt).get("unet_config"), None, []


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    import torch

    from ..core import denoiser
    from ..core.decoder import TinyDecoder
    from ..core.measure import count_params

    ckpt = ctx.resolve_input(cfg.checkpoint)
    if ckpt is None:
        raise ConfigError("checkpoint: give the pipeline dir to export (--checkpoint)")
    unet, decoder, specs = _pipeline_configs(Path(ckpt), ctx)
    out = ctx.out_dir
    variants = (["onnx fp32"] + (["onnx fp16"] if cfg.onnx_fp16 else []) if "onnx" in cfg.formats else []) + (
        [f"coreml {cfg.precision}" + (f" palettized {cfg.palettize_bits}-bit" if cfg.palettize else "")]
        if "coreml" in cfg.formats else [])
    notes = (f"{', '.join(variants)} @{cfg.resolution or 'training resolution'}px batch {cfg.batch}; gate "
             f">= {cfg.parity_fp32_db:g} dB fp32, >= {cfg.parity_fp16_db:g} dB fp16/palettized")

    def files(name: str, apple: str) -> list[str]:
        return ([str(out / "onnx" / f"{name}.onnx")] if "onnx" in cfg.formats else []) + (
            [str(out / "coreml" / f"{apple}.mlpackage")] if "coreml" in cfg.formats else [])

    items = []
    with torch.device("meta"):
        if "text" in cfg.components:
            names = [s["name"] for s in specs]
            outputs = [x for i, n in enumerate(names) for x in files(f"text.{n}", _coreml_text_name(specs, i))]
            items.append(PlanItem(model=f"text encoders {', '.join(names) or '(known once the pipeline exists)'}",
                                  inputs=[str(ckpt)], outputs=outputs, notes=notes))
        if "unet" in cfg.components:
            params = count_params(denoiser.build(unet)) if unet else None
            items.append(PlanItem(model="unet", params=params, inputs=[str(ckpt)], outputs=files("unet", "Unet"),
                                  notes=notes))
        if "decoder" in cfg.components:
            tiny = decoder and "latent_channels" in decoder  # an AutoencoderKL's decoder is not planned here
            params = count_params(TinyDecoder.from_config(decoder)) if tiny else None
            items.append(PlanItem(model="decoder", params=params, inputs=[str(ckpt)],
                                  outputs=files("decoder", "VAEDecoder") + [str(out / RESULT_FILE)], notes=notes))
    return items


def _coreml_text_name(specs: list, index: int) -> str:
    """Apple's names for the first two CLIP encoders, ``TextEncoder_<name>`` for the others."""
    kinds = [s["kind"] if isinstance(s, dict) else s.kind for s in specs]
    name = specs[index]["name"] if isinstance(specs[index], dict) else specs[index].name
    clips = [i for i, k in enumerate(kinds) if k == "clip"]
    if index in clips[:2]:
        return "TextEncoder" if clips.index(index) == 0 else "TextEncoder2"
    return f"TextEncoder_{name}"


# ------------------------------------------------------------------------------------------- run


def _sizes(cfg: Config, resolution: int, multiple: int) -> list[int]:
    """The ONNX gate's extra image sizes: ``parity_resolutions``, or half the resolution when valid."""
    sizes = cfg.parity_resolutions or ([resolution // 2] if (resolution // 2) % multiple == 0 and resolution > multiple
                                       else [])
    for s in sizes:
        if s % multiple or s > resolution or s <= 0:
            raise ConfigError(f"parity_resolutions: {s} is not a positive multiple of {multiple} up to the export "
                              f"resolution {resolution} (the ONNX graphs accept sizes up to it)")
    return sizes


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def _figures(reference, outputs, names) -> dict[str, float]:
    from ..export.parity import psnr

    return {n: psnr(r, o) for n, r, o in zip(names, reference, outputs, strict=True)}


def _onnx(item, root: Path, cfg: Config, checks: list[tuple[dict, list, str]], resolution: int) -> list[dict]:
    """Export ``item`` to ONNX (fp32 and, with ``onnx_fp16``, fp16), each gated on ``checks``."""
    from ..export import onnx as ox
    from ..export.parity import gate, worst

    path = root / "onnx" / f"{item.name}.onnx"
    t0 = time.perf_counter()
    # traced at batch 2 (a batch of 1 would be specialised away), the export resolution
    ox.export_onnx(item, path, item.make_inputs(2, resolution, cfg.seed + 1), max_resolution=resolution,
                   opset=cfg.onnx_opset, optimize=cfg.onnx_optimize)
    seconds = time.perf_counter() - t0
    variants = [("fp32", path, cfg.parity_fp32_db, seconds)]
    if cfg.onnx_fp16:
        t0 = time.perf_counter()
        half = path.with_suffix(".fp16.onnx")
        ox.convert_fp16(path, half)
        variants.append(("fp16", half, cfg.parity_fp16_db, seconds + time.perf_counter() - t0))
    entries = []
    for precision, p, threshold, secs in variants:
        sess = ox.session(p)
        parity = []
        for inputs, reference, where in checks:
            figures = _figures(reference, ox.run(sess, inputs), item.output_names)
            gate(item.name, "onnx", precision, figures, threshold, where)
            parity.append(dict(where=where, psnr_db=figures, min_db=worst(figures), threshold_db=threshold))
        files = ox.onnx_files(p)
        entries.append(dict(model=item.name, format="onnx", precision=precision, palettize_bits=None,
                            path=_rel(p, root), files=[_rel(f, root) for f in files], size_bytes=_size(files),
                            opset=cfg.onnx_opset, params=item.params, export_s=round(secs, 2), **ox.describe(sess),
                            example_shapes={k: list(v.shape) for k, v in checks[0][0].items()}, parity=parity))
        del sess
    return entries


def _coreml(item, root: Path, cfg: Config, check: tuple[dict, list, str], apple_name: str) -> list[dict]:
    """The Core ML seam: convert ``item`` with ``export/coreml.py`` and gate its PyTorch twin."""
    import torch

    from ..export.ane import to_ane_layout
    from ..export.coreml import coreml_twin, export_coreml, inspect_mlpackage
    from ..export.parity import gate, worst

    inputs, reference, where = check
    bits = cfg.palettize_bits if cfg.palettize else None
    path = root / "coreml" / f"{apple_name}.mlpackage"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunks = cfg.chunks if item.name == "unet" else 1  # Apple chunks the UNet only
    info = export_coreml(item.module, inputs, item.output_names, path, precision=cfg.precision, palettize_bits=bits,
                         minimum_target=cfg.minimum_target, ane_layout=cfg.ane_layout, attention=cfg.attention,
                         chunks=chunks)
    seconds = time.perf_counter() - t0
    twin_of = to_ane_layout(item.module, cfg.attention) if cfg.ane_layout else item.module  # what was converted
    twin = coreml_twin(twin_of, precision=cfg.precision, palettize_bits=bits)
    with torch.no_grad():
        out = twin(*inputs.values())
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    label = cfg.precision + (f" palettized {bits}-bit" if bits else "")
    threshold = cfg.parity_fp16_db if cfg.precision == "fp16" or bits else cfg.parity_fp32_db
    figures = _figures(reference, [o.float() for o in out], item.output_names)
    gate(item.name, "coreml", label, figures, threshold, f"{where}, PyTorch twin")
    files = [Path(f) for f in info["files"]]  # <name>.mlpackage, or Apple's <name>Chunk1/2.mlpackage
    return [dict(model=item.name, format="coreml", precision=cfg.precision, palettize_bits=bits, path=_rel(path, root),
                 files=[_rel(f, root) for f in files], size_bytes=_size(files), params=item.params,
                 export_s=round(seconds, 2), minimum_target=cfg.minimum_target, ane_layout=cfg.ane_layout,
                 attention=cfg.attention, chunks=chunks, export={**info, "files": [_rel(f, root) for f in files]},
                 structure=[inspect_mlpackage(f) for f in files],
                 example_shapes={k: list(v.shape) for k, v in inputs.items()},
                 parity=[dict(where=f"{where}, PyTorch twin", psnr_db=figures, min_db=worst(figures),
                              threshold_db=threshold)])]


def _min_db(artefact: dict) -> float:
    return min(p["min_db"] for p in artefact["parity"])


def _layout(layout) -> dict:
    return dict(seq_len=layout.seq_len, context_dim=layout.context_dim, pooled_dim=layout.pooled_dim,
                channel_length=layout.channel_length, channel_slices=layout.channel_slices,
                sequence_slices=layout.sequence_slices, pooled_slices=layout.pooled_slices)


def _sampler(pipe, steps: int, guidance: float) -> dict:
    from ..core.flow import Guidance

    objective = pipe.objective
    sched = objective.scheduler(steps)
    return dict(steps=steps, guidance=guidance, cfg=Guidance(scale=guidance).active(steps), objective=objective.name,
                shift=getattr(objective, "shift", None), sigmas=[float(s) for s in sched.sigmas],
                timesteps=[float(t) for t in sched.timesteps], scheduler_class=type(pipe.scheduler).__name__,
                scheduler="scheduler", unconditional="every encoder dropped: zero context and pooled, all attended")


def _side_files(pipe, root: Path) -> list[dict]:
    """Tokenizers and the scheduler config."""
    encoders = []
    for name, enc in pipe.text_encoder.encoders.items():
        enc.tokenizer.save_pretrained(root / "tokenizers" / name)
        s = enc.spec
        encoders.append(dict(name=name, kind=s.kind, tokenizer=f"tokenizers/{name}", max_length=s.max_length,
                             padding=s.padding, role=s.role, width=pipe.layout.widths[name],
                             pooled_width=pipe.layout.pooled_widths[name], spec=s.model_dump(mode="json")))
    pipe.scheduler.save_pretrained(root / "scheduler")
    return encoders


def _publish(tmp: Path, out: Path, manifest: dict) -> None:
    """Move the finished export into ``out`` (replacing the folders an export owns), manifest last."""
    for name in OWNED_DIRS:
        dst = out / name
        if dst.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=out))
            os.replace(dst, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        if (tmp / name).exists():
            os.replace(tmp / name, dst)
    atomic_write_json(out / RESULT_FILE, manifest)


def run(cfg: Config, ctx: StageContext) -> dict:
    import torch

    from .. import __version__
    from ..core import denoiser
    from ..core.pipeline import load_pipeline, pipeline_config
    from ..eval.report import jsonable
    from ..export.wrappers import decoder_exportable, text_exportables, unet_exportable

    ckpt = ctx.resolve_input(cfg.checkpoint)
    if ckpt is None:
        raise ConfigError("checkpoint: give the pipeline dir to export (--checkpoint)")
    index = pipeline_config(ckpt)  # a one-line ConfigError when it is not a pipeline dir
    unet_config = _pipeline_configs(Path(ckpt), ctx)[0]
    resolution = cfg.resolution or int(index["resolution"])
    f = int((index.get("latent") or {}).get("downsample", 8))
    multiple = f * (int(unet_config["patch_size"]) if denoiser.is_dit(unet_config)
                    else 2 ** (len(unet_config["block_channels"]) - 1))
    if resolution % multiple:
        raise ConfigError(f"resolution: expected a multiple of {multiple} for this pipeline (latent /{f}, then the "
                          f"UNet's downsampling), got {resolution}")
    sizes = _sizes(cfg, resolution, multiple)
    if "coreml" in cfg.formats:  # before any work: Core ML runs after ONNX for every model
        try:
            import snapgen_cli.export.coreml  # noqa: F401
        except ImportError as exc:
            raise SnapgenError(f"formats: coreml needs {exc.name} ({exc}); install coremltools>=9.0, or export "
                               "--formats onnx") from None
    console = ctx.console
    pipe = load_pipeline(ckpt)
    steps, guidance = pipe.sampler_settings(cfg.steps, cfg.guidance)
    items = text_exportables(pipe) if "text" in cfg.components else []
    items += [unet_exportable(pipe, resolution)] if "unet" in cfg.components else []
    items += [decoder_exportable(pipe)] if "decoder" in cfg.components else []
    sampler = _sampler(pipe, steps, guidance)
    cfg_factor = 2 if sampler["cfg"] else 1

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=ctx.out_dir))
    try:
        artefacts = []
        specs = list(pipe.layout.specs)
        for item in items:
            batch = cfg.batch * (cfg_factor if item.name == "unet" else 1)
            shapes = [(batch, resolution)] + [(batch + 1, s) for s in sizes]
            if item.name.startswith("text."):
                shapes = [(batch, resolution), (batch + 1, resolution)]
            checks = []
            for n, (b, r) in enumerate(shapes):
                inputs = item.inputs(b, r, cfg.seed + n)
                where = f"batch {b}" + ("" if item.name.startswith("text.") else f", {r}px")
                checks.append((inputs, item.reference(inputs), where))
            console.print(f"[bold]export[/bold] {item.name} ({item.params / 1e6:.2f}M params)")
            made = _onnx(item, tmp, cfg, checks, resolution) if "onnx" in cfg.formats else []
            if "coreml" in cfg.formats:
                apple = (_coreml_text_name(specs, [s.name for s in specs].index(item.name[5:]))
                         if item.name.startswith("text.") else COREML_NAMES[item.name])
                made += _coreml(item, tmp, cfg, checks[0], apple)
            for a in made:
                console.print(f"  {a['format']} {a['precision']}: {a['size_bytes'] / 2**20:.2f} MiB, parity "
                              f">= {_min_db(a):.1f} dB, {a['export_s']:.1f} s")
            artefacts += made
        encoders = _side_files(pipe, tmp)
        if "coreml" in cfg.formats:  # the Swift package's BPE files and a README of what an app needs
            from ..export.coreml import write_swift_resources

            clip = next((e for e in pipe.text_encoder.encoders.values() if e.spec.kind == "clip"), None)
            models = {a["model"]: a["export"] for a in artefacts if a["format"] == "coreml"}
            write_swift_resources(tmp / "coreml", models, tokenizer=clip.tokenizer if clip else None, sampler=sampler)
        manifest = jsonable(dict(
            format_version=MANIFEST_VERSION, created_by=f"snapgen {__version__}", torch=torch.__version__,
            source=dict(checkpoint=str(Path(ckpt).resolve()), unet_class=type(pipe.unet).__name__,
                        decoder_class=type(pipe.decoder).__name__),
            pipeline=dict(resolution=resolution, train_resolution=int(pipe.config.resolution), batch=cfg.batch,
                          size_multiple=multiple, latent=dict(pipe.config.latent)),
            sampler=sampler, text=dict(encoders=encoders, layout=_layout(pipe.layout)),
            parity_thresholds_db=dict(fp32=cfg.parity_fp32_db, fp16_or_palettized=cfg.parity_fp16_db),
            artefacts=artefacts))
        _publish(tmp, ctx.out_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = [dict(model=a["model"], format=a["format"], precision=a["precision"], palettize_bits=a["palettize_bits"],
                    path=a["path"], size_bytes=a["size_bytes"], parity_min_db=_min_db(a),
                    threshold_db=a["parity"][0]["threshold_db"], export_s=a["export_s"]) for a in artefacts]
    return jsonable(dict(export_dir=str(ctx.out_dir), manifest=str(ctx.out_dir / RESULT_FILE), resolution=resolution,
                         batch=cfg.batch, steps=steps, guidance=guidance, artefacts=summary))
