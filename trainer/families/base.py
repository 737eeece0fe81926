"""``ModelFamily``: what a kind of base model (SD1, SD2, SDXL, ...) owns, so methods never need to know.

A family is a singleton object; its class attributes describe it (names, defaults, text encoders,
the single-file layout) and its methods do what differs between families:

1. **Identity and detection**: ``pipeline_class_name`` and ``text_widths`` tell a diffusers folder's
   family, ``single_file_layout`` a single file's (trainer/models/loading.py asks every family).
2. **Loading and saving**: parts from a diffusers folder, a single file (via the layout in
   trainer/formats/ldm_checkpoint.py) or a packaged configuration; a diffusers pipeline over the parts.
3. **Text conditioning**: ``encode_text`` (the encoders' chosen layers, pooled output, long prompts;
   trainer/models/text.py) and ``unet_inputs`` (what the UNet takes besides the latents).
4. **Objective and defaults**: the training objective (DDPM's noise and targets), resolution, VAE precision.
5. **Foreign names**: kohya's adapter module names, ModelSpec architecture, kohya's base-model version.

The defaults here are the SD1/SD2 behaviour; families override what differs. Everything is keyed by
diffusers' component names (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``), which is also how
checkpoints and methods name the parts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from trainer.diffusion import DDPMObjective, ObjectiveSettings
from trainer.models.conditioning import ImageGeometry, TextConditioning
from trainer.models.text import TextEncoderSpec, encode

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "models" / "configs"
# Stability's reference implementation: the ModelSpec "implementation" of files in its single-file layouts.
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class ModelFamily:
    name: ClassVar[str]
    title: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    text_encoders: ClassVar[tuple[TextEncoderSpec, ...]]
    # The hidden sizes of the real models' text encoders, to tell families apart that share a pipeline class.
    text_widths: ClassVar[tuple[int, ...]]
    single_file_layout: ClassVar[str]
    # Packaged configuration folders (trainer/models/configs): the one a single file is read with by
    # prediction type, and every one that ``random:<name>`` can build.
    packaged_configs: ClassVar[dict[str, str]]
    default_resolution: ClassVar[int]
    # Keep the VAE in fp32 under fp16/bf16 mixed precision unless model.vae_fp32 says otherwise.
    vae_fp32_by_default: ClassVar[bool] = False
    # Sampling: an empty negative prompt is no conditioning at all (zeros), as SDXL's UIs and pipeline do.
    zero_empty_negative: ClassVar[bool] = False
    # Built-in bases: model.base name -> "module:function" returning the parts (a dict) or a diffusers folder.
    builtin_bases: ClassVar[dict[str, str]] = {}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def __deepcopy__(self, memo) -> ModelFamily:
        # A family is a description, not state: copies of a model share it.
        return self

    # --- 5. foreign names ---------------------------------------------------------------------------
    def ss_base_model_version(self, prediction_type: str) -> str:
        """kohya's ``ss_base_model_version``."""
        raise NotImplementedError

    def modelspec_architecture(self, prediction_type: str) -> str:
        """Stability AI ModelSpec architecture of a whole model; adapters append ``/lora`` etc."""
        raise NotImplementedError

    @property
    def is_sd2(self) -> bool:
        """kohya's ``ss_v2`` flag (SD2's OpenCLIP text encoder)."""
        return False

    # ModelSpec "implementation" of adapter files: whose module names they use.
    adapter_implementation: ClassVar[str] = "diffusers"

    def foreign_unet_path(self, unet_config, module_path: str) -> str:
        """The name kohya, AUTOMATIC1111 and ComfyUI use for a UNet module (diffusers' own for SD1/SD2)."""
        return module_path

    # --- 2. loading and saving -----------------------------------------------------------------------
    def pipeline_class(self):
        return getattr(importlib.import_module("diffusers"), self.pipeline_class_name)

    def pipeline_extras(self) -> dict:
        """Pipeline constructor arguments besides the model parts and the scheduler."""
        return {}

    def pipeline(self, model):
        """A diffusers pipeline over ``model``'s parts, with DDIM at SD's sampling settings."""
        components = {"unet": model.unet, "vae": model.vae, "scheduler": sampling_scheduler(model.noise_scheduler.config)}
        for te in model.text_encoders:
            components[te.spec.component] = te.model
            components[te.spec.tokenizer_component] = te.tokenizer
        return self.pipeline_class()(**components, **self.pipeline_extras())

    def folder_loading_extras(self) -> dict:
        """Extra ``from_pretrained`` arguments for this family's pipeline folders."""
        return {}

    def objective(self, noise_scheduler, settings: ObjectiveSettings) -> DDPMObjective:
        """The training objective over the model's noise scheduler (a flow-matching family brings its own)."""
        return DDPMObjective(noise_scheduler, settings)

    def guess_prediction_type(self, state_dict) -> str | None:
        """What a single file's weights suggest it predicts, when its metadata says nothing."""
        return None

    def builtin(self, name: str) -> dict | Path:
        """The parts of a built-in base (``builtin_bases``), or the diffusers folder that holds them."""
        module, _, attr = self.builtin_bases[name].partition(":")
        build: Callable[[], dict | Path] = getattr(importlib.import_module(module), attr)
        return build()

    def config_dir_for(self, prediction_type: str | None) -> Path:
        """The packaged configuration a single file of this family is read with."""
        key = prediction_type or "epsilon"
        return PACKAGED_CONFIGS / self.packaged_configs.get(key, self.packaged_configs["epsilon"])

    # --- 3. text conditioning --------------------------------------------------------------------------
    def encode_text(self, model, captions: list[str], clip_skip: int, max_token_length: int) -> TextConditioning:
        """Every encoder's chosen layer, concatenated along the width; the pooled vector of the encoder that gives one."""
        states, pooled = [], None
        for te in model.text_encoders:
            hidden, te_pooled = encode(te.spec, te.tokenizer, te.model, captions, clip_skip, max_token_length)
            states.append(hidden)
            if te_pooled is not None:
                pooled = te_pooled
        return TextConditioning(torch.cat(states, dim=-1) if len(states) > 1 else states[0], pooled)

    def unet_inputs(self, text: TextConditioning, geometry: list[ImageGeometry], latents: torch.Tensor) -> dict:
        """The UNet's keyword arguments besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": text.hidden_states}

    def sampling_inputs(self, model, prompts: list[str], negative_prompts: list[str], clip_skip: int, max_token_length: int) -> dict:
        """The pipeline's prompt arguments, encoded as training encodes captions (clip skip, long prompts)."""
        positive = self.encode_text(model, prompts, clip_skip, max_token_length)
        if self.zero_empty_negative and not any(negative_prompts):
            pooled = None if positive.pooled is None else torch.zeros_like(positive.pooled)
            negative = TextConditioning(torch.zeros_like(positive.hidden_states), pooled)
        else:
            negative = self.encode_text(model, negative_prompts, clip_skip, max_token_length)
        return self.pipeline_prompt_inputs(positive, negative)

    def pipeline_prompt_inputs(self, positive: TextConditioning, negative: TextConditioning) -> dict:
        return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}


def sampling_scheduler(noise_scheduler_config):
    """DDIM with SD's sampling settings.

    DDIM inherits clip_sample=True from DDPM's defaults; SD latents must not be clipped.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
