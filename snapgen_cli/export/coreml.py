"""Core ML export of SnapGen's models (issue 15; paper sec. 3.2, Tab. 2, supp. A).

The paper runs its UNet and tiny decoder on an iPhone through Core ML (the Swift Core ML
Diffusers app, supp. A; decoder 119 ms, UNet 274 ms per step on an iPhone 16 Pro Max,
"Discussion of Total On-Device Latency"; Tab. 2: the tiny decoder runs on the neural engine
where SD3's does not). This module turns a PyTorch module into ``.mlpackage`` files the way
Apple's apple/ml-stable-diffusion does, and checks them on Linux, where Core ML's
``predict`` does not exist:

* :func:`export_coreml` -- trace, ``coremltools.convert`` to an ML program, optional k-means
  palettization, optional split into two chunks, atomic save; returns a manifest entry;
* :func:`inspect_mlpackage` -- what a saved package holds: inputs, outputs, MIL op counts,
  every weight's dtype / bit width / number of distinct values, size on disk;
* :func:`coreml_twin` -- the PyTorch twin of a conversion (fp16 compute, palettized weights
  applied back) for the parity gate (``parity.psnr``) on any platform;
* :func:`swift_resource_path` / :func:`write_swift_resources` -- the resource folder of
  Apple's Swift ``StableDiffusion`` package (``TextEncoder``, ``Unet`` or ``UnetChunk1`` +
  ``UnetChunk2``, ``VAEDecoder``, ``vocab.json`` + ``merges.txt``) and a README of what a
  Swift app needs.

Decisions (Apple's practice where it has one; the paper is silent on all of them):

* **ML program, fixed shapes** (``convert_to="mlprogram"``, the shapes of ``example_inputs``):
  Apple's SD models use fixed shapes; the ANE compiles a fixed-shape program best.
* **Input and output dtypes**: float inputs and all outputs are fp32 (a Swift app feeds and
  reads ``Float32`` arrays); bool / integer inputs (an attention mask, token ids) are int32,
  the integer type Core ML inputs have.
* **fp16 compute** (``precision="fp16"``, the default): every op runs in fp16 except the
  elementwise chain that starts at a rank-0/1 float input (the timestep) and ends at the first
  linear/conv layer. That chain is the sinusoidal timestep embedding, whose arguments reach
  1000 rad; fp16 spacing there is 0.5 rad, which would scramble the phases. The PyTorch UNet
  computes the same embedding in fp32 and casts it to the model dtype before its MLP
  (``SnapGenUNet.conditioning``), so the converted program matches :func:`coreml_twin`.
* **Palettization** (``palettize_bits``): ``coremltools.optimize.coreml.palettize_weights``
  with ``OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor")``: one
  look-up table of ``2**bits`` fp16 entries per weight tensor (Apple's "6-bit palettized"
  SD models; per-tensor runs on iOS 16+, per-grouped-channel needs iOS 18). Only the
  weights and biases of ``conv`` and ``linear`` ops with more than 2048 elements
  (coremltools' default ``weight_threshold``) are palettized (a constant that another op
  reads too stays fp16): smaller tensors would gain little, and constants that are not layer
  weights (the 2D RoPE tables, norms) keep their fp16 values. The k-means is coremltools'
  own (optimal 1-D k-means, its bundled ``kmeans1d``, for tensors of 10,000+ fp16 values,
  else scikit-learn's k-means, seeded), which :func:`coreml_twin` calls on the same fp16
  values, so the twin's weights equal the package's weights exactly (tests/test_coreml.py).
* **Chunks** (``chunks=2``): Apple splits its large UNets into ``UnetChunk1`` and
  ``UnetChunk2`` so each piece loads within an iPhone's per-model memory budget; its Swift
  ``Unet`` feeds chunk 2 the original inputs merged with chunk 1's outputs. We cut the
  SnapGen UNet at a layer boundary of its down / mid / up sequence
  (``SnapGenUNet.layer_steps``), where the parameter counts of the two halves are closest,
  in PyTorch, before tracing, so each chunk is an exact piece of the model (and of the twin).
  Chunk 1 takes the UNet's inputs and returns ``hidden`` (the feature map at the cut),
  ``temb`` (the conditioning vector, when chunk 2 has residual blocks) and ``skip_0`` ...
  ``skip_{k-1}`` (the skip connections still on the stack, oldest first); chunk 2 takes those
  plus the text context (and mask) by their original names and returns the UNet's output.
  Intermediate tensors are fp32, like every output. Only 1 or 2 chunks: the Swift package
  loads ``UnetChunk1`` + ``UnetChunk2``, and a third chunk would have to re-emit tensors
  under its own inputs' names.
* **Atomic save**: every package is written into a temp dir beside ``path`` and renamed into
  place only after all of them were written, so a failed conversion leaves earlier output intact.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.unet import SnapGenUNet
from ..errors import ConfigError, SnapgenError
from ..files import staged_outputs
from .ane import ATTENTION_IMPLEMENTATIONS, to_ane_layout
from .parity import psnr

PRECISIONS = ("fp16", "fp32")
#: Bit widths coremltools' k-means palettizer supports; ``snapgen export`` offers 4, 6 and 8.
PALETTIZE_BITS = (1, 2, 3, 4, 6, 8)
DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
#: A weight tensor is palettized when it has more elements than this (coremltools' default).
WEIGHT_THRESHOLD = 2048
#: MIL op types whose weights are palettized, and the PyTorch layers they come from.
PALETTIZED_OPS = ("conv", "linear")
PALETTIZED_LAYERS = (nn.Conv2d, nn.Linear)
#: The ops that end the fp32 timestep chain (module docstring, "fp16 compute").
_FP16_BOUNDARY_OPS = frozenset({"linear", "matmul", "conv", "conv_transpose", "einsum"})
#: Names of the tensors passed from chunk 1 to chunk 2.
CHUNK_HIDDEN, CHUNK_TEMB, CHUNK_SKIP = "hidden", "temb", "skip_{}"
#: Chunked UNets must equal the whole model at least this well (fp32) before conversion.
CHUNK_PSNR_DB = 60.0


def _coremltools():
    """Import coremltools, without its import-time notes on untested torch / scikit-learn
    versions and the macOS-only runtime (Linux has no ``predict``; that is expected here)."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
        import coremltools.optimize.coreml  # noqa: F401  (ct.optimize.coreml)
    except ImportError as e:
        raise SnapgenError("Core ML export needs coremltools; install it (pip install 'coremltools>=9,<10')") from e
    finally:
        logger.setLevel(level)
    _register_torch_ops()
    return ct


