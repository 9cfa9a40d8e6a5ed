"""``snapgen train-decoder`` (paper sec. 3.2): the joint-autoencoder mode then the tiny decoder
against its frozen encoder, on real photographs (scikit-image ships them), reaching a held-out
PSNR an untrained decoder does not; exact resume; adversarial warm-up; the LPIPS-weights error;
the dry-run plan on the meta device; the data path."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from snapgen_cli.core.decoder import TinyDecoder, build_decoder
from snapgen_cli.core.losses import DecoderLoss, lpips_backbone_checkpoint
from snapgen_cli.core.discriminator import build_discriminator
from snapgen_cli.core.measure import count_params
from snapgen_cli.data.sources import open_source
from snapgen_cli.errors import ConfigError
from snapgen_cli.stages.base import StageContext
from snapgen_cli.stages.train_decoder import Config, plan, run
from snapgen_cli.train.decoder_task import (ImageDataset, TinyDecoderTask, build_autoencoder, encode,
                                            evaluate_decoder, load_patches, random_patches)
from snapgen_cli.train.loop import LoopConfig, sample_generators, train

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
HELD_OUT_PHOTOS = ("chelsea", "camera")  # camera is greyscale: converted to RGB on load


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """Training photos (longer side 192 px) and held-out 64 px crops of two other photos."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    train_dir, eval_dir = root / "train", root / "held_out"
    train_dir.mkdir()
    eval_dir.mkdir()
    for name in TRAIN_PHOTOS:
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((192, 192))
        im.save(train_dir / f"{name}.png")
    for name in HELD_OUT_PHOTOS:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        im.thumbnail((192, 192))
        for k, (x, y) in enumerate([(16, 0), (96, 0), (16, 64), (96, 64)]):  # inside 192 x 128
            im.crop((x, y, x + 64, y + 64)).save(eval_dir / f"{name}_{k}.png")
    return train_dir, eval_dir


def _cfg(photos, **kw) -> Config:
    base = dict(data=str(photos[0]), patch_size=32, batch_size=8, lr=2e-3, lr_reference_batch=8, lpips_weight=0,
                adv_start_step=10**6, ema_decay=0.9, checkpoint_every=10**6, sample_every=0, tracker="none",
                eval_images=str(photos[1]), eval_resolution=64)
    return Config(**{**base, **kw})


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(photos, tmp_path_factory) -> dict:
    """What the CPU demo does: a joint autoencoder, then the tiny decoder against its frozen encoder."""
    root = tmp_path_factory.mktemp("runs")
    ae = run(_cfg(photos, mode="autoencoder", steps=150), StageContext(root / "ae"))
    dec = run(_cfg(photos, vae="previous", decoder="tiny", steps=400, sample_every=200),
              StageContext(root / "decoder", previous=root / "ae"))
    return dict(ae_dir=root / "ae", dec_dir=root / "decoder", ae=ae, dec=dec)


def test_tiny_decoder_reaches_a_held_out_psnr_an_untrained_one_does_not(demo, photos):
    ev = demo["dec"]["eval"]
    assert ev == json.loads((demo["dec_dir"] / "eval.json").read_text())
    trained = ev["tiny_decoder"]
    assert trained["n_images"] == 8 and trained["resolution"] == 64
    assert trained["psnr"] > 16.5, trained  # measured: 17.8 dB
    # Table 2's side-by-side: the frozen autoencoder's own decoder on the same crops (measured: 18.0 dB).
    assert ev["vae_decoder"]["n_images"] == 8 and trained["psnr"] > ev["vae_decoder"]["psnr"] - 2.5
    vae = AutoencoderKL.from_pretrained(demo["ae_dir"] / "model_ema")
    for seed in (0, 1):  # measured: 11.9, 11.6 dB (a flat grey image: ~12.8 dB)
        torch.manual_seed(seed)
        untrained = evaluate_decoder(build_decoder("tiny", latent_channels=16), vae, photos[1], 64)
        assert untrained["psnr"] < 14.0 and untrained["psnr"] < trained["psnr"] - 4.0, untrained
    mse = [r["generator/mse"] for r in _losses(demo["dec_dir"])]
    assert len(mse) == 400 and sum(mse[-40:]) < 0.6 * sum(mse[:40])


