"""End to end on tiny models: precompute -> pretrain/finetune -> generate, through the stages.

* the tiny UNet memorises four captioned images, and ``generate`` then reproduces each
  caption's training latent (issue: loss falls, generation reproduces the content);
* a finetune run stopped after a checkpoint and resumed equals an uninterrupted run;
* class-conditional pretraining draws a random synonym of the label's class name.
"""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from snapgen_cli.core.pipeline import SnapGenPipeline
from snapgen_cli.core.unet import SnapGenUNet
from snapgen_cli.data.shapes import ShapeObject, ShapeSpec, render
from snapgen_cli.data.shards import ShardDataset
from snapgen_cli.stages import finetune, precompute, pretrain
from snapgen_cli.stages.base import StageContext

CAPTIONS = [("a red circle", "circle", "red"), ("a blue square", "square", "blue"),
            ("a green triangle", "triangle", "green"), ("a yellow circle", "circle", "yellow")]


def _image(shape, color, res=32):
    return render(ShapeSpec("colors", [ShapeObject(shape, color, (0.25, 0.25, 0.75, 0.75))]), res)


def _tiny_vae(path: Path) -> Path:
    """A random 4-channel, f=2 AutoencoderKL whose latents are normalised to unit variance
    (scaling_factor = 1/std, shift_factor = mean, as SD3 does for its VAE)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8)
    probe = torch.stack([torch.from_numpy(np.asarray(_image(s, c), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                         for s in ("circle", "square", "triangle") for c in ("red", "blue", "green", "yellow")])
    with torch.no_grad():
        z = vae.encode(probe).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / z.std()), shift_factor=float(z.mean()))
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    vae = _tiny_vae(root / "vae")
    images = root / "images"
    images.mkdir()
    lines = []
    for i, (caption, shape, color) in enumerate(CAPTIONS):
        _image(shape, color).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    precompute.run(precompute.Config(source=str(images), resolutions=[32], vae=str(vae), vae_subfolder=None,
                                     encoders="minilm", shard_size=8, dtype="fp32"), StageContext(out_dir=root / "pre"))
    return root


def _finetune_cfg(root, **kw):
    base = dict(data=str(root / "pre"), init_from=None, model="tiny", resolution=32, batch_size=4, lr=1e-3,
                lr_reference_batch=4, tracker="none", log_every=50, ema_decay=0.99, checkpoint_every=1000)
    return finetune.Config(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]


def test_tiny_unet_memorises_and_generate_reproduces_the_captions(shards):
    out = shards / "ft"
    finetune.run(_finetune_cfg(shards, steps=250), StageContext(out_dir=out))
    losses = _losses(out)
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20]), (np.mean(losses[:20]), np.mean(losses[-20:]))

    ds = ShardDataset(shards / "pre")
    train = torch.stack([ds[i]["latents.32"] for i in range(len(ds))]).float()
    captions = [ds[i]["caption"] for i in range(len(ds))]
    pipe = SnapGenPipeline.from_dir(out)
    _, generated = pipe(captions, seed=0, steps=20, guidance=1.0, return_latents=True)
    mse = ((generated[:, None] - train[None]) ** 2).mean(dim=(2, 3, 4))  # generated i vs training j
    assert mse.argmin(dim=1).tolist() == list(range(len(captions)))  # each caption -> its own image
    assert (mse.diag() < 0.3 * train.var()).all(), mse.diag()

    pipe.unet = SnapGenUNet.from_config(pipe.unet.config).eval()  # an untrained UNet does not
    _, untrained = pipe(captions, seed=0, steps=20, guidance=1.0, return_latents=True)
    assert (((untrained - train) ** 2).mean(dim=(1, 2, 3)) > 0.5 * train.var()).all()


def test_generate_cli_same_seed_same_image(shards, run_cli, tmp_path):
    out = shards / "ft-gen"
    finetune.run(_finetune_cfg(shards, steps=4), StageContext(out_dir=out))
    args = ["generate", "a red circle", "a blue square", "--checkpoint", out, "--steps", "3", "--json"]
    code, stdout, err = run_cli(*args, "--out", tmp_path / "a", "--batch-size", "2")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["images"] == 2 and (tmp_path / "a" / "grid.png").is_file()
    code, _, _ = run_cli(*args, "--out", tmp_path / "b", "--batch-size", "1")
    pixels = {d: [np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for name in res["files"]]
              for d in ("a", "b")}
    for a, b in zip(pixels["a"], pixels["b"]):  # same seeds, other batch size -> the same image
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01  # kernels may round differently per batch
    assert np.abs(pixels["a"][0] - pixels["a"][1]).mean() > 1  # two seeds/prompts: two images
    code, _, err = run_cli("generate", "--checkpoint", out, "--out", tmp_path / "c")
    assert code == 2 and "give prompts" in err


def test_finetune_resume_repeats_the_uninterrupted_run(shards):
    full, cut = shards / "full", shards / "cut"
    finetune.run(_finetune_cfg(shards, steps=6, checkpoint_every=3), StageContext(out_dir=full))
    finetune.run(_finetune_cfg(shards, steps=3, checkpoint_every=3), StageContext(out_dir=cut))
    finetune.run(_finetune_cfg(shards, steps=6, checkpoint_every=3), StageContext(out_dir=cut))  # resume="auto"
    np.testing.assert_allclose(_losses(cut), _losses(full), rtol=0, atol=1e-6)
    a, b = SnapGenUNet.from_pretrained(full / "model"), SnapGenUNet.from_pretrained(cut / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_class_conditional_pretrain_uses_random_synonyms(tmp_path, shards):
    names = ["circle, disk, round shape", "square, box", "triangle"]
    imgs = [_image(s, "red") for s in ("circle", "square", "triangle", "circle")]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(tmp_path / "hf")
    precompute.run(precompute.Config(source=str(tmp_path / "hf"), resolutions=[32], vae=str(shards / "vae"),
                                     vae_subfolder=None, encoders="minilm", label_column="label", caption_column=None,
                                     dtype="fp32"), StageContext(out_dir=tmp_path / "pre"))
    manifest = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert manifest["classes"]["names"][0] == ["circle", "disk", "round shape"]
    cfg = pretrain.Config(data=str(tmp_path / "pre"), model="tiny", resolution=32, steps=3, batch_size=4,
                          lr_reference_batch=4, tracker="none")
    out = tmp_path / "pt"
    summary = pretrain.run(cfg, StageContext(out_dir=out))
    assert summary["steps"] == 3 and np.isfinite(_losses(out)).all()
    assert cfg.lr == 3e-4 and cfg.betas == (0.9, 0.99)  # sup. H
    # the synonym drawn for a label depends on the sample's generator: all synonyms of class 0 appear
    from snapgen_cli.data.shards import ClassText

    ct = ClassText(tmp_path / "pre")
    seen = {tuple(ct.sample(torch.tensor([0]), torch.Generator().manual_seed(s))["minilm.pooled"][0, :4].tolist())
            for s in range(40)}
    assert len(seen) == 3
