"""Class images for prior preservation: what the base model itself draws for the class prompt.

Image number i of the class folder is ``class_{i:05d}.png``, drawn with seed ``seed + i``. Every image
already in the folder counts toward the requested number (drawn by an earlier run or put there by the
user), and only the missing numbers are drawn. So an interrupted generation continues where it
stopped, a later run reuses the folder as it is, and a deleted image is drawn again from its own seed.
Each PNG carries its prompt and seed, and is written atomically (a crash leaves no half image).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from trainer.data.sources import is_image
from trainer.errors import UserError
from trainer.models.loading import BaseModel
from trainer.sampling import prompt_embeddings, sampling_pipeline, save_png_with_settings

# Room for a PNG's header and text chunks on top of its pixel data.
_PNG_OVERHEAD = 4096


@dataclass(frozen=True)
class ClassImageRequest:
    """What the class folder should hold, and how the base model draws what is missing."""

    directory: Path
    count: int
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    batch_size: int
    clip_skip: int  # as model.clip_skip counts: 1 = last layer


def image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def existing_images(directory: Path) -> list[Path]:
    """The images the data loader will read from the folder (top level, not hidden)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.is_file() and is_image(path) and not path.name.startswith("."))


def missing_indices(request: ClassImageRequest) -> list[int]:
    """The image numbers to draw: as many as the folder lacks, the lowest whose file name is free."""
    missing = request.count - len(existing_images(request.directory))
    indices, index = [], 0
    while len(indices) < missing:
        if not (request.directory / image_name(index)).exists():
            indices.append(index)
        index += 1
    return indices


def images_of_other_prompts(request: ClassImageRequest) -> list[str]:
    """Names of images this tool drew for a different prompt: they would be captioned with the new one."""
    names = []
    for path in existing_images(request.directory):
        try:
            with Image.open(path) as image:
                prompt = image.info.get("prompt")
        except OSError:
            continue  # the data loader reports unreadable images
        if prompt is not None and prompt != request.prompt:
            names.append(path.name)
    return names


def check_can_write(request: ClassImageRequest, missing: int) -> None:
    """A clear error before anything is drawn: the folder must be writable and its disk roomy enough."""
    directory = request.directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"dreambooth.class_dir '{directory}' is not a folder sdtrain can write to ({err.strerror or err}), and "
            f"{missing} class images must be generated into it. Point dreambooth.class_dir at a writable folder, or "
            f"put {missing} more class images there yourself."
        ) from None
    needed = missing * (request.width * request.height * 3 + _PNG_OVERHEAD)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(
            f"dreambooth.class_dir '{directory}' is on a disk with {free / 2**20:.1f} MiB free, but the {missing} missing "
            f"{request.width}x{request.height} class images need up to {needed / 2**20:.1f} MiB. Free some space, point "
            f"dreambooth.class_dir at another disk, or lower dreambooth.num_class_images."
        )


def generate_class_images(model: BaseModel, request: ClassImageRequest, indices: list[int], device: torch.device) -> list[Path]:
    """Draw images ``indices`` in batches of ``request.batch_size``; training's RNG state is left untouched."""
    pipe = sampling_pipeline(model, device)
    paths = []
    # disable=None: a bar on a terminal, silence in logs and tests.
    bar = tqdm(total=len(indices), desc="class images", unit="image", disable=None, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for start in range(0, len(indices), request.batch_size):
            chunk = indices[start:start + request.batch_size]
            seeds = [request.seed + index for index in chunk]
            images = pipe(
                prompt_embeds=prompt_embeddings(pipe, [request.prompt] * len(chunk), request.clip_skip, device),
                negative_prompt_embeds=prompt_embeddings(pipe, [request.negative_prompt] * len(chunk), request.clip_skip, device),
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                # One generator per image: its picture depends on its own seed, not on the batch it is drawn in.
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            ).images
            for index, seed, image in zip(chunk, seeds, images, strict=True):
                paths.append(
                    save_png_with_settings(
                        request.directory / image_name(index), image, prompt=request.prompt, negative_prompt=request.negative_prompt,
                        seed=seed, steps=request.steps, guidance_scale=request.guidance_scale, extra={"model": model.name},
                    )
                )
                bar.update(1)
    bar.close()
    return paths


def ensure_class_images(model: BaseModel, request: ClassImageRequest, device: torch.device) -> list[Path]:
    """Fill the class folder up to ``request.count`` images; returns the ones drawn now (none if it was full)."""
    indices = missing_indices(request)
    if not indices:
        return []
    check_can_write(request, len(indices))
    print(
        f"Generating {len(indices)} class images for '{request.prompt}' ({request.width}x{request.height}, "
        f"{request.steps} steps) into {request.directory}; later runs reuse them."
    )
    return generate_class_images(model, request, indices, device)
