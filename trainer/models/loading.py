"""Load a base model from a local source, never from the network.

``model.base`` may be ``tiny`` (built in), a diffusers folder, a single-file ``.safetensors`` (or
``.ckpt``) checkpoint in the original ldm layout, or a hub id already in the local Hugging Face cache.
For benchmarks, ``random:sd1`` (``random:sd2``, ``random:sd2-base``) builds a packaged architecture
(``trainer/models/configs``: SD1.5, SD2.1, SD2.1-base) with seeded random weights: real sizes and
speeds, meaningless images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.errors import UserError


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    # What model.base said, and a short name for metadata (file or folder name).
    source: str
    name: str

    @property
    def version(self) -> str:
        """kohya's ss_base_model_version family: "sd_v1" or "sd_v2" (+ "_v" for v-prediction)."""
        family = "sd_v2" if self.text_encoder.config.hidden_size == 1024 else "sd_v1"
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            family += "_v"
        return family

    @property
    def is_v2(self) -> bool:
        return self.version.startswith("sd_v2")

    @property
    def modelspec_architecture(self) -> str:
        if not self.is_v2:
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.version.endswith("_v") else "stable-diffusion-v2-512"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _set_prediction_type(scheduler: DDPMScheduler, prediction_type: str) -> DDPMScheduler:
    if prediction_type == "auto":
        return scheduler
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"Recipe key 'model.prediction_type' is '{prediction_type}'; use 'auto', 'epsilon' or 'v_prediction'."
        )
    return DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)


def _training_scheduler(scheduler_config) -> DDPMScheduler:
    # Whatever scheduler a pipeline ships for sampling, training uses DDPM with its betas.
    config = dict(scheduler_config)
    config["clip_sample"] = False
    return DDPMScheduler.from_config(config)


def _from_diffusers_folder(path: str) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        path, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": _training_scheduler(pipe.scheduler.config),
    }


def _looks_like_hub_id(base: str) -> bool:
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(base)


RANDOM_PREFIX = "random:"
RANDOM_SEED = 20261126


def _random_components(architecture: str) -> dict:
    """The packaged ``architecture`` (a folder of trainer/models/configs) with seeded random weights."""
    from transformers import CLIPTextConfig

    from trainer.models.single_file import PACKAGED_CONFIGS, PACKAGED_MODELS
    from trainer.models.tokenizer import clip_tokenizer

    if architecture not in PACKAGED_MODELS:
        choices = ", ".join(f"'{RANDOM_PREFIX}{name}' ({model})" for name, model in PACKAGED_MODELS.items())
        raise UserError(f"model.base '{RANDOM_PREFIX}{architecture}' names no packaged architecture; use {choices}.")
    config_dir = str(PACKAGED_CONFIGS / architecture)
    text_config = CLIPTextConfig.from_json_file(PACKAGED_CONFIGS / architecture / "text_encoder" / "config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae")),
            "text_encoder": CLIPTextModel(text_config),
        }
    for module in parts.values():
        module.eval()
    # SD2's OpenCLIP tokenizer pads with "!"; SD1's with the end-of-text token.
    parts["tokenizer"] = clip_tokenizer(pad_token="!" if text_config.hidden_size == 1024 else "<|endoftext|>")
    parts["scheduler"] = _training_scheduler(DDPMScheduler.load_config(config_dir, subfolder="scheduler"))
    return parts


