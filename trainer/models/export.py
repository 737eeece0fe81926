"""Write a whole model: as a diffusers pipeline folder, or as one file in its family's single-file layout."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.atomic import new_directory, replaced_directory
from trainer.families.base import SGM_IMPLEMENTATION
from trainer.formats import ldm_checkpoint
from trainer.formats.safetensors_file import DTYPES, modelspec
from trainer.models.base_model import BaseModel, replace_parts


def _as_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when it already holds ``dtype``, else a copy cast to it (the caller's model stays as it is)."""
    if all(tensor.dtype == dtype for tensor in module.state_dict().values() if tensor.is_floating_point()):
        return module
    return copy.deepcopy(module).to(dtype)


def save_diffusers_folder(model: BaseModel, directory: Path, save_dtype: str = "fp32", replace: bool = False) -> None:
    """Write the model as its family's diffusers pipeline folder (safetensors weights), atomically.

    ``replace=True`` only for a folder sdtrain owns (a run's export, its cache); otherwise ``directory``
    is the user's destination and must not exist or be empty (see ``trainer.atomic.new_directory``).

    The main weight files are always float32, as in diffusers' own model folders: a plain
    ``from_pretrained(directory)`` then gives every part in float32 whatever the library versions
    (transformers 5 keeps a text encoder in the dtype its config names, diffusers upcasts its own models,
    and a half text encoder beside a float32 UNet fails on the first prompt). A ``save_dtype`` of fp16 or
    bf16 adds the weights in that dtype as the diffusers variant of that name (``*.fp16.safetensors``),
    loaded with ``from_pretrained(directory, variant="fp16", torch_dtype=torch.float16)``; see
    docs/formats.md#whole-models--diffusers-folder.
    """
    def pipeline(dtype: torch.dtype):
        cast = replace_parts(model, {name: _as_dtype(part, dtype) for name, part in model.parts().items()})
        return cast.pipeline()

    with (replaced_directory if replace else new_directory)(directory) as tmp:
        if save_dtype != "fp32":
            pipeline(DTYPES[save_dtype]).save_pretrained(tmp, safe_serialization=True, variant=save_dtype)
        # The float32 files go last: both saves write the same config files, and the text encoder's
        # config.json names its dtype, which transformers loads the main files in.
        pipeline(torch.float32).save_pretrained(tmp, safe_serialization=True)


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