def _register_torch_ops() -> None:
    """Converters coremltools 9 lacks, added through its extension point (``register_torch_op``,
    Apple's "composite operators") and only while it has none of its own:

    * ``aten::new_ones`` -- transformers 5 builds every text encoder's attention mask from
      ``q_idx.new_ones((), dtype=torch.bool)`` (``masking_utils.and_masks``): a constant of the
      (static, as every shape of a fixed-shape export) size and dtype.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE

    if _TORCH_OPS_REGISTRY.get_func("new_ones") is not None:
        return

    def new_ones(context, node):
        inputs = _get_inputs(context, node)
        size, dtype = inputs[1], inputs[2]
        sizes = size if isinstance(size, list) else [size]
        if any(s.val is None for s in sizes):
            raise ValueError(f"new_ones {node.name}: a size known only at run time (fixed-shape export expected)")
        shape = [int(v) for s in sizes for v in np.atleast_1d(s.val)]
        np_dtype = NUM_TO_NUMPY_DTYPE[int(dtype.val)] if dtype is not None and dtype.val is not None else np.float32
        context.add(mb.const(val=np.ones(shape, dtype=np_dtype), name=node.name))

    register_torch_op(new_ones)


# ----------------------------------------------------------------------------------------
# Options


def _check_options(precision: str, palettize_bits: int | None, minimum_target: str | None = None,
                   ane_layout: bool = False, attention: str = "original", chunks: int = 1) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if palettize_bits is not None and palettize_bits not in PALETTIZE_BITS:
        raise ConfigError(f"palettize_bits: expected one of {', '.join(map(str, PALETTIZE_BITS))} or none, "
                          f"got {palettize_bits!r}")
    if minimum_target is not None and minimum_target not in DEPLOYMENT_TARGETS:
        raise ConfigError(f"minimum_target: expected one of {', '.join(DEPLOYMENT_TARGETS)}, got {minimum_target!r}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
    if attention != "original" and not ane_layout:
        raise ConfigError(f"attention={attention!r} is an implementation of the neural-engine layout; "
                          "set ane_layout=True or use attention='original'")
    if chunks not in (1, 2):
        raise ConfigError(f"chunks: expected 1 or 2 (Apple's UnetChunk1 + UnetChunk2), got {chunks!r}")


def _example(name: str, value) -> torch.Tensor:
    """An example input as the converted model will take it: float32, or int32 (bool, integers)."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"example input {name!r}: expected a tensor, got {type(value).__name__}")
    value = value.detach().cpu()
    return value.float() if value.is_floating_point() else value.to(torch.int32)


