"""End to end on tiny models: precompute -> pretrain/finetune -> generate, through the stages.

* the tiny UNet memorises four captioned images, and ``generate`` then reproduces each
  caption's training latent (issue: loss falls, generation reproduces the content);
* a finetune run stopped after a checkpoint and resumed equals an uninterrupted run;
* class-conditional pretraining draws a random synonym of the label's class name.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from conftest import kill_after
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


def captioned_images(images: Path) -> Path:
    """The four captioned shape images as an image folder (``metadata.jsonl``)."""
    images.mkdir()
    lines = []
    for i, (caption, shape, color) in enumerate(CAPTIONS):
        _image(shape, color).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    vae = _tiny_vae(root / "vae")
    images = captioned_images(root / "images")
    precompute.run(precompute.Config(source=str(images), resolutions=[32], vae=str(vae), vae_subfolder=None,
                                     encoders="minilm", shard_size=8, dtype="fp32"), StageContext(out_dir=root / "pre"))
    return root


def _finetune_cfg(root, **kw):
    base = dict(data=str(root / "pre"), init_from=None, model="tiny", resolution=32, batch_size=4, lr=1e-3,
                lr_reference_batch=4, tracker="none", log_every=50, ema_decay=0.99, checkpoint_every=1000)
    return finetune.Config(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]


def _latents(pipe, prompts, steps=20):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens, output_type="latent").images


def test_tiny_unet_memorises_and_generate_reproduces_the_captions(shards):
    out = shards / "ft"
    finetune.run(_finetune_cfg(shards, steps=250), StageContext(out_dir=out))
    losses = _losses(out)
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20]), (np.mean(losses[:20]), np.mean(losses[-20:]))

    ds = ShardDataset(shards / "pre")
    train = torch.stack([ds[i]["latents.32"] for i in range(len(ds))]).float()
    captions = [ds[i]["caption"] for i in range(len(ds))]
    pipe = SnapGenPipeline.from_pretrained(out)
    generated = _latents(pipe, captions)
    mse = ((generated[:, None] - train[None]) ** 2).mean(dim=(2, 3, 4))  # generated i vs training j
    assert mse.argmin(dim=1).tolist() == list(range(len(captions)))  # each caption -> its own image
    assert (mse.diag() < 0.3 * train.var()).all(), mse.diag()

    pipe.unet = SnapGenUNet.from_config(pipe.unet.config).eval()  # an untrained UNet does not
    untrained = _latents(pipe, captions)
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


_LOAD_AND_GENERATE = """
import sys, torch
from PIL import Image
from snapgen_cli.core.pipeline import SnapGenPipeline
torch.set_num_threads(1)
pipe = SnapGenPipeline.from_pretrained(sys.argv[1])
gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
images = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=2.0, generator=gens).images
for i, im in enumerate(images):
    im.save(f"{sys.argv[2]}/{i}.png")
