"""``shapes-data``: the built-in captioned data set of the CPU demo (``recipes/demo.toml``).

Writes, deterministically from ``seed``:

* ``captioned/`` -- an image folder with ``metadata.jsonl`` (``file_name``, ``text``, ``spec``):
  GenEval-style captions of simple coloured shapes (``data/shapes.py``), the text-to-image set;
* ``classes/`` -- a Hugging Face ``datasets`` folder (``save_to_disk``) with an ``image`` and a
  ``ClassLabel`` ``label`` column (circle / square / triangle), the class-conditional set the
  ``pretrain`` stage reads like ImageNet-1K ("a photo of <class name>", sup. H);
* ``holdout/`` -- captioned images of another seed, never trained on: the decoder's PSNR and
  the alignment suite's reference set;
* ``photos/`` (``photos = true``) -- the real photographs scikit-image ships (astronaut, coffee,
  chelsea, ...), for autoencoder / decoder training on natural images.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..config import StageSettings
from ..data.shapes import CLASSES_SEED_OFFSET, HOLDOUT_SEED_OFFSET, ShapesClassDataset, ShapesDataset, write_folder
from .base import PlanItem, StageContext

#: scikit-image's bundled colour photographs (they ship inside its wheel).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


class Config(StageSettings):
    resolution: int = Field(64, ge=32, description="image size in pixels")
    n_captioned: int = Field(2000, gt=0, description="captioned (text-to-image) images")
    n_classes: int = Field(600, gt=0, description="class-conditional images (pretrain)")
    n_holdout: int = Field(96, gt=0, description="held-out captioned images (evaluation)")
    seed: int = Field(0, ge=0)
    photos: bool = Field(False, description="also write scikit-image's real photos to photos/")


def plan(cfg: Config, ctx: StageContext) -> list[PlanItem]:
    outs = [str(ctx.out_dir / d) for d in ("captioned", "classes", "holdout")]
    return [PlanItem(model="shapes data set", outputs=outs,
                     notes=f"{cfg.n_captioned}+{cfg.n_classes}+{cfg.n_holdout} images @{cfg.resolution}px")]


def _class_dataset(ds: ShapesClassDataset, out: Path) -> None:
    import datasets

    items = [ds[i] for i in range(len(ds))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(ds.class_names))})
    hf = datasets.Dataset.from_dict({"image": [it["image"] for it in items], "label": [ds.label(i) for i in range(len(ds))]},
                                    features=features)
    tmp = out.with_name(out.name + ".tmp")
    hf.save_to_disk(str(tmp))
    tmp.replace(out)


def _photos(out: Path) -> int:
    import skimage.data
    from PIL import Image

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 3 and arr.shape[2] == 3:
            Image.fromarray(arr).save(tmp / f"{name}.png")
            n += 1
    tmp.replace(out)
    return n


def run(cfg: Config, ctx: StageContext) -> dict:
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    if not (out / "captioned").exists():
        write_folder(out / "captioned", ShapesDataset(cfg.n_captioned, cfg.resolution, cfg.seed))
    if not (out / "holdout").exists():
        write_folder(out / "holdout", ShapesDataset(cfg.n_holdout, cfg.resolution, cfg.seed + HOLDOUT_SEED_OFFSET))
    if not (out / "classes").exists():
        _class_dataset(ShapesClassDataset(cfg.n_classes, cfg.resolution, cfg.seed + CLASSES_SEED_OFFSET), out / "classes")
    if cfg.photos and not (out / "photos").exists():
        res["photos"] = _photos(out / "photos")
    res.update({k: str(out / k) for k in ("captioned", "classes", "holdout")},
               n_captioned=cfg.n_captioned, n_classes=cfg.n_classes, n_holdout=cfg.n_holdout, resolution=cfg.resolution)
    return res
