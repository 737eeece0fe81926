"""``TrainingData``: the one caption/image loader every trainer shares.

Everything an epoch does is a pure function of (items, seed, epoch, batch size): which samples form
which batch, batch order, flips, and every caption's shuffle and dropout. A resumed run therefore
sees exactly the batches and captions the interrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.buckets import Size
from trainer.data.captions import process_caption, tag_frequency
from trainer.data.masks import load_mask, mask_key
from trainer.data.scan import Item, describe, scan
from trainer.data.seeding import seed_of, seeded_rng, stable_shuffle
from trainer.data.sources import Problem
from trainer.errors import UserError
from trainer.models.conditioning import ImageGeometry

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.recipe import DataConfig

# Part of every cache key: bump it when the pixel pipeline (resampling, compositing) changes, so latents
# cached by an older version are not reused for pixels it would no longer produce.
PIXEL_PIPELINE_VERSION = "p2"
_MAX_LISTED = 10
_loader: ThreadPoolExecutor | None = None


def _loader_pool() -> ThreadPoolExecutor:
    """Threads for decoding a batch's images side by side (PIL releases the GIL while decoding). They run no
    torch operations (see load_pixels)."""
    global _loader
    if _loader is None:
        _loader = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sdtrain-images")
    return _loader


def held_out(items: list[Item], fraction: float, seed: int) -> set[int]:
    """Indices of the training images validation.split holds out: round(fraction x images) of them (at
    least one, and at least one left to train on), chosen by a hash of (seed, content) so the choice
    depends neither on file order nor on names. Regularisation (class) images are never held out."""
    candidates = [index for index, item in enumerate(items) if not item.is_reg]
    if fraction <= 0 or not candidates:
        return set()
    if len(candidates) < 2:
        raise UserError(f"Recipe key 'validation.split' is {fraction}, but the data has a single training image: nothing would be left to train on. Use validation.dir instead.")
    count = min(max(1, round(fraction * len(candidates))), len(candidates) - 1)
    ranked = sorted(candidates, key=lambda index: (seed_of(seed, items[index].content_hash), items[index].relative_path))
    return set(ranked[:count])


def _user_error(fatal: list[Problem]) -> UserError:
    if len(fatal) == 1:
        return UserError(fatal[0].text())
    listed = "\n".join(f"- {problem.text()}" for problem in fatal[:_MAX_LISTED])
    more = f"\n- ... and {len(fatal) - _MAX_LISTED} more" if len(fatal) > _MAX_LISTED else ""
    return UserError(
        f"The data has {len(fatal)} problems that stop training:\n{listed}{more}\n"
        f"Run `sdtrain data inspect` on the recipe or data folder to list every problem at once."
    )


def _rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (black would leak dark fringes into training)."""
    if image.mode.startswith("I;16"):
        # 16-bit grey (PNG): PIL's convert clips every value above 255 to white; keep the high byte instead.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_pixels(item: Item, flipped: bool) -> torch.Tensor:
    """One image (a file or a dataset row: its encoded bytes) as a float32 [3, H, W] tensor in [-1, 1]:
    EXIF-rotated, RGB on white, scaled to cover its bucket, centre-cropped, mirrored if ``flipped``."""
    data = item.origin.read_bytes()
    if hashlib.sha256(data).hexdigest() != item.content_hash:
        # Its cache key still names the old bytes; carrying on would file new latents under it.
        raise UserError(
            f"{describe(item.origin)} changed on disk after training started. Restart (or resume) the run so the data "
            f"is scanned again; don't edit the dataset while a run is using it."
        )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = _rgb_on_white(ImageOps.exif_transpose(opened))
    except Exception as err:  # a dataset row's pixels are first decoded here (see scan._probe); PIL raises many types
        raise UserError(
            f"{describe(item.origin)} cannot be decoded ({type(err).__name__}: {err}). Re-export it (e.g. as PNG) or "
            f"remove it from the dataset, then start the run again."
        ) from None
    if image.size != item.resized:
        image = image.resize(item.resized, Image.Resampling.LANCZOS)
    image = image.crop(item.crop_ltrb)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    # Channels first in numpy, not torch: this runs in the loader threads, and a torch op there large enough
    # to go parallel starts an OpenMP thread team that lives as long as the thread; with more OpenMP threads
    # than cores libgomp stops spinning between parallel regions for the rest of the run (steps 25 % slower on
    # 2 cores; docs/benchmarks.md, "Threads that load images").
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def geometry_of(item: Item, flipped: bool) -> ImageGeometry:
    """Where ``load_pixels`` takes the image's pixels from, as SDXL's size and crop conditioning describes it:
    the crop's top-left corner in the resized image, mirrored with the image when it is flipped."""
    (ow, oh), (rw, _), (left, top, right, _) = item.original_size, item.resized, item.crop_ltrb
    bw, bh = item.bucket
    return ImageGeometry(original_size=(oh, ow), crop_top_left=(top, rw - right if flipped else left), target_size=(bh, bw))