def _first_tensor(out) -> torch.Tensor:
    """The first tensor of a module's output (a tensor, a tuple, a diffusers output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return _first_tensor(out[0])


# ----------------------------------------------------------------------------------------
# Chunks of the UNet


@dataclass
class _Piece:
    """One ``.mlpackage`` to write: ``module`` traced on ``inputs`` (ordered by name)."""

    file: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]


class _UNetChunk(nn.Module):
    """A run of :meth:`SnapGenUNet.layer_steps`. ``first``: takes the UNet's inputs (roles
    sample, timestep, context, pooled[, mask]) and starts with the conditioning and ``conv_in``;
    else takes ``hidden``, [``temb``], [``context``, [``mask``]] and the skips. ``last``: ends
    with the output head; else returns ``hidden``, [``temb``] and the skips left on the stack."""

    def __init__(self, unet: SnapGenUNet, steps, *, first: bool, last: bool, roles: list[str], emit_temb: bool):
        super().__init__()
        self.unet, self.steps, self.first, self.last = unet, steps, first, last
        self.roles, self.emit_temb = roles, emit_temb

    def forward(self, *args: torch.Tensor):
        x = dict(zip(self.roles, args, strict=True))
        unet, mask = self.unet, x.get("mask")
        mask = None if mask is None else mask.bool()
        if self.first:
            temb = unet.conditioning(x["sample"], x["timestep"], x["pooled"])
            h = unet.stem(x["sample"])
            skips = [h]
        else:
            h, temb = x["hidden"], x.get("temb")
            skips = [x[r] for r in self.roles if r.startswith("skip_")]
        for kind, module in self.steps:
            h = unet.run_step(kind, module, h, temb, x.get("context"), mask, skips)
        if self.last:
            return unet.output_head(h)
        return (h, temb, *skips) if self.emit_temb else (h, *skips)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _balanced_cut(unet: SnapGenUNet, steps) -> int:
    """The step index that splits the UNet's parameters most evenly (chunk 1 = steps[:cut])."""
    head = _params(unet.time_proj, unet.time_embedding, unet.pooled_embedding, unet.conv_in)
    sizes = [_params(m) for _, m in steps]
    total = head + sum(sizes) + _params(unet.norm_out, unet.conv_out)
    cuts = range(1, len(steps))
    return min(cuts, key=lambda c: abs(2 * (head + sum(sizes[:c])) - total))


def _uses(steps, what: str) -> bool:
    """Whether a run of steps needs the conditioning vector (``"temb"``) or the text (``"context"``)."""
    for kind, module in steps:
        if kind == "mid_res" and what == "temb":
            return True
        if kind in ("down", "mid", "up") and getattr(module, "res" if what == "temb" else "attn") is not None:
            return True
    return False


