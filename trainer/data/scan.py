"""One pass over the data that finds every problem instead of stopping at the first.

``TrainingData`` and ``sdtrain data inspect`` share it, so inspect shows exactly what training would
use (the same captions, buckets and balanced repeats) and exactly what training would refuse.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from trainer.data.buckets import BucketPlan, Size
from trainer.data.masks import mask_problems
from trainer.data.sources import ImageSource, Problem, Subset, list_images, resolve_subsets

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.recipe import DataConfig

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Item:
    """One image as training uses it. ``caption`` is the raw text, before trigger word/shuffle/dropout."""

    path: Path
    relative_path: str
    caption: str
    caption_source: str  # "file", "metadata", "folder words", "subset caption" or "none"
    subset: str
    # Samples per epoch. For reg images this is after kohya's balancing (0 = surplus, unused).
    repeats: int
    is_reg: bool
    original_size: Size  # (w, h) as displayed, i.e. after the EXIF rotation
    bucket: Size
    resized: Size  # scaled to cover the bucket ...
    crop_ltrb: tuple[int, int, int, int]  # ... then this box of it is kept
    ar_error: float
    content_hash: str  # sha256 of the file bytes


@dataclass
class ScanResult:
    subsets: list[Subset]
    items: list[Item]
    problems: list[Problem]
    plan: BucketPlan
    image_counts: dict[str, int]  # per subset name: images found (usable or not)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def _probe(path: Path) -> tuple[Size, str]:
    """Size and sha256 of an image, decoding it fully: a truncated file only fails on decode, and it is
    better to learn that now than hours into training."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        w, h = image.size
        # Orientations 5-8 rotate by 90 degrees: the picture the user sees is h x w.
        if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return (w, h), hashlib.sha256(data).hexdigest()


def _probe_or_problem(path: Path) -> tuple[Size, str] | Problem:
    try:
        return _probe(path)
    except UnidentifiedImageError:
        return Problem(f"Image '{path}' cannot be read: it is not an image format PIL knows, or its header is damaged. Re-export it (e.g. as PNG) or remove it.")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return Problem(f"Image '{path}' cannot be read ({type(err).__name__}: {err}). Re-export it (e.g. as PNG) or remove it.")


def setting_problems(cfg: DataConfig) -> list[Problem]:
    """The caption settings that cannot work (the bucket settings are BucketPlan's); checked when a recipe loads, too."""
    problems = []
    for key in ("caption_dropout", "tag_dropout"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            problems.append(Problem(f"data.{key} is {value}; it is a probability, between 0 and 1 (e.g. 0.05). Fix data.{key}."))
    if cfg.keep_tokens < 0:
        problems.append(Problem(f"data.keep_tokens is {cfg.keep_tokens}; it counts the leading tags kept in place, so 0 or more. Fix data.keep_tokens."))
    if not cfg.tag_separator:
        problems.append(Problem("data.tag_separator is empty; set it to the text between tags (kohya's default is ',')."))
    return problems


def _balance_reg(items: list[Item]) -> tuple[list[Item], list[Problem]]:
    """kohya's DreamBooth balancing: regularisation samples are made to match the training samples.

    The first pass gives each reg image its configured repeats; further passes add one repeat at a time
    in image order, until reg samples reach the training samples. Reg images the first pass never
    reaches are surplus and unused.
    """
    target = sum(item.repeats for item in items if not item.is_reg)
    reg = [i for i, item in enumerate(items) if item.is_reg]
    if not reg:
        return items, []
    repeats = {i: 0 for i in reg}
    total, first_pass = 0, True
    while total < target:
        for i in reg:
            added = items[i].repeats if first_pass else 1
            repeats[i] += added
            total += added
            if total >= target:
                break
        first_pass = False
    balanced = [replace(item, repeats=repeats[i]) if item.is_reg else item for i, item in enumerate(items)]
    problems = []
    unused = [items[i].relative_path for i in reg if repeats[i] == 0]
    if unused and target:
        problems.append(Problem(
            f"{len(unused)} of {len(reg)} regularisation images are unused: reg samples are capped at the {target} "
            f"training samples per epoch (kohya's balancing)", fatal=False, files=tuple(unused)))
    return balanced, problems


def scan(cfg: DataConfig) -> ScanResult:
    plan = BucketPlan(cfg)
    problems = [Problem(message) for message in plan.problems]
    problems += [Problem(message, fatal=False) for message in plan.warnings]
    problems += setting_problems(cfg)
    subsets, subset_problems = resolve_subsets(cfg)
    problems += subset_problems

    sources: list[ImageSource] = []
    image_counts: dict[str, int] = {}
    for subset in subsets:
        found, found_problems = list_images(subset)
        sources += found
        problems += found_problems
        image_counts[subset.name] = len(found)

    # Decoding and hashing dominate start-up; PIL and hashlib release the GIL, so threads help.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probes = list(pool.map(lambda source: _probe_or_problem(source.path), sources))

    items: list[Item] = []
    for source, probe in zip(sources, probes):
        if isinstance(probe, Problem):
            problems.append(probe)
            continue
        size, content_hash = probe
        if not plan.usable:
            continue
        placement = plan.place(size)
        reason = plan.too_small(size, placement)
        if reason:
            problems.append(Problem(f"Image '{source.path}' {reason}"))
            continue
        items.append(Item(
            path=source.path, relative_path=source.relative, caption=source.caption,
            caption_source=source.caption_source, subset=source.subset.name, repeats=source.subset.repeats,
            is_reg=source.subset.is_reg, original_size=size, bucket=placement.bucket, resized=placement.resized,
            crop_ltrb=placement.crop_ltrb, ar_error=placement.ar_error, content_hash=content_hash,
        ))

    if subsets and sources and not any(not s.is_reg for s in subsets):
        problems.append(Problem("Every subset is a regularisation set (is_reg: true); add at least one subset of the images to learn."))
    items, reg_problems = _balance_reg(items)
    problems += reg_problems
    problems += mask_problems(cfg, items)
    if not any(p.fatal for p in problems) and not any(not item.is_reg for item in items):
        problems.append(Problem("No training images were found. Check data.dir / data.subsets and the image formats (.png, .jpg, .jpeg, .webp, .bmp)."))
    return ScanResult(subsets, items, problems, plan, image_counts)