"""


def test_a_stage_output_is_a_diffusers_pipeline_that_loads_in_a_new_process(shards, tmp_path):
    """save_pretrained by the stage -> from_pretrained in a fresh interpreter -> the same images."""
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    out = shards / "ft-pipe"
    summary = finetune.run(_finetune_cfg(shards, steps=2), StageContext(out_dir=out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "SnapGenPipeline" and index["resolution"] == 32
    assert index["unet"] == ["snapgen_cli.core.unet", "SnapGenUNet"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert summary["params"] == sum(p.numel() for p in SnapGenUNet.from_pretrained(out / "unet").parameters())
    pipe = SnapGenPipeline.from_pretrained(out)
    assert isinstance(pipe, DiffusionPipeline) and pipe.scheduler.config.shift == 3.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the same kernels, the same rounding
    try:
        gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        here = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=2.0, generator=gens).images
    finally:
        torch.set_num_threads(threads)
    subprocess.run([sys.executable, "-c", _LOAD_AND_GENERATE, str(out), str(tmp_path)], check=True, timeout=300)
    for i, image in enumerate(here):
        there = np.asarray(Image.open(tmp_path / f"{i}.png"), dtype=np.int16)
        assert np.array_equal(np.asarray(image, dtype=np.int16), there), i
    assert not np.array_equal(np.asarray(here[0]), np.asarray(here[1]))  # two seeds/prompts: two images
    # the EMA weights are the pipeline's UNet; the raw weights stay in model/
    ema, raw = SnapGenUNet.from_pretrained(out / "unet"), SnapGenUNet.from_pretrained(out / "model")
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))
    torch.testing.assert_close(pipe.unet.state_dict(), ema.state_dict(), rtol=0, atol=0)


def test_finetune_resume_repeats_the_uninterrupted_run(shards):
    full, cut = shards / "full", shards / "cut"
    finetune.run(_finetune_cfg(shards, steps=6, checkpoint_every=3), StageContext(out_dir=full))
    finetune.run(_finetune_cfg(shards, steps=3, checkpoint_every=3), StageContext(out_dir=cut))
    finetune.run(_finetune_cfg(shards, steps=6, checkpoint_every=3), StageContext(out_dir=cut))  # resume="auto"
    np.testing.assert_allclose(_losses(cut), _losses(full), rtol=0, atol=1e-6)
    a, b = SnapGenUNet.from_pretrained(full / "model"), SnapGenUNet.from_pretrained(cut / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def class_shards(shards):
    """Class-conditional shards (a ClassLabel source with synonyms, as ImageNet-1K for pretrain)."""
    root = shards / "classes"
    names = ["circle, disk, round shape", "square, box", "triangle"]
    imgs = [_image(s, c) for s in ("circle", "square", "triangle", "circle") for c in ("red", "blue")]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 0, 1, 1, 2, 2, 0, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(root / "hf")
    precompute.run(precompute.Config(source=str(root / "hf"), resolutions=[32], vae=str(shards / "vae"),
                                     vae_subfolder=None, encoders="minilm", label_column="label", caption_column=None,
                                     dtype="fp32", shard_size=4), StageContext(out_dir=root / "pre"))
    return root / "pre"


def test_class_conditional_pretrain_uses_random_synonyms(tmp_path, class_shards):
    manifest = json.loads((class_shards / "manifest.json").read_text())
    assert manifest["classes"]["names"][0] == ["circle", "disk", "round shape"]
    cfg = pretrain.Config(data=str(class_shards), model="tiny", resolution=32, steps=3, batch_size=4,
                          lr_reference_batch=4, tracker="none")
    out = tmp_path / "pt"
    summary = pretrain.run(cfg, StageContext(out_dir=out))
    assert summary["steps"] == 3 and np.isfinite(_losses(out)).all()
    assert cfg.lr == 3e-4 and cfg.betas == (0.9, 0.99)  # sup. H
    # the synonym drawn for a label depends on the sample's generator: all synonyms of class 0 appear
    from snapgen_cli.data.shards import ClassText

    ct = ClassText(class_shards)
    seen = {tuple(ct.sample(torch.tensor([0]), torch.Generator().manual_seed(s))["minilm.pooled"][0, :4].tolist())
            for s in range(40)}
    assert len(seen) == 3


# ------------------------------------------------------------------- the real CLI: seed, SIGKILL, DDP


def _pretrain_argv(data: Path, out: Path, *extra) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--model", "tiny", "--resolution", "32",
            "--lr", "1e-3", "--lr-reference-batch", "4", "--tracker", "none", "--ema-decay", "0.9", *extra]


def _snapgen(*argv, launcher=(), **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "snapgen_cli", *argv] if launcher else [sys.executable, "-m", "snapgen_cli", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finished(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _assert_same_training(a: Path, b: Path, loss_tol: float, weight_tol: float) -> None:
    """Per-step losses within ``loss_tol``, the final raw and EMA weights within ``weight_tol``."""
    la, lb = [json.loads(x) for x in (a / "losses.jsonl").read_text().splitlines()], \
        [json.loads(x) for x in (b / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb] and la
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=0, atol=loss_tol)
    for sub in ("model", "unet"):
        wa, wb = SnapGenUNet.from_pretrained(a / sub).state_dict(), SnapGenUNet.from_pretrained(b / sub).state_dict()
        for name in wa:
            err = (wa[name] - wb[name]).abs().max().item()
            assert err <= weight_tol, f"{sub}: {name} differs by {err:.3g} > {weight_tol:.3g}"


def test_same_seed_same_initial_weights_other_seed_other_weights(class_shards, tmp_path):
    """The recipe's run seed controls model initialisation (the UNet is built after seeding)."""
    from snapgen_cli.stages.training import inputs
    from snapgen_cli.train.diffusion import DiffusionTask

    cfg = pretrain.Config(data=str(class_shards), model="tiny", resolution=32, tracker="none")

    def initial(seed):
        from snapgen_cli.stages.base import seeded

        ctx = StageContext(out_dir=tmp_path, seed=seed)
        return DiffusionTask(seeded(cfg, ctx), *inputs(cfg, ctx)).unet.state_dict()

    a, b, c = initial(1), initial(1), initial(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point and a[k].numel() > 1)
    torch.manual_seed(123)  # a different global RNG state before the build changes nothing
    assert all(torch.equal(a[k], v) for k, v in initial(1).items())


