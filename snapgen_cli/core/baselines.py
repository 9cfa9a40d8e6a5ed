"""Baseline models built from their public configs with random weights (nothing downloaded).

They are what SnapGen is compared against in the paper: the SD3 autoencoder (whose
decoder is Table 2's 49.55M-parameter / 4970-GMAC baseline and whose encoder the tiny
decoder is trained against) and the SDXL UNet (the starting point of sec. 3.1).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel

#: ``stabilityai/stable-diffusion-3-medium-diffusers``, subfolder ``vae`` (also SD3.5's VAE).
SD3_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
SD3_VAE_HUB = ("stabilityai/stable-diffusion-3-medium-diffusers", "vae")

#: ``stabilityai/stable-diffusion-xl-base-1.0``, subfolder ``unet``.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_CONTEXT_LEN = 77


def sd3_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**SD3_VAE_CONFIG, **overrides})


def sdxl_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**SDXL_UNET_CONFIG, **overrides})
