"""ONNX export of the wrappers (``export/wrappers.py``), checked with ``onnx.checker`` and ONNX Runtime.

Decisions (measured with this machine's versions, torch 2.14, onnx 1.23, onnxruntime 1.32):

* **The dynamo exporter** (``torch.onnx.export(..., dynamo=True)``), opset 18 or later: the
  TorchScript exporter fails on ``aten::rms_norm`` (the UNet's QK RMSNorm, Fig. 2f).
* **No onnxscript graph optimisation by default** (``optimize``): it doubled the export time of
  the tiny UNet (14 s -> 28 s on a 2-core CPU) and ONNX Runtime applies its own graph
  optimisations when it loads a model anyway.
* **fp16 variant**: ``onnxruntime.transformers.float16.convert_float_to_float16`` on the fp32
  graph (its Constant nodes lifted to initializers first and its stale value_info dropped, which
  the converter needs), with fp32 inputs and outputs (``keep_io_types``, as Core ML's fp32
  outputs) and ONNX Runtime's default list of ops kept in fp32. Exporting a half-precision PyTorch model
  instead would need half kernels for every op on the exporting machine (CPU has not all of
  them), and the converter keeps one graph as the single source. Gated at the fp16 threshold.
* **Models larger than 2 GB** (protobuf's limit; Gemma-2-2b in fp32 is 10 GB) keep their weights
  in an external data file next to the ``.onnx``; :func:`onnx_files` lists both.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import SnapgenError
from .wrappers import Exportable

#: The lowest opset the exporter is used with (``aten::rms_norm`` and friends need the dynamo exporter).
MIN_OPSET = 18
#: Protobuf's 2 GB limit, with margin: larger models keep their weights in an external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(double)": "float64"}


def export_onnx(item: Exportable, path: Path, example: tuple[torch.Tensor, ...], *, max_resolution: int,
                opset: int = MIN_OPSET, optimize: bool = False) -> None:
    """Write ``item``'s wrapper to ``path`` (+ external data if large) with dynamic axes, then
    ``onnx.checker``. The exporter's progress lines go to stderr (stdout carries results)."""
    import onnx
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        program = torch.onnx.export(item.module, example, dynamo=True, opset_version=opset,
                                    input_names=item.input_names, output_names=item.output_names,
                                    dynamic_shapes=item.dynamic_shapes(max_resolution), optimize=optimize,
                                    verbose=False, report=False)
        # the exporter annotates every node with its Python stack (5x the weights of a tiny model)
        ClearMetadataAndDocStringPass()(program.model)
        program.save(str(path))  # weights over 2 GB go to an external data file (torch's rule)
    onnx.checker.check_model(str(path), full_check=True)


def convert_fp16(src: Path, dst: Path) -> None:
    """The fp16 variant of the fp32 model at ``src`` (fp32 inputs/outputs), written to ``dst``."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter casts initializers but not the tensors of Constant nodes (which the dynamo
    # exporter emits): lift those to initializers first, or the graph mixes fp32 and fp16 types.
    model = ir.load(str(src))
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    proto = ir.to_proto(model)
    del model
    # Stale value_info types (fp32 where the converter makes fp16, and back) fail type inference:
    # drop them before and after; ONNX Runtime infers the intermediate types itself.
    del proto.graph.value_info[:]
    big = proto.ByteSize() > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
    del proto
    del half.graph.value_info[:]
    half = ir.from_proto(half)
    TopologicalSortPass()(half)  # the converter's input casts can land after their first use
    save_onnx(ir.to_proto(half), dst)
    onnx.checker.check_model(str(dst), full_check=not big)


def save_onnx(model, path: Path) -> None:
    """Save a ModelProto, with an external data file when it is larger than protobuf allows."""
    import onnx

    path = Path(path)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    for old in onnx_files(path):
        old.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data" if external else None)


def onnx_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and the external data files it names (those that exist)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        return []
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / e for e in sorted(extra) if (path.parent / e).is_file()]


def session(path: Path, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session on ``device`` (``cpu``, or ``cuda`` where onnxruntime-gpu is installed)
    with ``threads`` intra-op threads (default: torch's, which a stage sets from ``--threads``)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SnapgenError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu) "
                               "or use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about fp16 casts and unused initialisers are not the user's business
    opts.intra_op_num_threads = threads or torch.get_num_threads()  # the stage's threads (cpu.py), as torch
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SnapgenError(f"{path}: ONNX Runtime cannot load it: {first}") from None


def run(sess, inputs: dict[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run ``sess`` on the inputs it declares (extra ones are left out), outputs in graph order."""
    declared = {i.name for i in sess.get_inputs()}
    feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in inputs.items() if k in declared}
    return sess.run(None, feed)


def describe(sess) -> dict:
    """Inputs and outputs of a session: name, shape (symbolic axes by name) and dtype."""
    def rows(args):
        return [dict(name=a.name, shape=list(a.shape), dtype=_ORT_DTYPES.get(a.type, a.type)) for a in args]

    return dict(inputs=rows(sess.get_inputs()), outputs=rows(sess.get_outputs()))
