"""The built-in tiny models: the SD1 and SDXL architectures at a fraction of the width, identical on every machine.

They exist so the quickstart and the tests run offline on two CPU cores. ``tiny`` is SD1's topology:
UNet2DConditionModel with cross-attention (SD1's block layout), AutoencoderKL (8x downsampling, 4
latent channels), a CLIP text encoder with the real CLIP BPE tokenizer, and SD's DDPM noise schedule.
``tiny-sdxl`` is SDXL's: three UNet levels (the first without attention, 1/2/2 transformer layers),
linear projections, the size-and-pooled-text embedding, two text encoders of different widths (the
second with a projection that is not square, so a transposed projection cannot pass unnoticed) and
SDXL's VAE scale. Weights are random but seeded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.models.tokenizer import VOCAB_SIZE, clip_tokenizer

TINY_SEED = 20261125
TINY_SDXL_SEED = 20261129
TINY_RESOLUTION = 128
TEXT_WIDTH = 64
# tiny-sdxl: the two encoders' widths and the second one's projection (SDXL: 768, 1280, 1280).
SDXL_TEXT_WIDTHS = (32, 48)
SDXL_PROJECTION = 40
SDXL_TIME_EMBED = 8


def seeded(build, seed: int):
    """``build()`` with torch's global generator seeded, leaving the caller's generator state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def small_clip_text_config(width: int, layers: int, *, projection_dim: int | None = None, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """CLIP's full vocabulary and special tokens at a small width (tiny and toy models)."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim or width,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def small_clip_text_encoder(width: int, layers: int) -> CLIPTextModel:
    return CLIPTextModel(small_clip_text_config(width, layers))


def tiny_text_encoder() -> CLIPTextModel:
    return small_clip_text_encoder(TEXT_WIDTH, layers=3)


def sd_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule of SD1.x/2.x (kohya and diffusers use the same)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def tiny_components() -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler of the built-in model (fp32, CPU, eval mode)."""
    components = {
        "unet": seeded(tiny_unet, TINY_SEED),
        "vae": seeded(tiny_vae, TINY_SEED + 1),
        "text_encoder": seeded(tiny_text_encoder, TINY_SEED + 2),
        "tokenizer": clip_tokenizer(),
        "scheduler": sd_noise_scheduler(),
    }
    for name in ("unet", "vae", "text_encoder"):
        components[name].eval()
    return components


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_PROJECTION,
        norm_num_groups=16,
    )


def tiny_sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    first = CLIPTextModel(small_clip_text_config(SDXL_TEXT_WIDTHS[0], layers=3))
    # Ten layers: diffusers recognises an SDXL single file by the second encoder's tenth block.
    second = CLIPTextModelWithProjection(small_clip_text_config(SDXL_TEXT_WIDTHS[1], layers=10, projection_dim=SDXL_PROJECTION, hidden_act="gelu"))
    return first, second


def tiny_sdxl_components() -> dict:
    """unet, vae, text_encoder(_2), tokenizer(_2), scheduler of the built-in tiny SDXL model."""
    text_encoder, text_encoder_2 = seeded(tiny_sdxl_text_encoders, TINY_SDXL_SEED + 2)
    components = {
        "unet": seeded(tiny_sdxl_unet, TINY_SDXL_SEED),
        "vae": seeded(lambda: tiny_vae(scaling_factor=0.13025), TINY_SDXL_SEED + 1),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),
        "scheduler": sd_noise_scheduler(),
    }
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        components[name].eval()
    return components
