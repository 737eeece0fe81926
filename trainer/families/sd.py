"""Stable Diffusion 1.x and 2.x: one UNet, one CLIP text encoder conditioned on its last layer.

SD1 uses OpenAI's CLIP ViT-L/14 (768 wide, pads with ``<|endoftext|>``); SD2 uses OpenCLIP ViT-H/14
(1024 wide, pads with ``!``, stored with OpenCLIP names in single files) and comes as a 512 px
epsilon model (2.x-base) or a 768 px v-prediction model (2.0-v, 2.1). Everything else is the base
family's behaviour.
"""

from __future__ import annotations

import torch

from trainer.families.base import ModelFamily
from trainer.models.text import TextEncoderSpec


class StableDiffusion(ModelFamily):
    pipeline_class_name = "StableDiffusionPipeline"

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def folder_loading_extras(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}


class StableDiffusion1(StableDiffusion):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", key="clip_l", kohya_prefix="lora_te", layer=-1, final_norm=True, pad_token="<|endoftext|>"),
    )
    text_widths = (768,)
    single_file_layout = "sd1"
    packaged_configs = {"epsilon": "sd1"}
    default_resolution = 512
    builtin_bases = {"tiny": "trainer.models.tiny:tiny_components", "toy": "trainer.toyworld.pretrain:toy_base_dir"}

    def ss_base_model_version(self, prediction_type: str) -> str:
        return "sd_v1" + ("_v" if prediction_type == "v_prediction" else "")

    def modelspec_architecture(self, prediction_type: str) -> str:
        # SD1 has one ModelSpec id whatever it predicts.
        return "stable-diffusion-v1"


class StableDiffusion2(StableDiffusion):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", key="clip_h", kohya_prefix="lora_te", layer=-1, final_norm=True, pad_token="!"),
    )
    text_widths = (1024,)
    single_file_layout = "sd2"
    packaged_configs = {"epsilon": "sd2-base", "v_prediction": "sd2"}
    default_resolution = 768

    @property
    def is_sd2(self) -> bool:
        return True

    def ss_base_model_version(self, prediction_type: str) -> str:
        return "sd_v2" + ("_v" if prediction_type == "v_prediction" else "")

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    def guess_prediction_type(self, state_dict) -> str | None:
        """Told apart as ComfyUI does: the v-prediction SD2 models (2.0-v, 2.1) have a much larger spread in
        the last transformer block's first norm bias than the 512 px epsilon ones."""
        bias = state_dict.get("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is None:
            return None
        return "v_prediction" if torch.std(bias.float(), unbiased=False) > 0.09 else "epsilon"


SD1 = StableDiffusion1()
SD2 = StableDiffusion2()
