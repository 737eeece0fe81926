"""Load a single-file checkpoint (SD1/SD2 ldm layout, SDXL SGM layout) offline.

A single file holds weights but no architecture, and diffusers' ``from_single_file`` fetches the
matching configs from the Hugging Face hub, which sdtrain never contacts. So the configs come from
``model.config`` (a diffusers folder of the same architecture) or from the package
(``trainer/models/configs``: SD1.5, SD2.1, SD2.1-base, SDXL 1.0), the weights are renamed by our own
tables (``trainer.formats.ldm_checkpoint``, the layout the model's family names) and loaded strictly,
so a file that does not fit the config is reported instead of half-loaded. Tokenizer files are
generated from the CLIP BPE shipped in the package.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.errors import UserError
from trainer.formats.ldm_checkpoint import HF_PROJECTION, UNET_PREFIX, VAE_PREFIX, CheckpointLayoutError, from_single_file, vae_from_ldm
from trainer.models.conversion import FileBackedConversion
from trainer.models.tokenizer import clip_tokenizer

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_FIX = "set model.config to the diffusers folder of the model this file was made from (or of the same architecture)"


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


def read_safetensors_keys(path: Path, what: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and header metadata of a .safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys()), handle.metadata() or {}
    except Exception as err:  # safetensors reports a bad header, a short file, ... as different types
        raise UserError(f"{what} '{path}' is not a readable .safetensors file ({err}). The file is damaged or incomplete: copy or download it again.") from None


def read_state_dict(path: Path, allow_unsafe_pickle: bool, what: str = "model.base") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of ``path``; every unreadable file becomes a UserError."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        read_safetensors_keys(path, what)  # a damaged header is reported here, with the fix
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"{what} '{path}' has an unknown extension '{path.suffix}'. Use a single-file checkpoint "
            "(.safetensors, or a .ckpt pickle) or a diffusers folder."
        )
    # torch.save writes a zip archive (older torch a bare pickle). Checking this first tells a
    # truncated or foreign file apart from a pickle that weights_only refuses.
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if not (magic == b"\x80\x02" or (magic == b"PK" and zipfile.is_zipfile(path))):
        raise UserError(
            f"{what} '{path}' is not a PyTorch checkpoint, or it is incomplete (its end is missing). "
            "Copy or download it again, or convert it to .safetensors."
        )
    try:
        checkpoint = torch_load_safely(path, allow_unsafe_pickle)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{what} '{path}' could not be read ({err.__class__.__name__}: {err}). Copy or download it again.") from None
    # Training checkpoints nest the weights: {"state_dict": {...}, "global_step": ...}
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what} '{path}' holds a {type(checkpoint).__name__}, not a dict of weights. Use a Stable Diffusion checkpoint.")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}, {}


def what_else(keys: list[str]) -> str | None:
    """What a file that is no whole single-file checkpoint looks like, or None if it looks like one."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        if not any(k.startswith(VAE_PREFIX) for k in keys):
            return f"a checkpoint without a VAE ({VAE_PREFIX}* tensors)"
        return None
    if any(k.startswith(("lora_", "lycoris_")) for k in keys):
        return "a LoRA/LyCORIS file"
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return "one diffusers component (a UNet), not a whole model"
    return "not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"


def declared_prediction_type(keys, metadata: dict[str, str]) -> str | None:
    """What the file says it predicts: ModelSpec metadata (our exports write it), or the ``v_pred``
    marker tensor that v-prediction SDXL files carry (ComfyUI reads it)."""
    declared = metadata.get("modelspec.prediction_type")
    if declared in ("v", "v_prediction") or "v_pred" in keys:
        return "v_prediction"
    if declared == "epsilon":
        return "epsilon"
    return None


def _read_json(config_dir: Path, relative: str, path: Path) -> dict:
    file = config_dir / relative
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"Loading model.base '{path}' needs '{file}', which could not be read ({err.__class__.__name__}). "
            "model.config must be a diffusers folder with the configs of every part (unet/, vae/, text_encoder/, ..., scheduler/)."
        ) from None


