"""The built-in tiny model: the SD1 architecture at a fraction of the width, identical on every machine.

It exists so the quickstart and the tests run offline on two CPU cores: UNet2DConditionModel with
cross-attention (SD1's block layout), AutoencoderKL (8x downsampling, 4 latent channels), a CLIP text
encoder with the real CLIP BPE tokenizer, and SD's DDPM noise schedule. Weights are random but seeded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.models.tokenizer import VOCAB_SIZE, clip_tokenizer

TINY_SEED = 20261125
TINY_RESOLUTION = 128
TEXT_WIDTH = 64


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


def tiny_vae() -> AutoencoderKL:
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
    )


def small_clip_text_encoder(width: int, layers: int) -> CLIPTextModel:
    """A CLIP text encoder with CLIP's full vocabulary and special tokens at a small width (tiny and toy models)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


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
