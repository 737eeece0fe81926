"""Recipe keys of ``method: lora`` (the ``lora:`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.checks import broken, text_encoder_lr_rule


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


def problems(cfg: LoraConfig) -> list[str]:
    """The ``lora:`` values that cannot train, each with its fix (see trainer/checks.py)."""
    return broken("lora", cfg, [
        ("rank", cfg.rank >= 1, "it must be at least 1 (8 to 32 is usual)."),
        # peft takes alpha 0, but a scale of 0 trains nothing.
        ("alpha", cfg.alpha > 0, "use a positive alpha (alpha = rank means no scaling)."),
        ("dropout", 0.0 <= cfg.dropout < 1.0, "use a probability in [0, 1) (0 = off)."),
        ("conv_rank", cfg.conv_rank >= 0, "use 0 (no convolution adapters) or a rank of at least 1."),
        ("conv_alpha", cfg.conv_rank <= 0 or cfg.conv_alpha > 0, "use a positive alpha (alpha = conv_rank means no scaling)."),
        text_encoder_lr_rule(cfg.text_encoder_lr),
    ])
