"""Stable Diffusion XL: two CLIP text encoders, a pooled prompt vector and size/crop conditioning.

- Text (docs/sdxl.md#text): CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate layers, without the
  final layer norm, concatenated (768 + 1280 = 2048 wide); the pooled vector is bigG's final-normed
  last layer at the first end-of-text token, through its ``text_projection``. bigG pads with "!" (id 0).
- Micro-conditioning (docs/sdxl.md#size-and-crop-conditioning): per image the original size, the
  top-left corner of the crop and the target size, ``[orig_h, orig_w, top, left, target_h, target_w]``,
  which the UNet embeds together with the pooled vector (``add_embedding``, SGM's ``label_emb``).
- Single files use Stability's generative-models ("SGM") layout; kohya's LoRA names use SGM module
  paths for the UNet (``lora_unet_input_blocks_4_1_...``) and ``lora_te1_``/``lora_te2_`` for the encoders.
- The VAE has SD's layout but a scale of 0.13025 and overflows in fp16, so it stays in fp32 under
  mixed precision unless ``model.vae_fp32: false`` (e.g. with the fp16-fix VAE).
"""

from __future__ import annotations

import functools

import torch

from trainer.families.base import SGM_IMPLEMENTATION, ModelFamily
from trainer.formats.ldm_checkpoint import rename_module, unet_module_table
from trainer.models.conditioning import ImageGeometry, TextConditioning
from trainer.models.text import TextEncoderSpec


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", key="clip_l", kohya_prefix="lora_te1", layer=-2, final_norm=False, pad_token="<|endoftext|>"),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", key="clip_g", kohya_prefix="lora_te2", layer=-2, final_norm=False, pad_token="!", pooled=True),
    )
    text_widths = (768, 1280)
    single_file_layout = "sdxl"
    packaged_configs = {"epsilon": "sdxl"}
    default_resolution = 1024
    vae_fp32_by_default = True
    zero_empty_negative = True
    builtin_bases = {"tiny-sdxl": "trainer.models.tiny:tiny_sdxl_components"}
    adapter_implementation = SGM_IMPLEMENTATION

    def ss_base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base"

    def foreign_unet_path(self, unet_config, module_path: str) -> str:
        layout = (tuple(unet_config["down_block_types"]), tuple(unet_config["up_block_types"]), unet_config["layers_per_block"], unet_config.get("addition_embed_type"))
        path = rename_module(module_path, _sgm_table(*layout))
        if path is None:
            raise ValueError(f"the UNet module '{module_path}' has no name in the SGM layout")
        return path

    def pipeline_extras(self) -> dict:
        # The invisible watermark is an optional package and changes sample images; samples are for people.
        return {"add_watermarker": False}

    def folder_loading_extras(self) -> dict:
        return {"add_watermarker": False}

    def pipeline_prompt_inputs(self, positive: TextConditioning, negative: TextConditioning) -> dict:
        return {
            "prompt_embeds": positive.hidden_states, "pooled_prompt_embeds": positive.pooled,
            "negative_prompt_embeds": negative.hidden_states, "negative_pooled_prompt_embeds": negative.pooled,
        }

    def unet_inputs(self, text: TextConditioning, geometry: list[ImageGeometry], latents: torch.Tensor) -> dict:
        if text.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled prompt vector of its second text encoder")
        return {
            "encoder_hidden_states": text.hidden_states,
            "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids(geometry, latents.device, latents.dtype)},
        }


@functools.lru_cache(maxsize=8)
def _sgm_table(down_block_types: tuple, up_block_types: tuple, layers_per_block: int, addition_embed_type: str | None) -> dict[str, str]:
    """The diffusers -> SGM module table of one UNet layout (built once: adapters name hundreds of modules)."""
    return unet_module_table({
        "down_block_types": down_block_types, "up_block_types": up_block_types,
        "layers_per_block": layers_per_block, "addition_embed_type": addition_embed_type,
    })


def time_ids(geometry: list[ImageGeometry], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's ``add_time_ids`` [B, 6]: original (h, w), crop (top, left), target (h, w) per image."""
    rows = [[*g.original_size, *g.crop_top_left, *g.target_size] for g in geometry]
    return torch.tensor(rows, device=device, dtype=dtype)


SDXL = StableDiffusionXL()