class Batch:
    """Samples of one bucket, with their processed captions. Pixels load only when asked for, so a
    batch whose latents are all cached never touches the image files."""

    def __init__(self, items: list[Item], sample_indices: list[int], captions: list[str], flipped: list[bool],
                 loss_weights: torch.Tensor, cache_keys: list[str], size: Size,
                 mask_loader: Callable[[Item, bool], torch.Tensor] | None = None):
        self.items = items
        self.sample_indices = sample_indices
        self.captions = captions
        self.flipped = flipped
        self.loss_weights = loss_weights
        self.cache_keys = cache_keys
        self.size = size
        self.geometry = [geometry_of(item, flip) for item, flip in zip(items, flipped)]
        self._pixels: dict[int, torch.Tensor] = {}
        # data.masks: (item, flipped) -> its [1, H, W] loss mask on the bucket's pixels; None without masks.
        self.mask_loader = mask_loader

    @property
    def masked(self) -> bool:
        return self.mask_loader is not None

    def mask_values(self, positions: Sequence[int] | None = None) -> torch.Tensor:
        """float32 [B, 1, H, W] in [0, 1]: the loss masks of the batch's images (or ``positions``)."""
        positions = list(range(len(self.items)) if positions is None else positions)
        return torch.stack([self.mask_loader(self.items[position], self.flipped[position]) for position in positions])

    def __len__(self) -> int:
        return len(self.items)

    def pixel_values(self, positions: Sequence[int] | None = None) -> torch.Tensor:
        """float32 [B, 3, H, W] in [-1, 1]; ``positions`` picks rows (the latent cache loads only its misses)."""
        positions = list(range(len(self.items)) if positions is None else positions)
        todo = [position for position in dict.fromkeys(positions) if position not in self._pixels]
        loaded = _loader_pool().map(lambda position: load_pixels(self.items[position], self.flipped[position]), todo)
        self._pixels.update(zip(todo, loaded))
        return torch.stack([self._pixels[position] for position in positions])


