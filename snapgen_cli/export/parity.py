"""The numeric parity gate of ``snapgen export`` (issue 15): exported model vs PyTorch model.

PSNR follows Apple's ml-stable-diffusion (``python_coreml_stable_diffusion/torch2coreml.py``,
``report_correctness``): ``20 * log10(max|reference| / RMSE(reference, output))``. The peak is
the reference's own largest magnitude, not a fixed data range, so the figure is comparable
across models whose outputs live on different scales (velocity, features, images).
"""

from __future__ import annotations

import math

import numpy as np


def _as_float64(x) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like -> a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(reference, output) -> float:
    """Apple's PSNR of ``output`` against ``reference`` (torch tensors or numpy arrays of one shape).

    ``+inf`` when identical; ``-inf`` when the reference is all zeros and the output is not;
    ``nan`` if either holds a non-finite value (a broken export never passes a ``>=`` gate)."""
    ref, out = _as_float64(reference), _as_float64(output)
    if ref.shape != out.shape:
        raise ValueError(f"psnr: shapes differ: reference {ref.shape} vs output {out.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return math.nan
    rmse = math.sqrt(float(np.mean((ref - out) ** 2))) if ref.size else 0.0
    if rmse == 0.0:
        return math.inf
    peak = float(np.abs(ref).max())
    if peak == 0.0:
        return -math.inf
    return 20.0 * math.log10(peak / rmse)


def worst(figures: dict[str, float]) -> float:
    """The lowest PSNR of several outputs (``nan`` if any is ``nan``: a broken output never passes)."""
    values = list(figures.values())
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def gate(model: str, fmt: str, precision: str, figures: dict[str, float], threshold_db: float, where: str = "") -> None:
    """Raise a runtime failure (exit 1) unless every output's PSNR reaches ``threshold_db``: one line
    naming the model, the format and precision, the measured dB and the threshold."""
    from ..errors import SnapgenError

    low = worst(figures)
    if low >= threshold_db:
        return
    name = min(figures, key=lambda k: -math.inf if math.isnan(figures[k]) else figures[k])
    raise SnapgenError(f"parity gate: {model} ({fmt} {precision}{', ' + where if where else ''}) output {name!r} is "
                       f"{low:.1f} dB against PyTorch, below the {threshold_db:g} dB threshold; the export does not "
                       "compute what the model computes (nothing was written)")
