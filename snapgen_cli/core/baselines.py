"""Baseline models built from their public configs with random weights (nothing downloaded).

They are what SnapGen is compared against in the paper: the SD3 autoencoder (whose
decoder is Table 2's 49.55M-parameter / 4970-GMAC baseline and whose encoder the tiny
decoder is trained against) and the SDXL UNet (the starting point of sec. 3.1), and for the
speed comparison of issue 17 the whole SDXL pipeline (:func:`sdxl_pipeline`: UNet, VAE, both
CLIP text encoders, tokenizers and scheduler from ``stabilityai/stable-diffusion-xl-base-1.0``'s
public configs).
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


#: ``stabilityai/stable-diffusion-xl-base-1.0``, subfolder ``vae``.
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
#: Subfolders ``text_encoder`` (CLIP ViT-L/14's text tower) and ``text_encoder_2`` (OpenCLIP ViT-bigG/14's).
SDXL_TEXT_CONFIGS = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         projection_dim=768, hidden_act="quick_gelu"),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         projection_dim=1280, hidden_act="gelu"),
)
#: Subfolder ``scheduler``: Euler (diffusers' EulerDiscreteScheduler) on SDXL's scaled-linear betas.
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)
#: A CPU-sized SDXL pipeline with the same layout (tests, ``gpu_bench.py --quick``): two 32-wide
#: text encoders (context 64, pooled 32), a two-stage UNet and a 4-stage VAE.
SDXL_TINY = dict(
    unet=dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
              attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1], cross_attention_dim=64,
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
              sample_size=8),
    vae=dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
)


def sd3_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**SD3_VAE_CONFIG, **overrides})


def sdxl_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**SDXL_UNET_CONFIG, **overrides})


def sdxl_pipeline(tiny: bool = False):
    """diffusers' ``StableDiffusionXLPipeline`` with random weights: SDXL base 1.0's public configs
    (``tiny``: :data:`SDXL_TINY`), the real CLIP tokenizer built offline, no watermarker."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .text import build_clip_tokenizer

    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    texts = [dict(c, **SDXL_TINY["text"]) if tiny else c for c in SDXL_TEXT_CONFIGS]
    with torch.device("cpu"):  # the scheduler's tables live on the CPU, whatever device the models are built on
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**{**SDXL_VAE_CONFIG, **(SDXL_TINY["vae"] if tiny else {})}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip, **texts[0])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip, **texts[1])),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
        unet=sdxl_unet(**(SDXL_TINY["unet"] if tiny else {})),
        scheduler=scheduler, add_watermarker=False)
