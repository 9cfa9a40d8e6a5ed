"""The tiny decoder (sec. 3.2, Table 2), its PatchGAN discriminator and the decoder objective."""

import math

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from snapgen_cli.core.decoder import (
    DECODER_PRESETS,
    PAPER_DECODER,
    DecoderResBlock,
    TinyDecoder,
    build_decoder,
    latents_to_images,
)
from snapgen_cli.core.losses import (
    AdversarialLoss,
    DecoderLoss,
    LPIPSLoss,
    load_lpips,
    lpips_backbone_checkpoint,
    r1_penalty,
)
from snapgen_cli.core.discriminator import PatchDiscriminator, build_discriminator
from snapgen_cli.core.latents import denormalize_latents, latent_scale_shift, normalize_latents
from snapgen_cli.core.measure import count_macs, count_params
from snapgen_cli.errors import ConfigError, SnapgenError


def _tiny(seed: int = 0, **overrides) -> TinyDecoder:
    torch.manual_seed(seed)
    return build_decoder("tiny", **overrides)


# ---------------------------------------------------------------------------- decoder


def test_snapgen_decoder_matches_table2_and_decodes_128_latent_to_1024_image():
    with torch.device("meta"):
        dec = build_decoder("snapgen-decoder")
        z = torch.empty(1, 16, 128, 128)
        out = dec(z)
        macs = count_macs(lambda: dec(z))
    params = count_params(dec)
    assert abs(params / PAPER_DECODER["params"] - 1) < 0.10, params
    assert abs(macs / PAPER_DECODER["macs"] - 1) < 0.10, macs
    assert tuple(out.shape) == (1, 3, 1024, 1024)
    assert dec.upsampling_factor == 8
    assert not any("attn" in name.lower() for name, _ in dec.named_modules())


def test_tiny_decoder_forward_on_cpu_is_small_and_trainable():
    dec = _tiny()
    assert count_params(dec) < 100_000
    z = torch.randn(2, 16, 8, 6)
    out = dec.decode(z).sample
    assert out.shape == (2, 3, 64, 48) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


@pytest.mark.parametrize("norm, expected", [("minimal", 4), ("all", 2 * 5 + 1), ("none", 0)])
def test_norm_switch_places_groupnorms(norm, expected):
    dec = _tiny(norm=norm)  # tiny has 4 stages with 2+1+1+1 = 5 residual blocks
    assert sum(isinstance(m, nn.GroupNorm) for m in dec.modules()) == expected


def test_resblocks_are_separable_with_identity_shortcut():
    dec = _tiny()
    block = next(m for m in dec.modules() if isinstance(m, DecoderResBlock))
    depthwise, pointwise = block.conv1
    assert depthwise.groups == depthwise.in_channels and pointwise.kernel_size == (1, 1)
    nn.init.zeros_(block.conv2[1].weight)
    nn.init.zeros_(block.conv2[1].bias)
    x = torch.randn(1, depthwise.in_channels, 5, 5)
    torch.testing.assert_close(block(x), x)  # no conv shortcut: x + f(x)


def test_save_pretrained_round_trip(tmp_path):
    dec = _tiny(seed=3, scaling_factor=2.0, shift_factor=-0.25)
    dec.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TinyDecoder.from_pretrained(tmp_path)
    for key, value in dec.config.items():
        if key.startswith("_"):
            continue
        assert loaded.config[key] == (list(value) if isinstance(value, tuple) else value), key
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(loaded.decode(z).sample, dec.decode(z).sample, rtol=0, atol=0)


def test_decode_takes_raw_latents_and_latents_to_images_undoes_sd3_scaling():
    dec = _tiny()
    assert (dec.config.scaling_factor, dec.config.shift_factor) == (1.5305, 0.0609)
    latents = torch.randn(1, 16, 4, 4)
    raw = latents / 1.5305 + 0.0609
    (expected,) = dec.decode(raw, return_dict=False)
    assert not torch.allclose(dec.decode(latents).sample, expected)
    images = latents_to_images(dec, latents)
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))


def test_one_latent_normalisation_round_trips_with_sd3_factors():
    from types import SimpleNamespace

    dec = _tiny()
    assert latent_scale_shift(dec) == (1.5305, 0.0609)
    z = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(normalize_latents(dec, z), (z - 0.0609) * 1.5305, rtol=0, atol=0)
    torch.testing.assert_close(denormalize_latents(dec, normalize_latents(dec, z)), z)
    sdxl = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, scaling_factor=0.13025)  # shift_factor None
    assert latent_scale_shift(sdxl) == (0.13025, 0.0)
    with pytest.raises(ConfigError, match="SimpleNamespace config has no scaling_factor"):
        latent_scale_shift(SimpleNamespace(config=SimpleNamespace()))


@pytest.mark.parametrize("shift", [None, 0.1])
def test_latents_to_images_drives_an_autoencoderkl_the_same_way(shift):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.5, shift_factor=shift,
    ).eval()
    latents = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        images = latents_to_images(vae, latents)
        expected = vae.decode(latents / 0.5 + (shift or 0.0)).sample
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))


def test_bad_decoder_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown decoder preset 'huge'.*snapgen-decoder"):
        build_decoder("huge")
    with pytest.raises(ConfigError, match="norm.*minimal.*'batch'"):
        build_decoder("tiny", norm="batch")
    with pytest.raises(ConfigError, match="layers_per_block"):
        build_decoder("tiny", layers_per_block=(1, 1))
    assert set(DECODER_PRESETS) >= {"snapgen-decoder", "tiny"}


