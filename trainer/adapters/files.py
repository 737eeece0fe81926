"""Reading and writing the adapter files the tools take and make (kohya names, LyCORIS tensors).

A file is read whole (adapters are small) and refused with a message when it is no kohya-style adapter:
a diffusers/peft layout, a whole model, a pickle. Every output goes through :func:`save_adapter`:
refused over an existing file unless the user said ``--overwrite``, written atomically, with
``ss_network_dim``/``ss_network_alpha`` telling the ranks and fresh ``sshs_*`` hashes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.lowrank import has_kernel, weight_shape
from trainer.atomic import refuse_to_replace
from trainer.errors import UserError
from trainer.formats import lycoris
from trainer.formats.kohya_lora import TEXT_ENCODER_PREFIX, UNET_PREFIX
from trainer.formats.safetensors_file import read_safetensors, save_safetensors

# The part a module name belongs to, by prefix (longest first: lora_te1_ before lora_te_).
PARTS = (("lora_te1_", "TE1"), ("lora_te2_", "TE2"), (f"{TEXT_ENCODER_PREFIX}_", "TE"), (f"{UNET_PREFIX}_", "UNet"), (f"{lycoris.GENERIC_PREFIX}_", "UNet"))
# A module's tensors, by suffix (lycoris.split_modules).
Module = dict[str, torch.Tensor]


@dataclass
class AdapterFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def modules(self) -> dict[str, Module]:
        return lycoris.split_modules(self.tensors)


def part_of(name: str) -> str | None:
    """'UNet', 'TE' (SD1/SD2's encoder), 'TE1', 'TE2' (SDXL's), or None for a name no UI reads."""
    return next((part for prefix, part in PARTS if name.startswith(prefix)), None)


def check_exists(path: Path, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{role} '{path}' does not exist. Check the path.")
    return path


def is_peft_layout(keys) -> bool:
    """diffusers' own LoRA files: peft names under the pipeline's parts (``unet.….lora_A.weight``)."""
    return any(".lora_A." in key or ".lora_B." in key or ".lora.down." in key for key in keys)


def _layout_of_foreign(keys: list[str]) -> str | None:
    """What a file without kohya module names is instead, for the message that refuses it."""
    if is_peft_layout(keys):
        return "a LoRA in the diffusers/peft layout (unet.…lora_A.weight); sdtrain's tools read kohya-named files (lora_unet_…)"
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.")) for key in keys):
        return "a whole model checkpoint, not an adapter"
    if any(key.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for key in keys):
        return "a diffusers model part (UNet weights), not an adapter"
    return None


def read_tensors(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and header metadata, or a UserError that names the file and the fix."""
    path = check_exists(path, role)
    if path.is_dir():
        raise UserError(f"{role} '{path}' is a folder; give the adapter's .safetensors file.")
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"{role} '{path}' is not a .safetensors file. sdtrain reads adapters only as safetensors (a .pt/.ckpt is a pickle "
            "that can run code when loaded); convert it with the tool that made it, or use its .safetensors version."
        )
    return read_safetensors(path, role)


def read_adapter(path: Path, role: str = "adapter") -> AdapterFile:
    """An adapter file with kohya module names, or a UserError that says what the file is instead."""
    tensors, metadata = read_tensors(path, role)
    names = list(lycoris.split_modules(tensors))
    if not names or not any(part_of(name) for name in names):
        foreign = _layout_of_foreign(list(tensors))
        what = foreign or "no adapter: none of its tensors has a kohya module name (lora_unet_…, lora_te_…)"
        raise UserError(f"{role} '{path}' is {what}. Give a LoRA or LyCORIS file in kohya's format, as sdtrain and kohya's sd-scripts write them.")
    return AdapterFile(Path(path), tensors, metadata)


def check_output(path: Path, overwrite: bool) -> Path:
    """Refuse to replace an existing file, or a folder that holds anything, unless ``--overwrite`` was given."""
    if not overwrite:
        refuse_to_replace([path], "Choose another path, or add --overwrite to replace it.", empty_folder_is_free=True)
    return Path(path)


def guess_family(modules: Mapping[str, Module], metadata: Mapping[str, str]) -> str:
    """'SDXL', 'SD1', 'SD2' or 'SD1/SD2' (when neither names nor metadata tell them apart) of an adapter.

    SDXL files name two text encoders (lora_te1_/lora_te2_) and SGM UNet blocks (input_blocks_...);
    SD1 and SD2 share their names, so metadata (ss_v2, ss_base_model_version, ModelSpec) or the text
    encoder's width (768 for SD1's CLIP ViT-L, 1024 for SD2's OpenCLIP ViT-H) tells them apart.
    """
    names = list(modules)
    if any(part_of(n) in ("TE1", "TE2") for n in names) or any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")) for n in names):
        return "SDXL"
    version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    if "sdxl" in version or "stable-diffusion-xl" in version:
        return "SDXL"
    if metadata.get("ss_v2") == "True" or "sd_v2" in version or "stable-diffusion-v2" in version:
        return "SD2"
    if metadata.get("ss_v2") == "False" or "sd_v1" in version or "stable-diffusion-v1" in version:
        return "SD1"
    widths = {m["lora_down.weight"].shape[1] for n, m in modules.items() if part_of(n) == "TE" and n.endswith("self_attn_q_proj") and "lora_down.weight" in m}
    return {768: "SD1", 1024: "SD2"}.get(next(iter(widths)) if len(widths) == 1 else None, "SD1/SD2")


def floating_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of a file's weights (alpha is float32 in every file, so it does not count)."""
    dtypes = [t.dtype for key, t in tensors.items() if t.is_floating_point() and not key.endswith(".alpha")]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def network_dims(modules: Mapping[str, Module]) -> dict[str, str]:
    """``ss_network_dim``/``ss_network_alpha`` (and conv_dim/conv_alpha in ``ss_network_args``) of LoRA modules:
    kohya's numbers when all linear (and all 3x3 conv) modules share a rank and alpha, else "Dynamic"."""
    linear = {(m["lora_down.weight"].shape[0], float(m["alpha"])) for m in modules.values() if not has_kernel(weight_shape(m))}
    conv = {(m["lora_down.weight"].shape[0], float(m["alpha"])) for m in modules.values() if has_kernel(weight_shape(m))}
    if len(linear) > 1 or len(conv) > 1:
        return {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "ss_network_args": "{}"}
    (dim, alpha), = linear or conv
    args = {}
    if linear and conv:
        (conv_dim, conv_alpha), = conv
        args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    return {"ss_network_dim": str(dim), "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(args)}


def save_adapter(path: Path, modules: Mapping[str, Mapping], metadata: Mapping[str, str], dtype: torch.dtype) -> Path:
    """Write ``{module: {suffix: tensor or alpha}}`` atomically with ``metadata`` and fresh sshs_* hashes."""
    header = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    return save_safetensors(Path(path), lycoris.to_state_dict(modules, dtype), header, with_hashes=True)
