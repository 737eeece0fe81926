"""Recipe keys of ``method: hypernetwork`` (the ``hypernetwork:`` section), named as AUTOMATIC1111's training tab offers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
