"""Recipe keys of ``method: hypernetwork`` (the ``hypernetwork:`` section), named as AUTOMATIC1111's training tab offers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from trainer.checks import broken, one_of

if TYPE_CHECKING:
    from trainer.methods.hypernetwork.module import Structure


@dataclass
class HypernetworkConfig:
    # Widths of the MLP's layers as multiples of the context width; starts and ends with 1.
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    # linear, relu, leakyrelu, elu, swish (= Hardswish), tanh, sigmoid, softsign, mish (what ComfyUI
    # also reads), or gelu, silu, selu, ... (AUTOMATIC1111 only).
    activation: str = "linear"
    # A LayerNorm after every Linear.
    layer_norm: bool = False
    # The activation after the last Linear too.
    activate_output: bool = False
    # Dropout probability after each layer (training only), one per layer_structure entry, first and
    # last 0, e.g. [0, 0.3, 0]; null = none.
    dropout_structure: Optional[list[float]] = None
    # Normal, XavierUniform, XavierNormal, KaimingUniform or KaimingNormal.
    weight_init: str = "Normal"
    # Strength of the samples drawn during training (AUTOMATIC1111's <hypernet:name:strength>).
    sample_strength: float = 1.0


def structure(cfg: HypernetworkConfig) -> Structure:
    """The layer flags these keys give every module; a ValueError names the key that does not fit."""
    # The structure rules are also those of every hypernetwork file read, so they live with the module.
    from trainer.methods.hypernetwork.module import Structure

    return Structure(
        layer_structure=tuple(cfg.layer_structure),
        activation=cfg.activation,
        layer_norm=cfg.layer_norm,
        activate_output=cfg.activate_output,
        dropout_structure=tuple(cfg.dropout_structure) if cfg.dropout_structure is not None else None,
    )


def problems(cfg: HypernetworkConfig) -> list[str]:
    """The ``hypernetwork:`` values that cannot train, each with its fix (see trainer/checks.py)."""
    from trainer.methods.hypernetwork.module import WEIGHT_INITS

    found = broken("hypernetwork", cfg, [("weight_init", cfg.weight_init in WEIGHT_INITS, one_of(cfg.weight_init, WEIGHT_INITS))])
    try:
        structure(cfg)
    except ValueError as err:
        # Structure's messages read "<key> is <value>; <fix>".
        key, _, rest = str(err).partition(" is ")
        found.append(f"Recipe key 'hypernetwork.{key}' is {rest}")
    return found
