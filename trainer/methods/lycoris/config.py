"""Recipe keys of ``method: lycoris`` (the ``lycoris:`` section). docs/lycoris.md explains each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.checks import broken, one_of, text_encoder_lr_rule


# The values of lycoris.algo and lycoris.preset (method.py builds the adapters and holds each preset's layers).
LOW_RANK_ALGOS = ("locon", "loha", "lokr", "dora")
ALGOS = (*LOW_RANK_ALGOS, "ia3", "full")
PRESET_NAMES = ("attn-only", "attn-mlp", "full")


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


def problems(cfg: LycorisConfig) -> list[str]:
    """The ``lycoris:`` values that cannot train, each with its fix (see trainer/checks.py)."""
    low_rank = cfg.algo in LOW_RANK_ALGOS
    rules = [
        ("algo", cfg.algo in ALGOS, one_of(cfg.algo, ALGOS)),
        ("preset", cfg.preset in PRESET_NAMES, one_of(cfg.preset, PRESET_NAMES)),
        ("rank", not low_rank or cfg.rank >= 1, f"algo {cfg.algo} needs a rank of at least 1."),
        ("conv_rank", cfg.conv_rank is None or cfg.conv_rank >= 0, "use a rank >= 1, 0 to leave 3x3 convolutions out, or null for lycoris.rank."),
        ("factor", cfg.factor == -1 or cfg.factor >= 1, "use -1 (as square as possible) or a factor >= 1."),
        ("use_tucker", low_rank or not cfg.use_tucker, f"algo {cfg.algo} has no rank to factor, so set it to false."),
        text_encoder_lr_rule(cfg.text_encoder_lr),
    ]
    for key in ("alpha", "conv_alpha"):
        alpha = getattr(cfg, key)
        # LyCORIS silently reads 0 as alpha = rank; a scale of 0 would train nothing.
        rules.append((key, not low_rank or alpha is None or alpha > 0, "use a positive alpha (alpha = rank means no scaling)."))
    for key in ("dropout", "rank_dropout"):
        probability = getattr(cfg, key)
        if not 0.0 <= probability < 1.0:
            rules.append((key, False, "use a probability in [0, 1)."))
        else:
            rules.append((key, low_rank or not probability, f"algo {cfg.algo} has no low-rank branch to drop, so set it to 0."))
    return broken("lycoris", cfg, rules)