def test_pretrain_cli_sigkilled_after_a_checkpoint_resumes_to_the_uninterrupted_run(class_shards, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    common = ("--steps", "60", "--batch-size", "4", "--checkpoint-every", "5")
    _finished(_snapgen(*_pretrain_argv(class_shards, ref, *common)))
    kill_after(_snapgen(*_pretrain_argv(class_shards, killed, *common)), killed / "checkpoints" / "step_000005")
    assert not (killed / "model").exists() and not (killed / "model_index.json").exists()  # it died mid-run
    done = int(json.loads((killed / "losses.jsonl").read_text().splitlines()[-1])["step"])
    assert 5 <= done < 60

    result = json.loads(_finished(_snapgen(*_pretrain_argv(class_shards, killed, *common, "--resume", "auto",
                                                           "--json"))))
    assert result["resumed_from"].startswith(str(killed / "checkpoints" / "step_0000"))
    _assert_same_training(ref, killed, loss_tol=1e-6, weight_tol=1e-6)


def test_pretrain_two_processes_equal_one_process_with_the_same_global_batch(class_shards, tmp_path,
                                                                             accelerate_launch):
    one, two = tmp_path / "one", tmp_path / "two"
    _finished(_snapgen(*_pretrain_argv(class_shards, one, "--steps", "6", "--batch-size", "4")))
    out = _finished(_snapgen(*_pretrain_argv(class_shards, two, "--steps", "6", "--batch-size", "2", "--json"),
                             launcher=accelerate_launch))
    summary = json.loads(out)  # one result on stdout: rank 0 prints
    assert (summary["num_processes"], summary["global_batch"]) == (2, 4)
    # The losses (means over the same global batch) agree to float rounding. The weights agree to
    # a small fraction of one optimizer step: AdamW moves every coordinate by up to ~lr per step
    # whatever its gradient's size, so the other summation order of the all-reduced gradient
    # moves the coordinates whose gradient is near Adam's eps by a part of one step (measured:
    # <= 2e-5 at lr 1e-3 after 6 steps). A wrong data split or a missing gradient sync shows in
    # the losses from step 2 on, at ~1e-3.
    _assert_same_training(one, two, loss_tol=1e-6, weight_tol=0.05 * 1e-3)


def test_encoder_dropout_through_the_training_path_is_ten_percent_unconditional(shards, tmp_path):
    """Sec. 4: three encoders, each dropped with p = 0.464 -> 0.464^3 ~ 10% fully unconditional
    samples, measured on what DiffusionTask.condition feeds the UNet (within binomial error)."""
    from types import SimpleNamespace

    from snapgen_cli.core.text import EncoderSpec, make_tiny_clip, make_tiny_gemma
    from snapgen_cli.train.diffusion import DiffusionTask

    make_tiny_clip(tmp_path / "clip_l", hidden_size=32)
    make_tiny_clip(tmp_path / "clip_g", hidden_size=48, seed=1)
    make_tiny_gemma(tmp_path / "gemma", hidden_size=48)
    clip = dict(kind="clip", max_length=8, layer="penultimate", role="channel", pooled="projection")
    specs = [EncoderSpec(name="clip_l", path=str(tmp_path / "clip_l"), **clip),
             EncoderSpec(name="clip_g", path=str(tmp_path / "clip_g"), **clip),
             EncoderSpec(name="gemma", kind="gemma", path=str(tmp_path / "gemma"), max_length=8, role="sequence")]
    precompute.run(precompute.Config(source=str(shards / "images"), resolutions=[32], vae=str(shards / "vae"),
                                     vae_subfolder=None, encoders=specs, dtype="fp32"),
                   StageContext(out_dir=tmp_path / "pre"))
    task = DiffusionTask(_finetune_cfg(tmp_path, data=str(tmp_path / "pre")), tmp_path / "pre", None)
    assert task.cfg.p_drop == 0.464 and task.layout.names == ["clip_l", "clip_g", "gemma"]

    ds = task.dataset()
    n = 6000
    batch = task.collate([ds[i % len(ds)] for i in range(n)])
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    context, pooled, _ = task.condition(batch, SimpleNamespace(generators=gens, device=torch.device("cpu")))
    uncond = (context.abs().amax(dim=(1, 2)) == 0) & (pooled.abs().amax(dim=1) == 0)
    rate, p = uncond.float().mean().item(), 0.464 ** 3
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, rate  # 4 binomial standard errors
    # each encoder on its own: its pooled slice (CLIPs) or token block (Gemma) is zero in 46.4%
    l0, l1 = task.layout.pooled_slices["clip_l"]
    s0, s1 = task.layout.sequence_slices["gemma"]
    for dropped in ((pooled[:, l0:l1].abs().amax(1) == 0), (context[:, s0:s1].abs().amax(dim=(1, 2)) == 0)):
        assert abs(dropped.float().mean().item() - 0.464) < 4 * (0.464 * 0.536 / n) ** 0.5


def test_bad_vae_or_decoder_fails_when_the_stage_starts_not_after_training(shards, tmp_path):
    """Issue 12 (5): every weight reference is loaded when the stage starts."""
    from snapgen_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"vae: cannot load an AutoencoderKL from '/nonexistent'"):
        finetune.run(_finetune_cfg(shards, steps=2, vae="/nonexistent"), StageContext(out_dir=tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"decoder '/nonexistent': no such file or directory"):
        finetune.run(_finetune_cfg(shards, steps=2, decoder="/nonexistent"), StageContext(out_dir=tmp_path / "b"))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()
