"""Loss masks (``data.masks``): which pixels of an image training learns.

``alpha`` takes the image's own alpha channel, ``dir`` a mask image of the same name in
``data.mask_dir`` (white = learn, black = ignore, grey in between). The mask follows the image
through the same resize, crop and flip, and is averaged down to the latent grid; the loss of a sample
is then its mask-weighted mean (trainer.diffusion.per_sample_loss). See docs/data.md, "Loss masks".
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.sources import IMAGE_EXTENSIONS, Problem
from trainer.errors import UserError

if TYPE_CHECKING:  # the recipe schema imports the data package's checks; annotations only here
    from trainer.data.scan import Item
    from trainer.recipe import DataConfig

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_file(cfg: DataConfig, item: Item) -> Path | None:
    """The mask of ``item`` in data.mask_dir: ``<mask_dir>/<subset folder>/<name>.<ext>``, else
    ``<mask_dir>/<name>.<ext>``, any image extension (a mask may be a PNG of a JPEG image)."""
    stem = Path(item.relative_path).with_suffix("")
    for folder in (Path(cfg.mask_dir) / item.subset, Path(cfg.mask_dir)):
        for extension in IMAGE_EXTENSIONS:
            candidate = folder / f"{stem}{extension}"
            if candidate.is_file():
                return candidate
    return None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _mask_image(cfg: DataConfig, item: Item) -> Image.Image | None:
    """The mask as an 8-bit grey image the size of the displayed image (EXIF-rotated), or None: the whole image counts."""
    if cfg.masks == "alpha":
        with Image.open(io.BytesIO(item.origin.read_bytes())) as opened:
            image = ImageOps.exif_transpose(opened)
            return image.convert("RGBA").getchannel("A") if _has_alpha(image) else None
    with Image.open(mask_file(cfg, item)) as opened:
        return ImageOps.exif_transpose(opened).convert("L")


def mask_key(cfg: DataConfig, item: Item) -> str:
    """What the mask of ``item`` adds to its latent-cache key: nothing without masks; the alpha channel is
    part of the image bytes already keyed; a mask file by its bytes."""
    if cfg.masks == "none":
        return ""
    if cfg.masks == "alpha":
        return "-mask-alpha"
    return "-mask-" + hashlib.sha256(mask_file(cfg, item).read_bytes()).hexdigest()[:16]


def load_mask(cfg: DataConfig, item: Item, flipped: bool) -> torch.Tensor:
    """float32 [1, H, W] in [0, 1] over the bucket's pixels: resized, cropped and mirrored as load_pixels
    treats the image."""
    mask = _mask_image(cfg, item)
    if mask is None:
        width, height = item.bucket
        return torch.ones(1, height, width)
    if mask.size != item.original_size:
        raise UserError(
            f"Mask '{mask_file(cfg, item)}' is {mask.size[0]}x{mask.size[1]} px but its image '{item.origin}' is "
            f"{item.original_size[0]}x{item.original_size[1]}: a mask must have its image's size. Re-export it."
        )
    if mask.size != item.resized:
        mask = mask.resize(item.resized, Image.Resampling.LANCZOS)
    mask = mask.crop(item.crop_ltrb)
    if flipped:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def on_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [..., 1, H, W] pixel mask averaged over each latent pixel's block: [..., 1, h, w]."""
    return torch.nn.functional.adaptive_avg_pool2d(mask, size)


def mask_problems(cfg: DataConfig, items: list[Item]) -> list[Problem]:
    """Images without a mask, masks of another size, masks that ignore everything (data inspect lists them;
    training stops at the fatal ones)."""
    if cfg.masks == "none":
        return []
    if cfg.masks == "dir" and not (cfg.mask_dir and Path(cfg.mask_dir).is_dir()):
        return [Problem(f"data.masks is 'dir' but data.mask_dir '{cfg.mask_dir}' is not a folder. Set data.mask_dir to the folder of mask images.")]
    missing, wrong_size, black, no_alpha = [], [], [], []
    for item in items:
        if cfg.masks == "dir" and mask_file(cfg, item) is None:
            missing.append(str(item.origin))
            continue
        mask = _mask_image(cfg, item)
        if mask is None:
            no_alpha.append(str(item.origin))
        elif mask.size != item.original_size:
            wrong_size.append(f"{mask_file(cfg, item)} ({mask.size[0]}x{mask.size[1]}, image {item.original_size[0]}x{item.original_size[1]})")
        elif mask.getextrema()[1] == 0:
            black.append(str(item.origin))
    problems = []
    if missing:
        problems.append(Problem(f"data.masks is 'dir' but these images have no mask of the same name in data.mask_dir '{cfg.mask_dir}'; add one (white = learn), or set data.masks=none", files=tuple(missing)))
    if wrong_size:
        problems.append(Problem("these masks do not have their image's size; re-export them at the image's size", files=tuple(wrong_size)))
    if black:
        problems.append(Problem("these images' masks are all black, so they teach nothing (white = learn)", fatal=False, files=tuple(black)))
    if no_alpha:
        problems.append(Problem("data.masks is 'alpha' but these images have no alpha channel: every pixel of them is learned", fatal=False, files=tuple(no_alpha)))
    return problems
