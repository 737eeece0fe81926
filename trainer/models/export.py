"""Write a whole model: as a diffusers pipeline folder, or as one file in its family's single-file layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.atomic import staged_directory
from trainer.families.base import SGM_IMPLEMENTATION
from trainer.formats import ldm_checkpoint
from trainer.formats.safetensors_file import modelspec
from trainer.models.base_model import BaseModel


def save_diffusers_folder(model: BaseModel, directory: Path) -> None:
    """Write the model as a diffusers pipeline folder (safetensors weights), atomically."""
    pipe = model.pipeline()
    with staged_directory(directory) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def single_file_tensors(model: BaseModel) -> dict[str, torch.Tensor]:
    """The model's weights named as its family's single-file layout names them (tensors not copied)."""
    components = {name: module.state_dict() for name, module in model.parts().items()}
    return ldm_checkpoint.to_single_file(components, unet_config=model.unet.config, layout=model.family.single_file_layout)


def save_single_file(model: BaseModel, path: Path, *, dtype: torch.dtype = torch.float16, title: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model as one ``.safetensors`` file that AUTOMATIC1111 and ComfyUI load, atomically.

    Floating-point tensors are cast to ``dtype`` (fp16 is what the UIs share; float32 is lossless).
    The header carries Stability AI ModelSpec keys so UIs show the architecture and prediction type;
    ``metadata`` adds or overrides keys (values must be strings).
    """
    path = Path(path)
    header = modelspec(
        model.family.modelspec_architecture(model.prediction_type),
        SGM_IMPLEMENTATION,
        title or path.stem,
        model.native_resolution,
        model.prediction_type,
    )
    header.update(metadata or {})
    return ldm_checkpoint.save_single_file(path, single_file_tensors(model), header, dtype)
