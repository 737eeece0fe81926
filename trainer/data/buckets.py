"""Aspect-ratio bucketing, kohya's rules (``make_bucket_resolutions`` / ``BucketManager``).

Images of different shapes are trained at different sizes of about the same area, so a portrait is
not squashed or cropped to a square. Every image gets one bucket (w, h); it is scaled to *cover* the
bucket and centre-cropped, so a batch (one bucket) stacks into one tensor.

* bucketing on: ``max_area = resolution**2``; the buckets are the square ``floor(sqrt(area)/step)*step``
  plus, for each width from min_side to max_side in steps, ``height = min(max_side,
  floor(area/width/step)*step)`` and the transposed pair. An image takes the bucket with the least
  |aspect-ratio error| (its own size if that is a bucket).
* ``no_upscale``: no list. The image is shrunk (never enlarged) to at most ``max_area`` keeping its
  aspect ratio, and each side is floored to the step: crop a little, never pad, never upscale.
* bucketing off: one square bucket of ``resolution``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.recipe import DataConfig


Size = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    """Where one image goes: the bucket, the size it is resized to, and the centre crop inside that."""

    bucket: Size
    resized: Size
    crop_ltrb: tuple[int, int, int, int]
    # Bucket aspect ratio minus image aspect ratio (kohya's sign); bucket_info reports the mean |error|.
    ar_error: float


def bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """kohya's predefined bucket list, sorted. Pairs with a side below ``min_side`` are left out
    (kohya would make a zero-height bucket when the resolution is small next to max_side)."""
    max_area = resolution * resolution
    square = int(math.sqrt(max_area) // step) * step
    resos = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width // step) * step)
        if height >= min_side:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _cover(image: Size, bucket: Size) -> tuple[Size, tuple[int, int, int, int]]:
    """Scale the image so it covers the bucket, then centre-crop (kohya rounds the scaled size half up)."""
    (w, h), (bw, bh) = image, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


class BucketPlan:
    """The bucket rules of one DataConfig, checked. ``problems`` (recipe mistakes) make it unusable.

    ``data.resolution`` unset (null) is left to the model family, which fills it in before training
    reads the data; until then only the settings that do not depend on it are checked.
    """

    def __init__(self, cfg: DataConfig):
        buckets = cfg.buckets
        self.enabled = buckets.enabled
        self.no_upscale = buckets.enabled and buckets.no_upscale
        self.resolution = cfg.resolution
        self.step = buckets.step
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.resolutions: list[Size] = []
        self.min_side = cfg.resolution

        step_ok = not self.enabled or (self.step > 0 and self.step % 8 == 0)
        if not step_ok:
            self.problems.append(
                f"data.buckets.step is {self.step}; it must be a positive multiple of 8 (64 is kohya's default, 32 "
                f"gives more buckets). Fix data.buckets.step."
            )
        if cfg.resolution is None:
            return
        if cfg.resolution <= 0 or cfg.resolution % 8:
            self.problems.append(
                f"data.resolution is {cfg.resolution}; it must be a positive multiple of 8 (latents are 1/8 of the "
                f"image size). Use e.g. 512 for SD1, 768 for SD2-768, 1024 for SDXL."
            )
        if not self.enabled or not step_ok:
            return
        # Unset sides follow the resolution as kohya's defaults do at 512 (256..1024): half and double.
        min_side = buckets.min_side if buckets.min_side is not None else cfg.resolution // 2
        max_side = buckets.max_side if buckets.max_side is not None else cfg.resolution * 2
        # Like kohya, the range is widened to whole steps; a min_side under one step simply means "one step".
        self.min_side = max(self.step, min_side // self.step * self.step)
        self.max_side = -(-max_side // self.step) * self.step
        if buckets.min_side is not None and min_side >= self.step and self.min_side != min_side:
            self.warnings.append(f"data.buckets.min_side {min_side} is used as {self.min_side}, a multiple of data.buckets.step ({self.step}).")
        if buckets.max_side is not None and self.max_side != max_side:
            self.warnings.append(f"data.buckets.max_side {max_side} is used as {self.max_side}, a multiple of data.buckets.step ({self.step}).")
        if self.min_side > cfg.resolution:
            self.problems.append(
                f"data.buckets.min_side ({min_side}) is larger than data.resolution ({cfg.resolution}), so no "
                f"bucket fits. Lower data.buckets.min_side (kohya's default is 256) or raise data.resolution."
            )
        if not self.no_upscale and self.max_side < cfg.resolution:
            self.problems.append(
                f"data.buckets.max_side ({max_side}) is smaller than data.resolution ({cfg.resolution}). Raise "
                f"data.buckets.max_side to at least {cfg.resolution} (kohya's default is 1024; 2048 for SDXL)."
            )
        if not self.no_upscale and not self.problems:
            self.resolutions = bucket_resolutions(cfg.resolution, self.min_side, self.max_side, self.step)

    @property
    def usable(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if not self.enabled:
            return f"one {self.resolution}x{self.resolution} bucket (bucketing off)"
        kind = "no_upscale" if self.no_upscale else f"{len(self.resolutions)} buckets"
        return f"{kind}, sides {self.min_side}-{self.max_side} in steps of {self.step}, area <= {self.resolution}x{self.resolution}"

    def place(self, size: Size) -> Placement:
        w, h = size
        aspect = w / h
        if not self.enabled:
            bucket: Size = (self.resolution, self.resolution)
        elif self.no_upscale:
            max_area = self.resolution * self.resolution
            shrink = min(1.0, math.sqrt(max_area / (w * h)))
            # The epsilon keeps 511.9999... (float error) from flooring a whole step down.
            bucket = (int(w * shrink / self.step + 1e-9) * self.step, int(h * shrink / self.step + 1e-9) * self.step)
        elif size in self.resolutions:
            bucket = size
        else:
            bucket = min(self.resolutions, key=lambda reso: abs(reso[0] / reso[1] - aspect))
        if min(bucket) <= 0:
            return Placement(bucket, size, (0, 0, 0, 0), 0.0)
        resized, crop = _cover(size, bucket)
        return Placement(bucket, resized, crop, bucket[0] / bucket[1] - aspect)

    def too_small(self, size: Size, placement: Placement) -> str | None:
        """Why an image cannot be trained at its bucket without a silly upscale; None when it is fine.

        With bucketing the image's shorter side must reach the smallest bucket side (min_side); with
        no_upscale its bucket may not fall under min_side; without bucketing it must cover the one bucket.
        """
        w, h = size
        if not self.enabled:
            if min(w, h) < self.resolution:
                return (
                    f"is {w}x{h}, smaller than the single {self.resolution}x{self.resolution} bucket (bucketing is off). "
                    f"Lower data.resolution, turn data.buckets.enabled on, or remove the image."
                )
            return None
        if self.no_upscale:
            if min(placement.bucket) < self.min_side:
                return (
                    f"is {w}x{h}; without upscaling its bucket would be {placement.bucket[0]}x{placement.bucket[1]}, below "
                    f"the minimum bucket side of {self.min_side} px. Lower data.buckets.min_side or data.resolution, "
                    f"or remove the image."
                )
            return None
        if min(w, h) < self.min_side:
            return (
                f"is {w}x{h}, smaller than the smallest bucket side of {self.min_side} px. Lower data.buckets.min_side "
                f"or data.resolution, or remove the image."
            )
        return None
