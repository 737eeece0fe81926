"""kohya's LoRA file format, which AUTOMATIC1111, ComfyUI and diffusers all read.

A module path (diffusers names for the SD1/SD2 UNet, Hugging Face CLIP names for the text encoder)
becomes ``<prefix>_<path with "." replaced by "_">``, with tensors ``.lora_down.weight`` [r, in, *k],
``.lora_up.weight`` [out, r(, 1, 1)] and a 0-dim float32 ``.alpha`` (scale = alpha / r).
See docs/formats.md#kohya-lora.

transformers >= 5 dropped the ``text_model`` level from ``CLIPTextModel``'s module tree; the UIs only
match ``lora_te_text_model_encoder_layers_...``, so text-encoder paths are normalised here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"


@dataclass
class LoraWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def text_encoder_path(module_path: str) -> str:
    """The Hugging Face CLIP path with its ``text_model.`` level, whichever transformers made it."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


def kohya_name(prefix: str, module_path: str) -> str:
    if prefix == TEXT_ENCODER_PREFIX:
        module_path = text_encoder_path(module_path)
    return f"{prefix}_{module_path.replace('.', '_')}"


def to_state_dict(modules: dict[str, LoraWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{kohya module name: weights}`` -> the tensors of a kohya LoRA file."""
    tensors: dict[str, torch.Tensor] = {}
    for name, weights in modules.items():
        up = weights.up
        if weights.down.dim() == 4 and up.dim() == 2:
            up = up[:, :, None, None]
        tensors[f"{name}.lora_down.weight"] = weights.down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        # Consumers call .item() on alpha; keep it float32 whatever the weights' dtype.
        tensors[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    return tensors


def from_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, LoraWeights]:
    """The inverse of :func:`to_state_dict`; a missing alpha means no scaling (alpha = rank)."""
    modules: dict[str, LoraWeights] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        alpha = tensors.get(f"{name}.alpha")
        modules[name] = LoraWeights(
            down=down,
            up=tensors[f"{name}.lora_up.weight"],
            alpha=float(alpha.item()) if alpha is not None else float(down.shape[0]),
        )
    return modules


def delta_weight(weights: LoraWeights, multiplier: float = 1.0) -> torch.Tensor:
    """The weight change a UI applies: ``up @ down * alpha / r * multiplier``, shaped like the weight."""
    down, up = weights.down.float(), weights.up.float()
    rank = down.shape[0]
    delta = up.flatten(1) @ down.flatten(1)
    shape = (up.shape[0], *down.shape[1:])
    return delta.reshape(shape) * (weights.alpha / rank) * multiplier
