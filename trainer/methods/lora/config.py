"""Recipe keys of ``method: lora`` (the ``lora:`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoraConfig:
    rank: int = 8
    # Scale = alpha / rank; alpha = rank means no scaling (kohya's convention).
    alpha: float = 8.0
    dropout: float = 0.0
    # Also the transformer blocks' feed-forward layers and proj_in/proj_out (kohya's default set).
    feed_forward: bool = False
    # > 0 adds LoCon: LoRA on the UNet's ResNet and up/down-sampler convolutions with this rank.
    conv_rank: int = 0
    conv_alpha: float = 1.0
    # Also train LoRA on the text encoder's attention and MLP layers.
    text_encoder: bool = False
    # Learning rate of the text-encoder LoRA (default: train.lr).
    text_encoder_lr: Optional[float] = None
