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
from trainer.data.sources import ImageSource, Problem, Subset, list_images, resolve_subsets

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.data.hf_datasets import DatasetRow
    from trainer.recipe import DataConfig

SOURCES = ("folder", "datasets")  # data.source
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Item:
    """One image as training uses it. ``caption`` is the raw text, before trigger word/shuffle/dropout."""

    origin: Path | DatasetRow  # where the image's bytes are: a file, or a row of a Hugging Face dataset
    relative_path: str  # inside its subset folder; "row 12" for a dataset row
    caption: str
    caption_source: str  # "file", "metadata", "dataset", "folder words", "subset caption" or "none"
    subset: str
    # Samples per epoch. For reg images this is after kohya's balancing (0 = surplus, unused).
    repeats: int
    is_reg: bool
    original_size: Size  # (w, h) as displayed, i.e. after the EXIF rotation
    bucket: Size
    resized: Size  # scaled to cover the bucket ...
    crop_ltrb: tuple[int, int, int, int]  # ... then this box of it is kept
    ar_error: float
    content_hash: str  # sha256 of the encoded image bytes (the file, or the dataset row's)


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


def describe(origin: Path | DatasetRow) -> str:
    """An image's origin for messages: "Image 'a/01.png'" or "Image in row 3 of dataset 'frogs.parquet'"."""
    return f"Image '{origin}'" if isinstance(origin, Path) else f"Image in {origin}"


def _probe(origin: Path | DatasetRow) -> tuple[Size, str]:
    """Size and sha256 of an image.

    A file is decoded fully: a truncated file only fails on decode, and it is better to learn that now
    than hours into training. A dataset row (there may be many thousands) is only opened: its size and
    EXIF come from the header, and PNG chunks are checked against their CRCs without inflating them;
    a pixel stream broken inside is reported when the row is first loaded.
    """
    data = origin.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if isinstance(origin, Path):
            image.load()
            exif = image.getexif()
        else:
            # The base class's getexif reads the header's EXIF; PNG's own would decode the pixels to look
            # for an eXIf chunk after them (which the PNG spec asks writers not to do).
            exif = Image.Image.getexif(image)
            image.verify()
        w, h = image.size
        # Orientations 5-8 rotate by 90 degrees: the picture the user sees is h x w.
        if exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return (w, h), hashlib.sha256(data).hexdigest()


def _probe_or_problem(origin: Path | DatasetRow) -> tuple[Size, str] | Problem:
    try:
        return _probe(origin)
    except UnidentifiedImageError:
        return Problem(f"{describe(origin)} cannot be read: it is not an image format PIL knows, or its header is damaged. Re-export it (e.g. as PNG) or remove it.")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return Problem(f"{describe(origin)} cannot be read ({type(err).__name__}: {err}). Re-export it (e.g. as PNG) or remove it.")


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
    return problems + _source_problems(cfg)


def _source_problems(cfg: DataConfig) -> list[Problem]:
    """data.source and the keys that go with it."""
    if cfg.source not in SOURCES:
        return [Problem(f"data.source is '{cfg.source}'; use 'folder' (data.dir / data.subsets) or 'datasets' (a Hugging Face dataset in data.dataset).")]
    problems = []
    if cfg.repeats < 1:
        problems.append(Problem(f"data.repeats is {cfg.repeats}; it must be at least 1."))
    if cfg.source == "folder":
        if cfg.dataset is not None:
            problems.append(Problem("data.dataset is set, but data.source is 'folder'. Set data.source: datasets to train on the dataset, or remove data.dataset."))
        if cfg.repeats != 1:
            problems.append(Problem("data.repeats is for data.source: datasets; a folder's repeats come from its name ('10_sls frog') or data.subsets[].repeats. Remove data.repeats."))
        return problems
    if not cfg.dataset:
        problems.append(Problem("data.source is 'datasets' but data.dataset is not set. Set it to a save_to_disk folder, parquet/arrow files, an imagefolder folder or a hub id in the local cache."))
    if cfg.dir:
        problems.append(Problem("data.dir is a folder source, but data.source is 'datasets'. Remove data.dir (list extra folders, e.g. regularisation images, under data.subsets)."))
    if not cfg.image_column:
        problems.append(Problem("data.image_column is empty; set it to the dataset's image column (default 'image')."))
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
    # Imported here: the mask code imports torch, and checking a recipe (setting_problems) must not (trainer.cli).
    from trainer.data.masks import mask_problems

    plan = BucketPlan(cfg)
    problems = [Problem(message) for message in plan.problems]
    problems += [Problem(message, fatal=False) for message in plan.warnings]
    problems += setting_problems(cfg)
    sources: list[ImageSource] = []
    image_counts: dict[str, int] = {}
    subsets: list[Subset] = []
    if cfg.source == "datasets" and cfg.dataset:
        # Imported here: pyarrow costs every other run 29 MiB and 0.2 s of its start (docs/benchmarks.md, "The tiny model, side by side").
        from trainer.data.hf_datasets import dataset_sources

        subsets, sources, dataset_problems = dataset_sources(cfg)
        problems += dataset_problems
        image_counts.update({subset.name: len(sources) for subset in subsets})
    folder_subsets: list[Subset] = []
    if cfg.source != "datasets" or cfg.subsets:  # a dataset may come with folders (e.g. regularisation images)
        folder_subsets, subset_problems = resolve_subsets(cfg)
        problems += subset_problems
    subsets += folder_subsets
    for subset in folder_subsets:
        found, found_problems = list_images(subset)
        sources += found
        problems += found_problems
        image_counts[subset.name] = len(found)

    # Decoding and hashing dominate start-up; PIL and hashlib release the GIL, so threads help.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probes = list(pool.map(lambda source: _probe_or_problem(source.origin), sources))

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
            problems.append(Problem(f"{describe(source.origin)} {reason}"))
            continue
        items.append(Item(
            origin=source.origin, relative_path=source.relative, caption=source.caption,
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
        problems.append(Problem("No training images were found. Check data.dir / data.subsets (or data.dataset) and the image formats (.png, .jpg, .jpeg, .webp, .bmp)."))
    return ScanResult(subsets, items, problems, plan, image_counts)
