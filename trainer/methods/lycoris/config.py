"""Recipe keys of ``method: lycoris`` (the ``lycoris:`` section). docs/lycoris.md explains each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LycorisConfig:
    # locon, loha, lokr, dora, ia3 or full.
    algo: str = "locon"
    # Which layers: attn-only, attn-mlp (the transformer blocks) or full (every Linear/Conv2d, resnets included).
    preset: str = "attn-mlp"
    # Rank and alpha of Linear and 1x1-convolution layers; scale = alpha / rank.
    rank: int = 8
    alpha: float = 4.0
    # Rank and alpha of 3x3 convolutions (null = rank / alpha; conv_rank 0 leaves them out).
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    # LoKr: split each dimension into two factors, the smaller at most this (-1 = as square as possible).
    factor: int = -1
    # LoKr: also make the small Kronecker factor low-rank.
    decompose_both: bool = False
    # LoCon, LoHa, LoKr, DoRA: a Tucker core for 3x3 convolutions (kernel kept apart from the rank).
    use_tucker: bool = False
    # Dropout of the adapter's output (low-rank algos only).
    dropout: float = 0.0
    # Drop whole ranks (LoCon/DoRA) or rows of the weight change (LoHa/LoKr) with this probability.
    rank_dropout: float = 0.0
    # Also train the text encoder's attention (and for attn-mlp/full its MLP) layers.
    text_encoder: bool = False
    # Learning rate of the text-encoder adapters (default: train.lr).
    text_encoder_lr: Optional[float] = None