def load_base_model(base: str, config: str | None = None, prediction_type: str = "auto", allow_unsafe_pickle: bool = False) -> BaseModel:
    """Load ``model.base``; raises ``UserError`` with the fix when it cannot be read."""
    if base == "tiny":
        from trainer.models.tiny import tiny_components

        parts, name = tiny_components(), "sdtrain-tiny"
    elif base == "toy":
        # The toy world's pretrained base (trainer/toyworld), from the per-user cache.
        from trainer.toyworld.pretrain import BASE_NAME, toy_base_dir

        parts, name = _from_diffusers_folder(str(toy_base_dir())), BASE_NAME
    elif base.startswith(RANDOM_PREFIX):
        architecture = base[len(RANDOM_PREFIX):]
        parts, name = _random_components(architecture), f"sdtrain-random-{architecture}"
    elif Path(base).is_dir():
        if not (Path(base) / "model_index.json").is_file():
            raise UserError(
                f"model.base '{base}' is a folder but not a diffusers pipeline (no model_index.json). "
                "Point it at a folder written by save_pretrained or 'sdtrain base tiny DIR', or at a single .safetensors file."
            )
        try:
            parts = _from_diffusers_folder(base)
        except Exception as err:  # diffusers raises many types for a broken folder
            raise UserError(f"model.base '{base}' could not be loaded as a diffusers pipeline: {err}. Check that the folder is complete.") from err
        name = Path(base).resolve().name
    elif Path(base).is_file():
        from trainer.models.single_file import load_single_file

        parts = load_single_file(Path(base), config_dir=Path(config) if config else None, allow_unsafe_pickle=allow_unsafe_pickle)
        name = Path(base).stem
    elif _looks_like_hub_id(base):
        try:
            parts = _from_diffusers_folder(base)
        except Exception as err:
            raise UserError(
                f"model.base '{base}' is neither a file nor a folder, and no copy of the hub repository '{base}' is in the "
                f"local Hugging Face cache ({err.__class__.__name__}). sdtrain never downloads: download it on a machine with "
                "network access, or set model.base to 'tiny', a diffusers folder or a .safetensors file."
            ) from err
        name = base.split("/")[-1]
    else:
        raise UserError(
            f"model.base '{base}' does not exist. Use 'tiny' (the built-in model), a diffusers folder, a single-file "
            ".safetensors checkpoint, a hub id already in the local Hugging Face cache, or for benchmarks 'random:sd1' "
            "('random:sd2', 'random:sd2-base'): that architecture with random weights."
        )
    return BaseModel(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        noise_scheduler=_set_prediction_type(parts["scheduler"], prediction_type),
        source=base,
        name=name,
    )


def _as_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when it already holds ``dtype``, else a copy cast to it (the caller's model stays as it is)."""
    import copy

    if all(tensor.dtype == dtype for tensor in module.state_dict().values() if tensor.is_floating_point()):
        return module
    return copy.deepcopy(module).to(dtype)


def save_diffusers_folder(model: BaseModel, directory: Path, save_dtype: str = "fp32", replace: bool = False) -> None:
    """Write the model as a diffusers StableDiffusionPipeline folder (safetensors weights), atomically.

    ``replace=True`` only for a folder sdtrain owns (a run's export, its cache); otherwise ``directory``
    is the user's destination and must not exist or be empty (see ``trainer.atomic.new_directory``).

    The main weight files are always float32, as in diffusers' own model folders: a plain
    ``from_pretrained(directory)`` then gives every part in float32 whatever the library versions
    (transformers 5 keeps a text encoder in the dtype its config names, diffusers upcasts its own models,
    and a half text encoder beside a float32 UNet fails on the first prompt). A ``save_dtype`` of fp16 or
    bf16 adds the weights in that dtype as the diffusers variant of that name (``*.fp16.safetensors``),
    loaded with ``from_pretrained(directory, variant="fp16", torch_dtype=torch.float16)``; see docs/formats.md.
    """
    from diffusers import StableDiffusionPipeline

    from trainer.atomic import new_directory, replaced_directory
    from trainer.formats.safetensors_file import DTYPES
    from trainer.sampling import sampling_scheduler

    scheduler = sampling_scheduler(model.noise_scheduler.config)

    def pipeline(dtype: torch.dtype) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            unet=_as_dtype(model.unet, dtype),
            vae=_as_dtype(model.vae, dtype),
            text_encoder=_as_dtype(model.text_encoder, dtype),
            tokenizer=model.tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    with (replaced_directory if replace else new_directory)(directory) as tmp:
        if save_dtype != "fp32":
            pipeline(DTYPES[save_dtype]).save_pretrained(tmp, safe_serialization=True, variant=save_dtype)
        # The float32 files go last: both saves write the same config files, and the text encoder's
        # config.json names its dtype, which transformers loads the main files in.
        pipeline(torch.float32).save_pretrained(tmp, safe_serialization=True)


def torch_load_safely(path: Path, allow_unsafe_pickle: bool):
    """Read a pickled .ckpt/.pt with weights_only=True; anything else only with the explicit opt-in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not allow_unsafe_pickle:
            raise UserError(
                f"'{path}' is a pickle that torch.load(weights_only=True) refuses ({err.__class__.__name__}). "
                "Pickles can run code when loaded. Convert it to .safetensors, or if you trust its source set "
                "model.allow_unsafe_pickle=true."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)
