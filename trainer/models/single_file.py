"""Load a single-file SD1.x/SD2.x checkpoint (original ldm layout) offline.

A single file holds weights but no architecture, and diffusers' ``from_single_file`` fetches the
matching configs from the Hugging Face hub, which sdtrain never contacts. So the configs come from
``model.config`` (a diffusers folder of the same architecture) or from the package
(``trainer/models/configs``: stable-diffusion-v1-5, stable-diffusion-2-1 and 2-1-base), the weights
are renamed by our own table (``trainer.formats.ldm_checkpoint``) and loaded strictly, so a file
that does not fit the config is reported instead of half-loaded. Tokenizer files are generated from
the CLIP BPE shipped in the package.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.errors import UserError
from trainer.formats.ldm_checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointLayoutError, is_sd2_checkpoint, ldm_to_diffusers
from trainer.models.tokenizer import clip_tokenizer

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
# folder under PACKAGED_CONFIGS -> the model whose configs it holds
PACKAGED_MODELS = {
    "sd1": "stable-diffusion-v1-5",
    "sd2": "stable-diffusion-2-1 (768px, v-prediction)",
    "sd2-base": "stable-diffusion-2-1-base (512px, epsilon)",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_FIX = "set model.config to the diffusers folder of the model this file was made from (or of the same architecture)"


def packaged_config_dir(is_v2: bool, prediction_type: str) -> Path:
    """SD1.5 configs for SD1; SD2.1 (768, v-prediction) or SD2.1-base (512, epsilon) for SD2."""
    if not is_v2:
        return PACKAGED_CONFIGS / "sd1"
    return PACKAGED_CONFIGS / ("sd2" if prediction_type == "v_prediction" else "sd2-base")


def _read_state_dict(path: Path, allow_unsafe_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of ``path``; every unreadable file becomes a UserError."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except Exception as err:  # safetensors reports a bad header, a short file, ... as different types
            raise UserError(
                f"model.base '{path}' is not a readable .safetensors file ({err}). The file is damaged or "
                "incomplete: copy or download it again."
            ) from None
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"model.base '{path}' has an unknown extension '{path.suffix}'. Use a single-file checkpoint "
            "(.safetensors, or a .ckpt pickle) or a diffusers folder."
        )
    from trainer.models.loading import torch_load_safely

    # torch.save writes a zip archive (older torch a bare pickle). Checking this first tells a
    # truncated or foreign file apart from a pickle that weights_only refuses.
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if not (magic == b"\x80\x02" or (magic == b"PK" and zipfile.is_zipfile(path))):
        raise UserError(
            f"model.base '{path}' is not a PyTorch checkpoint, or it is incomplete (its end is missing). "
            "Copy or download it again, or convert it to .safetensors."
        )
    try:
        checkpoint = torch_load_safely(path, allow_unsafe_pickle)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"model.base '{path}' could not be read ({err.__class__.__name__}: {err}). Copy or download it again.") from None
    # Training checkpoints nest the weights: {"state_dict": {...}, "global_step": ...}
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"model.base '{path}' holds a {type(checkpoint).__name__}, not a dict of weights. Use a Stable Diffusion checkpoint."
        )
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}, {}


def _check_family(path: Path, state_dict: dict[str, torch.Tensor]) -> bool:
    """True for SD2, False for SD1; a UserError that says what the file is otherwise."""
    keys = list(state_dict)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UserError(f"model.base '{path}' is an SDXL checkpoint; sdtrain trains SD1.x and SD2.x models only.")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("lora_", "lycoris_")) for k in keys):
            what = "a LoRA/LyCORIS file"
        elif any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
            what = "one diffusers component (a UNet), not a whole model"
        else:
            what = "not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"
        raise UserError(
            f"model.base '{path}' is {what}. Set model.base to a full SD1.x/SD2.x checkpoint or a diffusers folder."
        )
    try:
        is_v2 = is_sd2_checkpoint(state_dict)
        if not any(k.startswith(VAE_PREFIX) for k in keys):
            raise CheckpointLayoutError(f"no VAE ({VAE_PREFIX}* tensors)")
    except CheckpointLayoutError as err:
        raise UserError(
            f"model.base '{path}' has {err}; sdtrain needs a full checkpoint (UNet, VAE and text encoder). "
            "Use a full SD1.x/SD2.x checkpoint or a diffusers folder."
        ) from None
    return is_v2


def checkpoint_prediction_type(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], is_v2: bool) -> str | None:
    """What the file says or suggests it predicts, or None when nothing does.

    ModelSpec metadata (which our own exports write) is taken at its word. Otherwise SD1 is
    epsilon, and SD2 is told apart as ComfyUI does: the v-prediction SD2 models (2.0-v, 2.1) have a
    much larger spread in the last transformer block's first norm bias than the 512 epsilon ones.
    """
    declared = metadata.get("modelspec.prediction_type")
    if declared in ("v", "v_prediction"):
        return "v_prediction"
    if declared == "epsilon":
        return "epsilon"
    if not is_v2:
        return None
    bias = state_dict.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is None:
        return None
    return "v_prediction" if torch.std(bias.float(), unbiased=False) > 0.09 else "epsilon"


def _read_json(config_dir: Path, relative: str, path: Path) -> dict:
    file = config_dir / relative
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"Loading model.base '{path}' needs '{file}', which could not be read ({err.__class__.__name__}). "
            "model.config must be a diffusers folder with unet/, vae/, text_encoder/ and scheduler/ configs."
        ) from None


def _load_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], component: str, path: Path, config_label: str):
    """Fill a model built on the meta device with ``weights``: every tensor present, every shape equal."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [
        f"{k} {list(weights[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in weights and weights[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        problems = []
        for label, items in (("shape (file vs config)", wrong), ("missing", missing), ("unexpected", extra)):
            if items:
                problems.append(f"{len(items)} {label}, e.g. {'; '.join(items[:2])}")
        raise UserError(
            f"model.base '{path}': its {component} does not match {config_label} "
            f"({', '.join(problems)}). The file is a different architecture than that config describes: {_FIX}."
        )
    # Parameters become the loaded tensors (assign=True): no second full-size copy in memory.
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def _empty(build):
    """``build()`` with parameters on the meta device (buffers stay real, e.g. CLIP's position_ids).

    Skips the random initialisation of hundreds of millions of weights that are replaced right after.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def load_single_file(path: Path, config_dir: Path | None, allow_unsafe_pickle: bool) -> dict:
    """unet, vae, text_encoder, tokenizer and a training DDPM scheduler from one checkpoint file.

    ``config_dir`` is a diffusers folder whose configs describe the file's architecture (its weights
    are not read); without it the packaged SD1.5/SD2.1 configs are used.
    """
    path = Path(path)
    state_dict, metadata = _read_state_dict(path, allow_unsafe_pickle)
    is_v2 = _check_family(path, state_dict)
    prediction_type = checkpoint_prediction_type(state_dict, metadata, is_v2)
    if config_dir is None:
        config_dir = packaged_config_dir(is_v2, prediction_type or "epsilon")
        config_label = f"the {PACKAGED_MODELS[config_dir.name]} configuration that sdtrain assumes when model.config is not set"
    else:
        config_dir = Path(config_dir)
        config_label = f"the configuration in '{config_dir}' (model.config)"

    unet_config = _read_json(config_dir, "unet/config.json", path)
    vae_config = _read_json(config_dir, "vae/config.json", path)
    text_config = CLIPTextConfig.from_dict(_read_json(config_dir, "text_encoder/config.json", path))
    scheduler_config = dict(_read_json(config_dir, "scheduler/scheduler_config.json", path))
    # Only the real widths (CLIP-L 768, OpenCLIP-H 1024) tell a config's family; small test models do not.
    if text_config.hidden_size in (768, 1024) and (text_config.hidden_size == 1024) != is_v2:
        raise UserError(
            f"model.base '{path}' is an SD{'2' if is_v2 else '1'} checkpoint but '{config_dir}' describes an "
            f"SD{'1' if is_v2 else '2'} model: {_FIX}."
        )

    try:
        unet_sd, vae_sd, text_sd = ldm_to_diffusers(
            state_dict, unet_config=unet_config, is_v2=is_v2, text_encoder_layers=text_config.num_hidden_layers
        )
    except CheckpointLayoutError as err:
        # Tensors without a place in the table: the config's block layout differs from the file's.
        raise UserError(f"model.base '{path}' does not fit {config_label}: {err}. {_FIX[0].upper() + _FIX[1:]}.") from None
    del state_dict  # frees what the conversion does not use (EMA copies of training checkpoints, ...)

    unet = _load_strict(_empty(lambda: UNet2DConditionModel.from_config(unet_config)), unet_sd, "UNet", path, config_label)
    vae = _load_strict(_empty(lambda: AutoencoderKL.from_config(vae_config)), vae_sd, "VAE", path, config_label)
    text_encoder = _empty(lambda: CLIPTextModel(text_config))
    if hasattr(text_encoder, "text_model"):  # transformers < 5 nests CLIP one level deeper
        text_sd = {"text_model." + key: tensor for key, tensor in text_sd.items()}
    text_encoder = _load_strict(text_encoder, text_sd, "text encoder", path, config_label)

    tokenizer_dir = config_dir / "tokenizer"
    if (tokenizer_dir / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        # SD2's OpenCLIP tokenizer pads with "!" (token 0); SD1's with the end-of-text token.
        tokenizer = clip_tokenizer(pad_token="!" if is_v2 else "<|endoftext|>")

    # Whatever sampler the config names, training uses DDPM with its betas and no sample clipping.
    scheduler_config["clip_sample"] = False
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    scheduler = DDPMScheduler.from_config(scheduler_config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