class TrainingData:
    """The images, captions and buckets of a recipe's ``data`` section, scanned and checked up front.

    Raises ``UserError`` listing every problem that stops training (missing or empty folders, corrupt or
    too-small images, non-UTF-8 captions, bad settings); non-fatal findings are in ``warnings``.
    A *sample* is one item repeated: item i appears ``items[i].repeats`` times per epoch (kohya).

    For the kohya ``ss_*`` metadata: ``num_train_images`` / ``num_reg_images`` (counted with repeats,
    as kohya does), ``tag_frequency``, ``dataset_dirs`` (train folders) and ``reg_dataset_dirs``,
    ``bucket_info``, ``batches_per_epoch``. ``fingerprint`` changes whenever the data or the caption
    settings do, so a resume can refuse to continue on different data.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, batch_size: int, reg_loss_weight: float = 1.0, validation_split: float = 0.0, validation_seed: int = 0):
        if batch_size < 1:
            raise UserError(f"train.batch_size is {batch_size}; it must be at least 1.")
        result = scan(cfg)
        if result.fatal:
            raise _user_error(result.fatal)
        self.cfg = cfg
        self.seed = seed
        self.batch_size = batch_size
        self.reg_loss_weight = reg_loss_weight
        self.validation_split, self.validation_seed = validation_split, validation_seed
        self.subsets = result.subsets
        self.bucket_plan = result.plan  # the effective bucket settings (min/max side rounded to the step)
        held = held_out(result.items, validation_split, validation_seed)
        # The images validation.split keeps out of training (trainer.validation scores them).
        self.validation_items: list[Item] = [item for index, item in enumerate(result.items) if index in held]
        self.items: list[Item] = [item for index, item in enumerate(result.items) if index not in held]
        self.warnings: list[str] = [problem.text() for problem in result.problems]

        self._sample_item = [index for index, item in enumerate(self.items) for _ in range(item.repeats)]
        # What each item's loss mask adds to its cache key (a mask file's hash): read once, not every batch.
        self._mask_keys = [mask_key(cfg, item) for item in self.items]
        self._bucket_samples: dict[Size, list[int]] = {}
        for sample, index in enumerate(self._sample_item):
            self._bucket_samples.setdefault(self.items[index].bucket, []).append(sample)
        self._bucket_samples = dict(sorted(self._bucket_samples.items()))
        self.batches_per_epoch = sum(-(-len(samples) // batch_size) for samples in self._bucket_samples.values())

        configured = {subset.name: subset.repeats for subset in self.subsets}
        # kohya's ss_num_train_images / ss_num_reg_images count repeats (reg: as configured, before balancing).
        self.num_train_images = sum(item.repeats for item in self.items if not item.is_reg)
        self.num_reg_images = sum(configured[item.subset] for item in self.items if item.is_reg)
        self.tag_frequency = {
            subset.name: tag_frequency((item.caption for item in self.items if item.subset == subset.name), cfg.tag_separator)
            for subset in self.subsets
        }
        self.dataset_dirs = self._dirs(is_reg=False)
        self.reg_dataset_dirs = self._dirs(is_reg=True)
        self.bucket_info = self._bucket_info(result.plan.resolutions)
        self.fingerprint = self._fingerprint()

    def with_subsets(self, extra: list) -> TrainingData:
        """The same data settings with more subsets (e.g. DreamBooth's class images), scanned anew."""
        return TrainingData(
            replace(self.cfg, subsets=[*self.cfg.subsets, *extra]), seed=self.seed, batch_size=self.batch_size,
            reg_loss_weight=self.reg_loss_weight, validation_split=self.validation_split, validation_seed=self.validation_seed,
        )

    @property
    def num_samples(self) -> int:
        return len(self._sample_item)

    def _dirs(self, is_reg: bool) -> dict[str, dict[str, int]]:
        return {
            subset.name: {"n_repeats": subset.repeats, "img_count": sum(1 for item in self.items if item.subset == subset.name)}
            for subset in self.subsets if subset.is_reg == is_reg
        }

    def _bucket_info(self, predefined: list[Size]) -> dict:
        """kohya's bucket_info: indices into the bucket list (the used sizes when there is no predefined
        list), sample counts with repeats, and the mean |aspect-ratio error| over the images in use."""
        resolutions = predefined or sorted(self._bucket_samples)
        buckets = {
            index: {"resolution": list(reso), "count": len(self._bucket_samples[reso])}
            for index, reso in enumerate(resolutions) if reso in self._bucket_samples
        }
        used = [abs(item.ar_error) for item in self.items if item.repeats > 0]
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(used)) if used else 0.0}

    def _fingerprint(self) -> str:
        """What a resume must find unchanged. Paths are relative to their subset folder, so moving the
        dataset folder does not count as a change, but editing an image or a caption does."""
        cfg = self.cfg
        payload = {
            "pipeline": PIXEL_PIPELINE_VERSION,
            "items": [
                [item.subset, item.relative_path, item.content_hash, item.caption, item.repeats, item.is_reg,
                 list(item.bucket), list(item.resized), list(item.crop_ltrb)]
                for item in self.items
            ],
            "captions": [cfg.trigger_word, cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_separator, cfg.caption_dropout, cfg.tag_dropout],
            "flip": cfg.flip,
            "masks": self._mask_keys if cfg.masks != "none" else [],
        }
        return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """kohya's bucket batching: each bucket's samples shuffled and cut into batches (the last may be
        short), then the order of all batches shuffled, all from (seed, epoch)."""
        rng = seeded_rng(self.seed, epoch, "batches")
        batches: list[list[int]] = []
        for samples in self._bucket_samples.values():
            order = list(samples)
            stable_shuffle(order, rng)
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        stable_shuffle(batches, rng)
        return batches

    def load_batch(self, sample_indices: list[int], epoch: int) -> Batch:
        indices = [self._sample_item[sample] for sample in sample_indices]
        items = [self.items[index] for index in indices]
        sizes = {item.bucket for item in items}
        if len(sizes) != 1:
            raise ValueError(f"load_batch needs samples of one bucket (use epoch_batches); got buckets {sorted(sizes)}")
        captions, flipped, keys = [], [], []
        for sample, index, item in zip(sample_indices, indices, items):
            # Separate streams per purpose, so turning on e.g. tag shuffling does not change the flips.
            flip = self.cfg.flip and seeded_rng(self.seed, epoch, sample, "flip").random() < 0.5
            captions.append(process_caption(item.caption, self.cfg, seeded_rng(self.seed, epoch, sample, "caption"), item.is_reg))
            flipped.append(flip)
            keys.append(self.cache_key(item, flip) + self._mask_keys[index])
        weights = torch.tensor([self.reg_loss_weight if item.is_reg else 1.0 for item in items], dtype=torch.float32)
        masks = partial(load_mask, self.cfg) if self.cfg.masks != "none" else None
        return Batch(items, list(sample_indices), captions, flipped, weights, keys, sizes.pop(), masks)

    def counted_samples(self, sample_indices: Sequence[int]) -> int:
        """How many samples of a batch its mean loss divides by: those of weight > 0, at least 1.

        kohya divides by the batch size; leaving out samples of weight 0 makes DreamBooth's
        prior_loss_weight=0 exactly "no class data" (the instance samples' mean alone), while any other
        weight scales the class samples' loss by itself, in mixed and class-only batches alike.
        """
        counted = sum(1 for sample in sample_indices if not self.items[self._sample_item[sample]].is_reg or self.reg_loss_weight > 0)
        return max(counted, 1)

    @staticmethod
    def cache_key(item: Item, flipped: bool) -> str:
        """Everything that decides the pixels: the file bytes, the resize and crop, the flip, the pipeline."""
        (bw, bh), (rw, rh) = item.bucket, item.resized
        crop = ".".join(str(v) for v in item.crop_ltrb)
        return f"{PIXEL_PIPELINE_VERSION}-{item.content_hash}-{bw}x{bh}-r{rw}x{rh}-c{crop}-{'flip' if flipped else 'noflip'}"