def unet_chunks(module: nn.Module, examples: dict[str, torch.Tensor], output_names: list[str],
                stem: str) -> list[_Piece]:
    """Split ``module`` into Apple's two UNet chunks (module docstring, "Chunks").

    ``module`` is a :class:`SnapGenUNet` or an export wrapper holding exactly one, whose inputs
    (``examples``, in order) are the UNet's ``sample, timestep, encoder_hidden_states,
    pooled_projections[, encoder_attention_mask]`` and whose first output is the UNet's
    prediction. Checked: chunk 2 after chunk 1 equals ``module`` on ``examples`` (>= 60 dB, fp32).
    """
    unets = [m for m in module.modules() if isinstance(m, SnapGenUNet)]
    if len(unets) != 1:
        raise ConfigError(f"chunks=2 splits a SnapGen UNet; the module holds {len(unets)} of them")
    if not 4 <= len(examples) <= 5:
        raise ConfigError(f"chunks=2: the UNet takes 4 or 5 inputs (sample, timestep, context, pooled[, mask]); "
                          f"got {len(examples)}: {', '.join(examples)}")
    unet = unets[0]
    steps = unet.layer_steps()
    cut = _balanced_cut(unet, steps)
    tail = steps[cut:]
    emit_temb = _uses(tail, "temb")
    by_role = dict(zip(["sample", "timestep", "context", "pooled", "mask"], examples, strict=False))
    head = _UNetChunk(unet, steps[:cut], first=True, last=False, roles=list(by_role), emit_temb=emit_temb).eval()
    with torch.no_grad():
        passed = head(*examples.values())
    skips = len(passed) - 1 - emit_temb
    out1 = [CHUNK_HIDDEN] + [CHUNK_TEMB] * emit_temb + [CHUNK_SKIP.format(i) for i in range(skips)]
    clash = sorted(set(out1) & set(examples))
    if clash:
        raise ConfigError(f"chunks=2: input names {clash} are taken by the tensors passed between chunks; rename them")
    from_head = dict(zip(out1, passed, strict=True))
    text = [r for r in ("context", "mask") if r in by_role] if _uses(tail, "context") else []
    roles2 = out1[: 1 + emit_temb] + text + out1[1 + emit_temb :]
    inputs2 = {by_role.get(r, r): from_head[r] if r in from_head else examples[by_role[r]] for r in roles2}
    body = _UNetChunk(unet, tail, first=False, last=True, roles=roles2, emit_temb=False).eval()
    with torch.no_grad():
        gap = psnr(_first_tensor(module(*examples.values())), body(*inputs2.values()))
    if not gap >= CHUNK_PSNR_DB:
        raise SnapgenError(f"chunks=2: the two UNet chunks give {gap:.1f} dB against the module (need >= "
                           f"{CHUNK_PSNR_DB:.0f}); the module must pass its inputs to its UNet unchanged")
    return [_Piece(f"{stem}Chunk1.mlpackage", head, dict(examples), out1),
            _Piece(f"{stem}Chunk2.mlpackage", body, inputs2, list(output_names))]


# ----------------------------------------------------------------------------------------
# Conversion


class _Fp32TimestepChain:
    """``op_selector`` of ``FP16ComputePrecision``: True casts an op to fp16. The ops whose
    non-constant inputs all descend from ``fp32_inputs`` stay fp32, up to the first layer op
    (module docstring, "fp16 compute"). Ops arrive in program order."""

    def __init__(self, fp32_inputs: set[str]):
        self.fp32_vars = set(fp32_inputs)

    def __call__(self, op) -> bool:
        args = []
        for value in op.inputs.values():
            args += list(value) if isinstance(value, (list, tuple)) else [value]
        live = [v for v in args if v.op is None or v.op.op_type != "const"]
        if op.op_type not in _FP16_BOUNDARY_OPS and live and all(v.name in self.fp32_vars for v in live):
            self.fp32_vars.update(v.name for v in op.outputs)
            return False
        return True


def _trace(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation note
        return torch.jit.trace(module, inputs, check_trace=False)


def palettize(ct, model, bits: int):
    """``model`` with our palettization (module docstring, "Palettization"): the constants above
    ``WEIGHT_THRESHOLD`` elements read only by conv / linear ops, each by name. (By op type,
    coremltools refuses a constant that one of its passes shared between a linear layer and
    another op, e.g. the zero bias it gives a bias-free linear and a LayerNorm's zero beta.)"""
    cto = ct.optimize.coreml
    op_config = cto.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor",
                                       weight_threshold=WEIGHT_THRESHOLD)
    weights = cto.get_weights_metadata(model, weight_threshold=WEIGHT_THRESHOLD)
    names = [name for name, meta in weights.items()
             if meta.child_ops and all(child.op_type in PALETTIZED_OPS for child in meta.child_ops)]
    return cto.palettize_weights(model, cto.OptimizationConfig(op_name_configs={n: op_config for n in names}))


