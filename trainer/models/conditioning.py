"""What a denoiser is conditioned on besides the noisy latents: the encoded prompt, and for some
families the geometry of each training image.

``TextConditioning`` is per caption and does not depend on the image, so it can be cached by caption
(``data.cache_text_encoder_outputs``). ``ImageGeometry`` is recorded by the data loader for every
image whatever the family; families that condition on it (SDXL's size and crop embedding) read it,
the others ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    """The text encoders' output for a batch of captions.

    ``hidden_states`` [B, L, D] is the context of cross-attention (for several encoders, their chosen
    layers concatenated along D); ``pooled`` [B, P] is the pooled, projected prompt vector of families
    that use one (SDXL), else None.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Caption ``index``'s tensors by name, for caching."""
        row = {"hidden_states": self.hidden_states[index]}
        if self.pooled is not None:
            row["pooled"] = self.pooled[index]
        return row

    @classmethod
    def stack(cls, rows: list[dict[str, torch.Tensor]]) -> TextConditioning:
        pooled = [row["pooled"] for row in rows if "pooled" in row]
        return cls(
            hidden_states=torch.stack([row["hidden_states"] for row in rows]),
            pooled=torch.stack(pooled) if pooled else None,
        )

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> TextConditioning:
        return TextConditioning(
            self.hidden_states.to(device, dtype),
            None if self.pooled is None else self.pooled.to(device, dtype),
        )


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image's pixels came from, in the coordinates of the SDXL paper and diffusers.

    ``original_size`` is the image as the user sees it (after EXIF rotation), ``crop_top_left`` the
    top-left corner of the kept window in the resized (and, when flipped, mirrored) image, and
    ``target_size`` the size trained at (the bucket). All are (height, width) / (top, left) pairs.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def square(cls, size: int) -> ImageGeometry:
        """The geometry of a generated image: nothing cropped, drawn at its own size."""
        return cls((size, size), (0, 0), (size, size))