def test_outputs_are_loadable_and_the_autoencoder_gets_sd_style_latent_factors(demo, photos):
    factors = demo["ae"]["latent_factors"]["model_ema"]
    ae = AutoencoderKL.from_pretrained(demo["ae_dir"] / "model_ema")
    assert ae.config.scaling_factor == pytest.approx(factors["scaling_factor"])
    assert ae.config.shift_factor == pytest.approx(factors["shift_factor"])
    assert AutoencoderKL.from_pretrained(demo["ae_dir"] / "model").config.scaling_factor == pytest.approx(
        demo["ae"]["latent_factors"]["model"]["scaling_factor"])
    # Normalised latents of held-out photos are roughly standardised, as a diffusion model expects.
    z = (encode(ae, load_patches(sorted(photos[1].iterdir()), 64)) - ae.config.shift_factor) * ae.config.scaling_factor
    assert abs(z.mean().item()) < 0.5 and 0.5 < z.std().item() < 2.0
    # The tiny decoder takes its latent space from the frozen encoder's config.
    dec = TinyDecoder.from_pretrained(demo["dec_dir"] / "model_ema")
    assert dec.config.latent_channels == 16
    assert (dec.config.scaling_factor, dec.config.shift_factor) == pytest.approx(
        (ae.config.scaling_factor, ae.config.shift_factor))
    assert (demo["dec_dir"] / "discriminator").is_dir() and (demo["dec_dir"] / "model").is_dir()
    # Sample grids: 8 held-out patches (32 px) above their reconstructions.
    grids = sorted(p.name for p in (demo["dec_dir"] / "samples").iterdir())
    assert grids == ["step_000200.png", "step_000400.png"]
    assert Image.open(demo["dec_dir"] / "samples" / grids[-1]).size == (8 * 32, 2 * 32)


@pytest.fixture
def squeeze_lpips(tmp_path, monkeypatch):
    """A (random) SqueezeNet trunk where torchvision caches it: LPIPS loads the real way, offline."""
    from torchvision.models import squeezenet1_1

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = Path(lpips_backbone_checkpoint("squeeze"))
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(squeezenet1_1().state_dict(), path)