def _convert(ct, piece: _Piece, precision: str, target: str, palettize_bits: int | None):
    inputs = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32 if t.is_floating_point() else np.int32)
              for n, t in piece.inputs.items()]
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in piece.outputs]
    if precision == "fp32":
        compute = ct.precision.FLOAT32
    else:
        scalars = {n for n, t in piece.inputs.items() if t.is_floating_point() and t.ndim <= 1}
        compute = ct.transform.FP16ComputePrecision(op_selector=_Fp32TimestepChain(scalars))
    try:
        traced = _trace(piece.module, tuple(piece.inputs.values()))
        model = ct.convert(traced, convert_to="mlprogram", inputs=inputs, outputs=outputs,
                           compute_precision=compute, minimum_deployment_target=getattr(ct.target, target),
                           skip_model_load=True)
        if palettize_bits is not None:
            model = palettize(ct, model, palettize_bits)
    except (ConfigError, SnapgenError):
        raise
    except Exception as e:  # coremltools raises many types; one line naming the package
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SnapgenError(f"Core ML conversion of {piece.file} failed: {type(e).__name__}: {first}") from e
    return model


def export_coreml(module: nn.Module, example_inputs: dict[str, torch.Tensor], output_names: list[str],
                  path: str | Path, *, precision: str = "fp16", palettize_bits: int | None = None,
                  minimum_target: str = "iOS17", ane_layout: bool = False, attention: str = "original",
                  chunks: int = 1) -> dict:
    """Convert ``module`` to a Core ML ``.mlpackage`` at ``path`` (two packages
    ``<stem>Chunk1.mlpackage`` and ``<stem>Chunk2.mlpackage`` beside it with ``chunks=2``).

    ``example_inputs`` (name -> tensor, in the order ``module.forward`` takes them) fix the
    input names and shapes; ``output_names`` name the outputs. ``precision`` "fp16" | "fp32"
    (compute; inputs and outputs are fp32), ``palettize_bits`` None | 1, 2, 3, 4, 6, 8 (k-means,
    per tensor), ``minimum_target`` the deployment target ("iOS17"), ``ane_layout`` applies
    :func:`~snapgen_cli.export.ane.to_ane_layout` with ``attention`` ("split_einsum" or
    "split_einsum_v2" for the neural engine, "original" for the GPU) first. The module
    docstring gives the reason for each decision.

    Returns the manifest entry: ``files`` (paths), ``sizes`` (bytes per file), ``size_bytes``,
    ``inputs`` / ``outputs`` of the whole model (name, shape, dtype), ``chunks`` (each file's
    inputs and outputs), ``precision``, ``palettization``, ``minimum_target``, ``ane_layout``,
    ``attention`` and ``conversion_seconds``.
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"Core ML output {str(path)!r}: expected a path ending in .mlpackage")
    _check_options(precision, palettize_bits, minimum_target, ane_layout, attention, chunks)
    if not example_inputs or not output_names:
        raise ConfigError("export_coreml: give at least one example input and one output name")
    ct = _coremltools()
    examples = {name: _example(name, t) for name, t in example_inputs.items()}
    module = module.eval()
    if ane_layout:
        module = to_ane_layout(module, attention)
    start = time.perf_counter()
    if chunks == 1:
        pieces = [_Piece(path.name, module, examples, list(output_names))]
    else:
        pieces = unet_chunks(module, examples, list(output_names), path.stem)
    files = [path.parent / p.file for p in pieces]
    with staged_outputs(files) as staged:
        for piece, tmp in zip(pieces, staged, strict=True):
            _convert(ct, piece, precision, minimum_target, palettize_bits).save(str(tmp))
    seconds = time.perf_counter() - start
    infos = [inspect_mlpackage(f, weights=False) for f in files]
    named = list(zip(files, infos, strict=True))
    return {
        "format": "coreml",
        "files": [str(f) for f in files],
        "sizes": {f.name: info["size_bytes"] for f, info in named},
        "size_bytes": sum(info["size_bytes"] for info in infos),
        "inputs": infos[0]["inputs"],
        "outputs": infos[-1]["outputs"],
        "chunks": [{"file": f.name, "inputs": i["inputs"], "outputs": i["outputs"]} for f, i in named],
        "precision": precision,
        "palettization": None if palettize_bits is None else {
            "mode": "kmeans", "nbits": palettize_bits, "granularity": "per_tensor",
            "weight_threshold": WEIGHT_THRESHOLD, "ops": list(PALETTIZED_OPS)},
        "minimum_target": minimum_target,
        "ane_layout": ane_layout,
        "attention": attention,
        "conversion_seconds": round(seconds, 2),
    }


# ----------------------------------------------------------------------------------------
# Inspection


def _features(features) -> list[dict]:
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    return [{"name": f.name, "shape": [int(s) for s in f.type.multiArrayType.shape],
             "dtype": names.Name(f.type.multiArrayType.dataType).lower()} for f in features]


def _operations(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def _distinct(values: np.ndarray) -> int:
    if values.dtype == np.float16:  # O(n) on the 65536 possible bit patterns
        return int(np.count_nonzero(np.bincount(values.view(np.uint16).ravel(), minlength=1 << 16)))
    return int(np.unique(values).size)


def _weight(op) -> dict | None:
    """A weight of the program: a palettized tensor or a float constant with more than one value."""
    if op.op_type == "constexpr_lut_to_dense":
        lut = op.lut.val
        values = op.materialized_val_inference()
        bits = int(round(math.log2(lut.shape[-2] if lut.ndim > 1 else lut.size)))
        dtype, palettized = lut.dtype, True
    elif op.op_type == "const":
        values = op.val.val
        children = op.outputs[0].child_ops
        if (not isinstance(values, np.ndarray) or values.size < 2 or values.dtype.kind != "f"
                or (children and all(c.op_type.startswith("constexpr_") for c in children))):
            return None
        dtype, palettized, bits = values.dtype, False, values.dtype.itemsize * 8
    else:
        return None
    return {"name": op.outputs[0].name, "shape": list(values.shape), "dtype": np.dtype(dtype).name,
            "bits": bits, "palettized": palettized, "unique_values": _distinct(np.asarray(values)),
            "consumers": sorted({c.op_type for c in op.outputs[0].child_ops}), "values": values}


def _load_program(path: Path):
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ConfigError(f"{path}: not an ML program (.mlpackage of type mlProgram)")
    return spec, load_mil(spec, spec.specificationVersion, model.weights_dir)


def _package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect_mlpackage(path: str | Path, *, weights: bool = True) -> dict:
    """What the ``.mlpackage`` at ``path`` holds, read without Core ML's runtime
    (``MLModel(path, skip_model_load=True)``, the ML program's ops and weight blobs):

    ``inputs`` / ``outputs`` (name, shape, dtype), ``size_bytes`` on disk, ``ops`` (MIL op type
    -> count), and with ``weights``: ``weights`` -- one entry per weight tensor (name, shape,
    dtype, ``bits`` = 16/32 for a plain fp16/fp32 constant or the look-up-table index width of a
    palettized one, ``palettized``, ``unique_values``, ``consumers`` = the op types reading it)
    -- and ``weights_summary`` (tensors and elements per bit width, largest distinct-value
    count of the palettized tensors)."""
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ConfigError(f"{path}: not an .mlpackage (no Manifest.json)")
    if not weights:
        ct = _coremltools()
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        return {"path": str(path), "size_bytes": _package_size(path), "inputs": _features(spec.description.input),
                "outputs": _features(spec.description.output)}
    spec, program = _load_program(path)
    ops = [op for f in program.functions.values() for op in _operations(f)]
    found = [w for w in map(_weight, ops) if w is not None]
    by_bits: dict[str, dict] = {}
    for w in found:
        entry = by_bits.setdefault(str(w["bits"]), {"tensors": 0, "elements": 0})
        entry["tensors"] += 1
        entry["elements"] += int(np.prod(w["shape"]))
    pal = [w["unique_values"] for w in found if w["palettized"]]
    return {
        "path": str(path),
        "size_bytes": _package_size(path),
        "inputs": _features(spec.description.input),
        "outputs": _features(spec.description.output),
        "ops": dict(sorted(Counter(op.op_type for op in ops).items())),
        "weights": [{k: v for k, v in w.items() if k != "values"} for w in found],
        "weights_summary": {"by_bits": by_bits, "palettized_max_unique": max(pal, default=None)},
    }


def mlpackage_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every weight tensor of the package (as :func:`inspect_mlpackage` lists them), decompressed
    (palettized ones as ``lut[indices]``), by MIL name (``<torch name with _>_to_fp16[_palettized]``)."""
    _, program = _load_program(Path(path))
    found = (_weight(op) for f in program.functions.values() for op in _operations(f))
    return {w["name"]: np.asarray(w["values"]) for w in found if w is not None}


# ----------------------------------------------------------------------------------------
# The PyTorch twin


def palettize_array(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` with every element replaced by its k-means centroid: coremltools' own per-tensor
    palettization (``palettize_weights.blockwise_compress``, the function the conversion runs),
    decompressed, so a twin built with it holds exactly the package's weights."""
    _coremltools()
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    params = palettize_weights.blockwise_compress(values, "KMEANS", bits, [0] * values.ndim)
    if params is None:
        raise SnapgenError(f"coremltools could not palettize a tensor of shape {values.shape} to {bits} bits")
    return params.lut.reshape(-1)[np.asarray(params.indices, dtype=np.int64)].reshape(values.shape)


def palettize_module_(module: nn.Module, bits: int) -> int:
    """Palettize in place the weights :func:`export_coreml` palettizes: weights and biases of the
    conv / linear layers with more than ``WEIGHT_THRESHOLD`` elements. Returns their count."""
    count = 0
    with torch.no_grad():
        for layer in module.modules():
            if not isinstance(layer, PALETTIZED_LAYERS):
                continue
            for param in (layer.weight, layer.bias):
                if param is not None and param.numel() > WEIGHT_THRESHOLD:
                    values = palettize_array(param.detach().cpu().numpy(), bits)
                    param.copy_(torch.from_numpy(values).to(param.device, param.dtype))
                    count += 1
    return count


class CoreMLTwin(nn.Module):
    """A module run as its Core ML conversion computes: float inputs of rank >= 2 cast to the
    compute dtype, rank-0/1 float inputs (the timestep) kept in fp32 (export_coreml keeps their
    chain in fp32), integer inputs unchanged; float outputs returned in fp32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        args = [a.to(self.dtype) if a.is_floating_point() and a.ndim >= 2 else a for a in args]
        out = self.module(*args)
        if isinstance(out, torch.Tensor):
            return out.float()
        return type(out)(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)


def coreml_twin(module: nn.Module, *, precision: str = "fp16", palettize_bits: int | None = None) -> nn.Module:
    """The PyTorch twin of ``export_coreml(module, precision=..., palettize_bits=...)``, for the
    parity gate where Core ML's ``predict`` is missing (Linux): a deep copy of ``module`` in
    fp16 (``precision="fp16"``) or fp32, its conv / linear weights palettized exactly as the
    package's (:func:`palettize_module_`), wrapped in :class:`CoreMLTwin`.

    What the twin does not reproduce: the Core ML runtime's own fp16 kernels (accumulation
    order and width of its convs, matmuls, norms), which Linux cannot run. The macOS test in
    tests/test_coreml.py compares ``predict`` with the twin."""
    _check_options(precision, palettize_bits)
    twin = copy.deepcopy(module).eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    nn.Module.to(twin, dtype)  # nn.Module's own: diffusers' ModelMixin.to warns about fp32 modules it has none of
    if palettize_bits is not None:
        palettize_module_(twin, palettize_bits)
    return CoreMLTwin(twin, dtype)


# ----------------------------------------------------------------------------------------
# Apple's Swift StableDiffusion resources

#: Model role -> the resource name Apple's Swift ``StableDiffusion`` package loads
#: (``StableDiffusionPipeline+Resources.swift``, ``StableDiffusionXL+Resources.swift``).
SWIFT_RESOURCES = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "unet": "Unet",
                   "decoder": "VAEDecoder"}


def swift_resource_path(resources_dir: str | Path, role: str) -> Path:
    """Where ``export_coreml`` should write the model of ``role`` (a key of ``SWIFT_RESOURCES``)
    for the Swift package: ``<dir>/Unet.mlpackage`` (chunks: ``UnetChunk1`` / ``UnetChunk2``
    beside it), ``<dir>/VAEDecoder.mlpackage``, ``<dir>/TextEncoder.mlpackage``, ..."""
    if role not in SWIFT_RESOURCES:
        raise ConfigError(f"Swift resource role {role!r}: expected one of {', '.join(SWIFT_RESOURCES)}")
    return Path(resources_dir) / f"{SWIFT_RESOURCES[role]}.mlpackage"


def _io_lines(entry: dict) -> list[str]:
    lines = []
    for chunk in entry["chunks"]:
        fmt = ", ".join(f"`{x['name']}` {x['dtype']} {x['shape']}" for x in chunk["inputs"])
        out = ", ".join(f"`{x['name']}` {x['dtype']} {x['shape']}" for x in chunk["outputs"])
        lines.append(f"  - `{chunk['file']}`: inputs {fmt}; outputs {out}")
    return lines


def write_swift_resources(resources_dir: str | Path, entries: dict[str, dict], *, tokenizer=None,
                          sampler: dict | None = None) -> list[Path]:
    """Complete a folder of packages written to :func:`swift_resource_path` for Apple's Swift
    ``StableDiffusion`` package: ``vocab.json`` + ``merges.txt`` of the CLIP tokenizer
    (``tokenizer``, a transformers ``CLIPTokenizer``; the Swift ``BPETokenizer`` reads these two
    files) when the pipeline has CLIP encoders, and ``README.md`` saying what a Swift app needs.
    ``entries``: role -> the manifest entry :func:`export_coreml` returned; ``sampler``: the
    sampler settings to print (steps, guidance, shift, sigmas ...). Returns the files written."""
    from ..files import atomic_write_text

    root = Path(resources_dir)
    written = []
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "BPE":
            raise ConfigError(f"Swift resources: the tokenizer ({type(tokenizer).__name__}) is not a BPE "
                              "tokenizer; the Swift package reads a CLIP tokenizer's vocab.json + merges.txt")
        written = [root / "vocab.json", root / "merges.txt"]
        with staged_outputs(written) as staged:
            saved = sorted(Path(f).name for f in backend.model.save(str(staged[0].parent)))
            if saved != ["merges.txt", "vocab.json"]:
                raise SnapgenError(f"Swift resources: the tokenizer wrote {saved}, expected merges.txt and vocab.json")
    lines = [
        "# Core ML resources of a SnapGen pipeline",
        "",
        "Laid out as Apple's Swift `StableDiffusion` package (apple/ml-stable-diffusion) loads its",
        "resources. Compile each package on a Mac before an app loads it:",
        "",
        "    xcrun coremlcompiler compile Unet.mlpackage .   # -> Unet.mlmodelc (same for every package)",
        "",
        "## Models",
        "",
    ]
    for role, entry in entries.items():
        pal = entry.get("palettization")
        lines.append(f"- **{role}** ({entry['precision']} compute"
                     + (f", {pal['nbits']}-bit k-means palettized" if pal else "")
                     + f", deployment target {entry['minimum_target']}, {entry['size_bytes']:,} bytes):")
        lines += _io_lines(entry)
    lines += [
        "",
        "## What a Swift app needs",
        "",
        "- Inputs and outputs are fp32 `MLMultiArray`s of exactly the shapes above (fixed shapes).",
        "- The UNet is SnapGen's (paper sec. 3.1), not SD 1.x/2.x's: besides `sample`, `timestep` and",
        "  the token context it takes the pooled text vector (as SD3's MMDiT), so drive it with your own",
        "  prediction call; with two chunks, feed chunk 2 chunk 1's outputs merged with the original",
        "  inputs by name (what `Unet.swift`'s `predictions(from:)` does).",
        "- `timestep` is `sigma * 1000`; the sampler is flow-matching Euler (rectified flow, Eq. 3):",
        "  `x <- x + (sigma_next - sigma) * velocity` over the sigmas of the sampler (below, or",
        "  export.json; they include the time shift), the UNet's output being the velocity. Swift's",
        "  `DiscreteFlowScheduler` is the closest stock scheduler; use the listed sigmas. Classifier-free",
        "  guidance, when the scale is not 1, batches an all-zero context and pooled vector as the",
        "  unconditional input.",
        "- The decoder package takes what its export wrapper takes: with `snapgen export`, the sampler's",
        "  latents as they are (scaling and shift folded in), returning the image in [0, 1].",
        "- Text encoders: the CLIP encoders use `vocab.json` + `merges.txt`; SnapGen's Gemma encoder",
        "  has no Swift counterpart in the package (run it separately or drop it: its tokens are",
        "  zeros when dropped, as in training).",
    ]
    if sampler:
        lines += ["", "## Sampler", ""] + [f"- `{k}`: {v}" for k, v in sampler.items()]
    readme = root / "README.md"
    atomic_write_text(readme, "\n".join(lines) + "\n")
    return written + [readme]