# ---------------------------------------------------------------------------- discriminator


def test_patchgan_matches_the_taming_layout_and_tiny_runs():
    with torch.device("meta"):
        full = build_discriminator("patchgan")
    assert count_params(full) == 2_765_633  # taming NLayerDiscriminator(3, 64, 3) with BatchNorm
    torch.manual_seed(0)
    disc = build_discriminator("tiny")
    logits = disc(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert logits.shape == (2, 1, 14, 14)  # one logit per overlapping patch


def test_discriminator_round_trip_and_bad_norm(tmp_path):
    torch.manual_seed(1)
    disc = build_discriminator("tiny", norm="batch").eval()
    disc.save_pretrained(tmp_path)
    loaded = PatchDiscriminator.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), disc(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="discriminator norm"):
        build_discriminator("tiny", norm="spectral")


# ---------------------------------------------------------------------------- losses


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_adversarial_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    hinge, ns = AdversarialLoss("hinge"), AdversarialLoss("non-saturating")
    assert hinge.generator(fake).item() == pytest.approx(0.75)
    assert hinge.discriminator(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert ns.generator(fake).item() == pytest.approx((_softplus(2.0) + _softplus(-0.5)) / 2)
    expected_d = (_softplus(-2.0) + _softplus(-0.5)) / 2 + (_softplus(-2.0) + _softplus(0.5)) / 2
    assert ns.discriminator(real, fake).item() == pytest.approx(expected_d)
    with pytest.raises(ConfigError, match="adv_loss.*hinge.*'wgan'"):
        AdversarialLoss("wgan")


def test_r1_penalty_is_the_squared_input_gradient_and_differentiable():
    disc = nn.Conv2d(3, 1, 1, bias=False)  # D(x) = w . x per pixel, so grad_x sum D = w everywhere
    real = torch.randn(2, 3, 4, 5)
    penalty, logits = r1_penalty(disc, real)
    assert logits.shape == (2, 1, 4, 5)
    assert penalty.item() == pytest.approx(20 * disc.weight.square().sum().item(), rel=1e-5)
    penalty.backward()
    torch.testing.assert_close(disc.weight.grad, 40 * disc.weight.detach())


def test_adversarial_warm_up_and_generator_loss_terms():
    torch.manual_seed(0)
    disc = build_discriminator("tiny")
    loss_fn = DecoderLoss(lpips_weight=0, l1_weight=0.5, adv_weight=0.1, adv_start_step=5)
    recon = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    before, logs = loss_fn(recon, target, disc=None, step=4)  # the discriminator is not needed yet
    assert logs["adv_g"].item() == 0 and not loss_fn.adversarial_active(4)
    torch.testing.assert_close(before, logs["mse"] + 0.5 * logs["l1"])
    after, logs = loss_fn(recon, target, disc=disc, step=5)
    assert logs["adv_g"].item() != 0
    torch.testing.assert_close(after.detach(), logs["mse"] + 0.5 * logs["l1"] + 0.1 * logs["adv_g"])
    with pytest.raises(SnapgenError, match="disc="):
        loss_fn(recon, target, step=5)


def test_discriminator_loss_adds_half_gamma_r1():
    torch.manual_seed(0)
    disc = build_discriminator("tiny")
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = DecoderLoss(lpips_weight=0, r1_gamma=2.0).discriminator_loss(disc, real, fake.requires_grad_(True))
    assert logs["r1"] > 0
    torch.testing.assert_close(loss.detach(), logs["adv_d"] + logs["r1"])
    loss.backward()
    assert fake.grad is None  # the decoder's output is detached on the D step
    assert all(p.grad is not None for p in disc.parameters())


def test_missing_lpips_weights_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        DecoderLoss(lpips_weight=1.0)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in msg
    assert "lpips_weight = 0" in msg
    assert lpips_backbone_checkpoint("vgg").endswith("vgg16-397923af.pth")
    DecoderLoss(lpips_weight=0)  # training without LPIPS needs no weights
    with pytest.raises(ConfigError, match="or set eval_lpips = false to go without LPIPS$"):
        load_lpips("alex", off="eval_lpips = false")  # each caller names its own switch


def test_lpips_real_loading_path_from_a_cached_trunk(tmp_path, monkeypatch):
    """A (random) SqueezeNet checkpoint placed where torchvision caches it is picked up offline."""
    from torchvision.models import squeezenet1_1

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_checkpoint("squeeze")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(squeezenet1_1().state_dict(), path)
    loss = LPIPSLoss(model=load_lpips("squeeze"))
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.model.training
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = loss(y, x)
    assert d.item() > 0
    d.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*(deprecated|weights):UserWarning")  # lpips' legacy torchvision call
def test_decoder_loss_with_lpips_sums_its_terms():
    import lpips

    torch.manual_seed(0)
    perceptual = LPIPSLoss(model=lpips.LPIPS(net="squeeze", pnet_rand=True, pretrained=True, verbose=False))
    loss_fn = DecoderLoss(lpips_weight=0.5, adv_weight=0.0, lpips=perceptual)
    recon, target = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    loss, logs = loss_fn(recon, target, step=10)
    assert logs["lpips"] > 0 and logs["adv_g"] == 0
    torch.testing.assert_close(loss, logs["mse"] + 0.5 * logs["lpips"])