def load_strict(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], component: str, path: Path, config_label: str, fix: str = _FIX,
    dtype: torch.dtype = torch.float32,
):
    """Fill a model built on the meta device with ``weights`` in ``dtype``: every tensor present, every shape equal."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [f"{k} {list(weights[k].shape)} vs {list(expected[k].shape)}" for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or extra or wrong:
        problems = []
        for label, items in (("shape (file vs config)", wrong), ("missing", missing), ("unexpected", extra)):
            if items:
                problems.append(f"{len(items)} {label}, e.g. {'; '.join(items[:2])}")
        raise UserError(
            f"'{path}': its {component} does not match {config_label} ({', '.join(problems)}). "
            f"The file is a different architecture than that config describes: {fix}."
        )
    # Parameters become the loaded tensors (assign=True): no second full-size copy in memory. A tensor of another
    # dtype is copied; each one's mapped file pages go once its copy exists, so the file's pages and the converted
    # model are never resident together (an fp16 SDXL file widened to fp32: 7 GB more at the peak).
    convert = FileBackedConversion()
    weights = {k: convert(v, dtype=dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def empty(build):
    """``build()`` with parameters on the meta device (buffers stay real, e.g. CLIP's position_ids).

    Skips the random initialisation of hundreds of millions of weights that are replaced right after.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def text_encoder_class(spec):
    return CLIPTextModelWithProjection if spec.pooled else CLIPTextModel


def hf_text_keys(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our text-encoder keys (no ``text_model.``) as ``module`` names them: transformers < 5 nests every
    CLIP text tower one level deeper, and ``CLIPTextModelWithProjection`` does in every version."""
    if not hasattr(module, "text_model"):
        return weights
    return {key if key == HF_PROJECTION else "text_model." + key: tensor for key, tensor in weights.items()}


def load_single_file(
    path: Path, family, tensors: dict[str, torch.Tensor], metadata: dict[str, str], config_dir: Path | None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict:
    """The parts of a single-file checkpoint of ``family``: unet, vae, text encoders, tokenizers and a
    training DDPM scheduler, keyed by diffusers component names.

    ``config_dir`` is a diffusers folder whose configs describe the file's architecture (its weights
    are not read); without it the family's packaged configs are used. ``dtypes``: each part's dtype
    by component name (default fp32), read straight into it from the file.
    """
    dtypes = dtypes or {}
    path = Path(path)
    prediction_type = declared_prediction_type(tensors, metadata) or family.guess_prediction_type(tensors)
    if config_dir is None:
        config_dir = family.config_dir_for(prediction_type)
        config_label = f"the {family.title} configuration that sdtrain assumes when model.config is not set ({config_dir.name})"
    else:
        config_dir = Path(config_dir)
        config_label = f"the configuration in '{config_dir}' (model.config)"

    unet_config = _read_json(config_dir, "unet/config.json", path)
    vae_config = _read_json(config_dir, "vae/config.json", path)
    text_configs = {spec.component: CLIPTextConfig.from_dict(_read_json(config_dir, f"{spec.component}/config.json", path)) for spec in family.text_encoders}
    scheduler_config = dict(_read_json(config_dir, "scheduler/scheduler_config.json", path))

    try:
        weights = from_single_file(
            tensors, unet_config=unet_config, layout=family.single_file_layout,
            text_encoder_layers={component: config.num_hidden_layers for component, config in text_configs.items()},
        )
    except CheckpointLayoutError as err:
        # Tensors without a place in the table: the config's block layout differs from the file's.
        raise UserError(f"model.base '{path}' does not fit {config_label}: {err}. {_FIX[0].upper() + _FIX[1:]}.") from None
    del tensors  # frees what the conversion does not use (EMA copies of training checkpoints, ...)

    parts = {
        "unet": load_strict(
            empty(lambda: UNet2DConditionModel.from_config(unet_config)), weights.pop("unet"), "UNet", path, config_label,
            dtype=dtypes.get("unet", torch.float32),
        ),
        "vae": load_strict(
            empty(lambda: AutoencoderKL.from_config(vae_config)), weights.pop("vae"), "VAE", path, config_label, dtype=dtypes.get("vae", torch.float32)
        ),
    }
    for spec in family.text_encoders:
        config = text_configs[spec.component]
        encoder = empty(lambda config=config, spec=spec: text_encoder_class(spec)(config))
        parts[spec.component] = load_strict(
            encoder, hf_text_keys(encoder, weights.pop(spec.component)), f"text encoder '{spec.component}'", path, config_label,
            dtype=dtypes.get(spec.component, torch.float32),
        )
        tokenizer_dir = config_dir / spec.tokenizer_component
        if (tokenizer_dir / "vocab.json").is_file():
            parts[spec.tokenizer_component] = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        else:
            parts[spec.tokenizer_component] = clip_tokenizer(pad_token=spec.pad_token)

    # Whatever sampler the config names, training uses DDPM with its betas and no sample clipping.
    scheduler_config["clip_sample"] = False
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    parts["scheduler"] = DDPMScheduler.from_config(scheduler_config)
    return parts


def load_vae_file(path: Path, vae_config: dict, family_title: str, allow_unsafe_pickle: bool) -> AutoencoderKL:
    """A VAE from a single file (ldm names, with or without ``first_stage_model.``, or diffusers names),
    built with the base model's VAE config: a VAE of another architecture is refused by name."""
    tensors, _ = read_state_dict(path, allow_unsafe_pickle, what="model.vae")
    if any(key.startswith(VAE_PREFIX) for key in tensors):
        tensors = {key[len(VAE_PREFIX):]: value for key, value in tensors.items() if key.startswith(VAE_PREFIX)}
    if any(key.startswith("encoder.down.") for key in tensors):
        try:
            tensors = vae_from_ldm(tensors)
        except CheckpointLayoutError as err:
            raise UserError(f"model.vae '{path}' is not a VAE of the SD/SDXL layout: {err}. Use the VAE file made for this model.") from None
    fix = f"use a VAE made for {family_title} (or leave model.vae unset)"
    return load_strict(empty(lambda: AutoencoderKL.from_config(vae_config)), tensors, "VAE", path, f"the VAE of this {family_title} model", fix)
