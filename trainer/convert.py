"""``sdtrain convert``: a whole SD1.x/SD2.x/SDXL model between the diffusers folder and the single-file layout.

The direction follows the paths: a destination ending in ``.safetensors`` gets one original (ldm)
layout file, as AUTOMATIC1111 and ComfyUI load it; any other destination becomes a diffusers folder.
The source is read like ``model.base``: a diffusers folder, or a single ``.safetensors``/``.ckpt``
file (whose architecture comes from ``config``, else the packaged SD1.5/SD2.1 configs). Only the three
model parts travel: EMA copies and noise-schedule buffers of training checkpoints are left out.
"""

from __future__ import annotations

from pathlib import Path

from trainer.atomic import refuse_to_replace
from trainer.errors import UserError
from trainer.formats.safetensors_file import DTYPES
from trainer.models.export import save_diffusers_folder, save_single_file
from trainer.models.loading import load_base_model

SINGLE_FILE_SUFFIX = ".safetensors"


def convert_checkpoint(src: Path, dst: Path, dtype: str, *, config: Path | None = None) -> Path:
    """Write the model at ``src`` to ``dst`` with floating-point weights in ``dtype`` (fp32, fp16, bf16).

    A diffusers folder keeps float32 main files whatever ``dtype`` says, so that a plain ``from_pretrained``
    works, and holds fp16/bf16 as the diffusers variant of that name beside them (docs/formats.md).

    ``config``: for a single-file ``src`` that is not SD1.5/SD2.1-shaped, a diffusers folder whose
    configs describe it. Returns ``dst``. Refuses to overwrite anything.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise UserError(f"Convert: dtype '{dtype}' is not one of {', '.join(DTYPES)}.")
    if not src.exists():
        raise UserError(f"Convert: the source '{src}' does not exist. Pass a diffusers folder or a single-file .safetensors/.ckpt checkpoint.")
    refuse_to_replace([dst], "Choose a new name for the converted file, or delete that one first.")
    if dst.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"Convert: '{dst}' names a pickle; sdtrain writes single files as {SINGLE_FILE_SUFFIX} only (every UI loads them). Use a {SINGLE_FILE_SUFFIX} name.")
    try:
        model = load_base_model(str(src), config=str(config) if config else None)
    except UserError as err:
        # The loader speaks in recipe keys; here model.base is the source and model.config the --config option.
        raise UserError(f"Convert: {err} (For sdtrain convert, model.base is the source and model.config the --config option.)") from None
    if dst.suffix.lower() == SINGLE_FILE_SUFFIX:
        return save_single_file(model, dst, dtype=DTYPES[dtype], title=dst.stem)
    save_diffusers_folder(model, dst, dtype)
    return dst