@pytest.mark.filterwarnings("ignore:.*(deprecated|weights):UserWarning")  # lpips' legacy torchvision call
def test_resume_repeats_the_uninterrupted_run_with_lpips_and_adversarial_terms(demo, photos, tmp_path, squeeze_lpips):
    kw = dict(vae=str(demo["ae_dir"]), decoder="tiny", discriminator="tiny", lpips_weight=0.5, lpips_net="squeeze",
              adv_start_step=2, r1_gamma=1.0, checkpoint_every=2, eval_images=None)
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(_cfg(photos, steps=4, **kw), StageContext(ref))
    run(_cfg(photos, steps=2, **kw), StageContext(resumed))
    summary = run(_cfg(photos, steps=4, **{**kw, "eval_images": str(photos[1])}), StageContext(resumed))
    assert summary["resumed_from"] == str(resumed / "checkpoints" / "step_000002")
    a, b = _losses(ref), _losses(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    assert all(r["generator/lpips"] > 0 for r in a) and a[-1]["discriminator/r1"] > 0
    for sub in ("model_ema", "discriminator"):
        wa, wb = load_file(next((ref / sub).glob("*.safetensors"))), load_file(next((resumed / sub).glob("*.safetensors")))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert summary["eval"]["tiny_decoder"]["lpips"] > 0 and "lpips" in summary["eval"]["vae_decoder"]


def test_two_processes_train_one_run_with_the_global_batch(photos, tmp_path):
    """A real 2-process CPU ``accelerate launch`` of ``snapgen train-decoder`` x batch 2 is one run of global
    batch 4: the 1-process run's losses and weights. Before ``loop.process_state`` the stage's own
    ``PartialState()`` (no ``cpu=True``) took the launch for two independent processes: each trained alone at
    batch 2 and half the lr into the same folder (every step twice in ``losses.jsonl``)."""
    import os
    import subprocess
    import sys

    from conftest import launch_argv

    common = dict(mode="autoencoder", steps=3, lr_reference_batch=4, eval_images=None)
    one = tmp_path / "one"
    run(_cfg(photos, batch_size=4, **common), StageContext(one))
    two = tmp_path / "two"
    argv = [*launch_argv(), "-m", "snapgen_cli", "train-decoder", "--out", str(two), "--threads", "1",
            "--mode", "autoencoder", "--data", str(photos[0]), "--patch-size", "32", "--steps", "3",
            "--batch-size", "2", "--lr", "2e-3", "--lr-reference-batch", "4", "--lpips-weight", "0",
            "--adv-start-step", str(10**6), "--ema-decay", "0.9", "--checkpoint-every", str(10**6),
            "--sample-every", "0", "--tracker", "none"]
    res = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((two / "train_summary.json").read_text())
    assert (summary["num_processes"], summary["global_batch"]) == (2, 4), sys.executable
    la, lb = _losses(one), _losses(two)
    assert [r["step"] for r in lb] == [1, 2, 3]
    # gloo sums the two halves' gradients in another order than one batch's backward: float32 rounding,
    # which Adam's normalisation carries into the next steps (1e-4: about 1000 float32 epsilons)
    for ra, rb in zip(la, lb, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    wa, wb = load_file(one / "model" / "diffusion_pytorch_model.safetensors"), \
        load_file(two / "model" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    # Adam moves a weight by about lr a step whatever its gradient's size, so an element whose gradient is
    # within rounding of zero may go either way: nearly all elements agree, none by more than 3 steps' lr
    diff = torch.cat([(wb[k] - wa[k]).abs().flatten() for k in wa])
    assert float((diff <= 1e-5).float().mean()) >= 0.999 and float(diff.max()) <= 3 * 2e-3


def test_no_discriminator_step_before_adv_start_step(demo, photos, tmp_path):
    torch.manual_seed(0)
    data = ImageDataset(open_source(str(photos[0]), caption_column=None), min_side=32)
    disc, decoder = build_discriminator("tiny"), build_decoder("tiny", latent_channels=16)
    task = TinyDecoderTask(decoder, AutoencoderKL.from_pretrained(demo["ae_dir"] / "model_ema"), data=data,
                           objective=DecoderLoss(lpips_weight=0, adv_weight=0.1, adv_start_step=3),
                           discriminator=disc, patch_size=32)
    cfg = LoopConfig(steps=2, batch_size=4, lr=1e-3, lr_reference_batch=4, tracker="none", checkpoint_every=2)
    disc0, dec0 = copy.deepcopy(disc.state_dict()), copy.deepcopy(decoder.state_dict())
    train(task, cfg, tmp_path)
    for k, v in disc.state_dict().items():
        assert torch.equal(v, disc0[k]), k  # not even weight decay touched it
    assert any(not torch.equal(v, dec0[k]) for k, v in decoder.state_dict().items())
    train(task, cfg.model_copy(update={"steps": 4}), tmp_path)
    assert any(not torch.equal(v, disc0[k]) for k, v in disc.state_dict().items())
    logs = _losses(tmp_path)
    assert [r["discriminator/grad_norm"] > 0 for r in logs] == [False, False, True, True]
    assert [r["generator/adv_g"] != 0 for r in logs] == [False, False, True, True]
    assert [r["discriminator/loss"] > 0 for r in logs] == [False, False, True, True]


def test_missing_lpips_weights_stop_the_stage_before_training(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as exc:
        run(_cfg(photos, mode="autoencoder", steps=2, lpips_weight=1.0), StageContext(out))
    msg = str(exc.value)
    assert "\n" not in msg and "lpips_weight = 0" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in msg
    assert not (out / "checkpoints").exists()


def test_plan_builds_on_the_meta_device_and_checks_the_latent_geometry(demo, tmp_path):
    ctx = StageContext(tmp_path / "never-written")
    # Paper defaults: SD3's encoder (its public config; nothing downloaded) and the 1.37M decoder.
    cfg = Config(data="/no/such/images")
    enc, dec, disc = plan(cfg, ctx)
    with torch.device("meta"):
        from snapgen_cli.core.baselines import sd3_vae

        assert enc.params == count_params(sd3_vae().encoder)
        assert disc.params == count_params(build_discriminator("patchgan"))
    assert dec.params == 1_368_867 and "16 latent channels, f=8" in enc.notes
    assert "256px patches, 1000000 steps x 256" in dec.notes
    (ae,) = plan(Config(data="x", mode="autoencoder"), ctx)[:1]
    assert ae.params == count_params(build_autoencoder("tiny-ae"))
    # vae = "previous": the trained autoencoder's config is read from the previous stage's dir.
    prev = StageContext(tmp_path / "never-written", previous=demo["ae_dir"])
    assert plan(Config(data="x", vae="previous", decoder="tiny"), prev)[1].params == count_params(
        build_decoder("tiny", latent_channels=16))
    assert not ctx.out_dir.exists()
    with pytest.raises(ConfigError, match="patch_size: 36 is not a multiple of .* factor 8"):
        plan(Config(data="x", patch_size=36), ctx)
    with pytest.raises(ConfigError, match="upsamples by 4 but the vae downsamples by 8"):
        plan(Config(data="x", decoder="tiny", decoder_overrides=dict(block_out_channels=(32, 16, 8),
                                                                     layers_per_block=(1, 1, 1))), ctx)


def test_an_unloadable_vae_is_a_config_error_naming_the_option(photos, tmp_path):
    with pytest.raises(ConfigError, match=r"vae: cannot load an AutoencoderKL from 'nobody/no-such-vae'.*pass vae"):
        run(_cfg(photos, steps=1, vae="nobody/no-such-vae"), StageContext(tmp_path))
    with pytest.raises(ConfigError, match="vae .*: no saved model there"):
        run(_cfg(photos, steps=1, vae=str(tmp_path)), StageContext(tmp_path / "out"))


def test_image_data_from_folders_and_saved_datasets_alike_with_reproducible_patches(photos, tmp_path):
    import datasets

    folder = ImageDataset(open_source(str(photos[0]), caption_column=None), min_side=256)
    files = sorted(photos[0].iterdir())
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    saved = ImageDataset(open_source(str(tmp_path / "saved"), caption_column=None), min_side=256)
    assert len(folder) == len(saved) == len(TRAIN_PHOTOS)
    for i in range(len(folder)):
        assert torch.equal(folder[i], saved[i])
        assert min(folder[i].shape[1:]) == 256 and folder[i].dtype == torch.uint8  # small photos are resized up
    images = [folder[i] for i in range(3)]
    a = random_patches(images, 32, sample_generators(0, 7, range(3)))
    assert torch.equal(a, random_patches(images, 32, sample_generators(0, 7, range(3))))
    assert not torch.equal(a, random_patches(images, 32, sample_generators(0, 8, range(3))))
    assert a.shape == (3, 3, 32, 32) and -1 <= a.min() and a.max() <= 1
    # A broken file is replaced by the next usable image, with a warning naming it.
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "0_broken.png").write_bytes(b"not a png")
    Image.open(files[0]).save(tmp_path / "mixed" / "1_ok.png")
    mixed = ImageDataset(open_source(str(tmp_path / "mixed"), caption_column=None), min_side=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mixed[0]
    assert torch.equal(first, mixed[1]) and mixed.skipped == {0: "corrupt"}
    assert any("image 0 skipped (corrupt" in str(w.message) for w in caught)
