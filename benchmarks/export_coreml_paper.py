"""Core ML export of the paper's two models at their sizes (random weights), fp16 and palettized.

Converts the ``snapgen-decoder`` (1.37M parameters) and the ``snapgen-t2i`` UNet (~393M) for a
1024^2 image (128x128 latent; the UNet with the student's text layout, context (1, 333, 2304),
pooled (1, 2048)) with ``export_coreml`` in fp16 and 6-bit k-means palettized, and reports per
model and variant: conversion seconds, package bytes, the size the 16/6 accounting predicts
for the palettized package (every palettized tensor of n values: 2n bytes -> 6n/8 + a 64-entry
fp16 table; the rest unchanged), the measured fp16 / 6-bit ratio, the palettized tensors' own
ratio, and parity of the PyTorch twin (``coreml_twin``) against the fp32 model. The twin's
palettized weights are checked against the package's, value for value.

Parity runs the twin on a smaller latent (``--parity-latent``, 32 -> a 256^2 image by default)
with the same weights: a 1024^2 fp16 forward of the UNet on a 2-core CPU takes minutes, and the
twin computes the same function at any size. Core ML's own ``predict`` needs macOS.

    python benchmarks/export_coreml_paper.py --models decoder,unet --out benchmarks/results/export_coreml_paper.json

Prints one JSON object on stdout (and writes it to ``--out``); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from snapgen_cli.core.decoder import build_decoder
from snapgen_cli.core.text import TextLayout, student
from snapgen_cli.core.unet import build_unet
from snapgen_cli.export import coreml
from snapgen_cli.export.parity import psnr
from snapgen_cli.files import atomic_write_json


class UNetSignature(nn.Module):
    """(sample, timestep, context, pooled) -> velocity."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, pooled):
        return self.unet(sample, timestep, context, pooled, return_dict=False)[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_and_inputs(name: str, latent: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "decoder":
        return build_decoder("snapgen-decoder").eval(), {"z": torch.randn(1, 16, latent, latent, generator=g)}
    layout = TextLayout.from_specs(student())
    unet = UNetSignature(build_unet("snapgen-t2i", **layout.unet_kwargs())).eval()
    return unet, {"sample": torch.randn(1, 16, latent, latent, generator=g), "timestep": torch.tensor([987.3]),
                  "encoder_hidden_states": torch.randn(1, layout.seq_len, layout.context_dim, generator=g),
                  "pooled_projections": torch.randn(1, layout.pooled_dim, generator=g)}


def fp16_set(arrays) -> set[bytes]:
    return {np.ascontiguousarray(a, dtype=np.float16).tobytes() for a in arrays}


def run_model(name: str, latent: int, parity_latent: int, bits: int, workdir: Path) -> dict:
    module, inputs = model_and_inputs(name, latent)
    params = sum(p.numel() for p in module.parameters())
    out_name = ["image"] if name == "decoder" else ["velocity"]
    result: dict = {"parameters": params, "inputs": {k: list(v.shape) for k, v in inputs.items()}}
    entries = {}
    for variant, kw in (("fp16", {}), (f"palettized_{bits}bit", {"palettize_bits": bits})):
        log(f"{name}: converting {variant}")
        entry = coreml.export_coreml(module, inputs, out_name, workdir / variant / f"{name}.mlpackage", **kw)
        info = coreml.inspect_mlpackage(entry["files"][0])
        entries[variant] = (entry, info)
        result[variant] = {"conversion_seconds": entry["conversion_seconds"], "size_bytes": entry["size_bytes"],
                           "weights_by_bits": info["weights_summary"]["by_bits"],
                           "palettized_max_unique": info["weights_summary"]["palettized_max_unique"],
                           "ops": sum(info["ops"].values())}
        log(f"{name}: {variant}: {entry['conversion_seconds']} s, {entry['size_bytes']:,} bytes")
    fp16, pal = result["fp16"], result[f"palettized_{bits}bit"]
    palettized = [int(np.prod(w["shape"])) for w in entries[f"palettized_{bits}bit"][1]["weights"] if w["palettized"]]
    lut = 2 * 2**bits
    predicted = fp16["size_bytes"] - sum(2 * n - (-(-bits * n // 8) + lut) for n in palettized)
    result["size_accounting"] = {
        "palettized_tensors": len(palettized), "palettized_elements": sum(palettized),
        "predicted_palettized_bytes": predicted,
        "measured_minus_predicted_bytes": pal["size_bytes"] - predicted,
        "measured_ratio_fp16_to_palettized": round(fp16["size_bytes"] / pal["size_bytes"], 4),
        "palettized_tensors_ratio": round(2 * sum(palettized) / sum(-(-bits * n // 8) + lut for n in palettized), 4),
        "ideal_ratio": round(16 / bits, 4),
    }
    # the twin: its palettized weights are the package's, and its parity against the fp32 model
    log(f"{name}: building twins")
    twin16 = coreml.coreml_twin(module)
    twin_pal = coreml.coreml_twin(module, palettize_bits=bits)
    packaged = coreml.mlpackage_weights(entries[f"palettized_{bits}bit"][0]["files"][0])
    pal_values = [v for k, v in packaged.items() if "_palettized" in k]
    result["twin_weights_equal_package"] = (len(pal_values) == len(palettized) and
                                            fp16_set(pal_values) <= fp16_set(p.detach().numpy()
                                                                             for p in twin_pal.module.parameters()))
    del packaged, pal_values
    _, small = model_and_inputs(name, parity_latent)
    log(f"{name}: parity at latent {parity_latent}")
    with torch.no_grad():
        ref = module(*small.values())
        start = time.perf_counter()
        out16 = twin16(*small.values())
        result["parity"] = {"latent": parity_latent, "fp16_twin_db": round(psnr(ref, out16), 2),
                            "fp16_twin_forward_seconds": round(time.perf_counter() - start, 2),
                            f"palettized_{bits}bit_twin_db": round(psnr(ref, twin_pal(*small.values())), 2)}
    log(f"{name}: parity {result['parity']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="decoder,unet", help="comma-separated: decoder, unet")
    ap.add_argument("--latent", type=int, default=128, help="latent size of the packages (128 = 1024^2)")
    ap.add_argument("--parity-latent", type=int, default=32, help="latent size of the twin parity check")
    ap.add_argument("--bits", type=int, default=6, choices=(4, 6, 8))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; "
                         "conversion seconds are contended wall time)",
              "torch": torch.__version__, "coremltools": coreml._coremltools().__version__,
              "latent": args.latent, "models": {}}
    with tempfile.TemporaryDirectory(prefix="coreml-paper-") as tmp:
        for name in args.models.split(","):
            report["models"][name] = run_model(name, args.latent, args.parity_latent, args.bits, Path(tmp))
            if args.out:  # keep what is done if a later model fails
                atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
