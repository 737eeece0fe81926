"""Float tolerances for the tests, argued from the computation instead of tuned on one machine.

Two computations of the same quantity (a batch of 4 against a batch of 2, a merged weight against an
adapter's forward pass, diffusers' pipeline against the training code) differ in the last bits: oneDNN
and MKL choose kernels, blockings and summation orders by batch size, thread count and CPU. How far
they may drift apart follows from the computation:

- one floating-point operation rounds its result with a relative error of at most ``unit``, the
  dtype's unit roundoff;
- a result reached through ``depth`` operations chained one after another, each summing at most
  ``terms`` products, went through at most depth * terms such roundings;
- rounding errors behave like independent random variables of mean zero, so they add up like a random
  walk (Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
  Comput. 41(5), 2019): SPREAD * sqrt(depth * terms) * unit relative to the magnitudes involved. A
  rounding error spread evenly over [-unit, unit] has the standard deviation unit / sqrt(3), so SPREAD = 4
  is 7 standard deviations of the sum, exceeded with a probability of about 1e-11. The worst case, every
  rounding in the same direction, depth * terms * unit, is what no real data approaches;
- both computations carry such an error: a factor 2.

So ``||actual - expected|| <= safety * 2 * SPREAD * sqrt(depth * terms) * unit * scale``, ``scale``
being the magnitude of what is compared (its norm, or the norms of both terms of a difference that
cancels), and ``safety`` whatever the model leaves out, argued where the bound is used. Each use also
states what a wrong result gives, which must lie far above the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FP64 = 2.0**-53  # unit roundoff: half the distance from 1 to the next float64
FP32 = 2.0**-24  # ... to the next float32
SPREAD = 4.0  # random-walk widths of unit * sqrt(roundings): 7 standard deviations (module docstring)

# Layers that sum products (their inner dimension is a sum's length) or normalise (a reduction each).
LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Rounding:
    """How far rounding alone may move a result, relative to its magnitude (see the module docstring)."""

    unit: float  # FP64 or FP32: the dtype the computation runs in (fp16's would be 2**-11)
    terms: int  # the longest sum one operation accumulates (a matmul's inner dimension, a reduction's length)
    depth: int  # operations chained between the inputs and the result
    safety: float = 1.0  # what the model leaves out; 1 when nothing is

    @property
    def bound(self) -> float:
        return self.safety * 2 * SPREAD * math.sqrt(self.depth * self.terms) * self.unit

    def __str__(self) -> str:
        return (
            f"{self.bound:.3g} = {self.safety:g} (safety) x 2 (computations) x {SPREAD:g} (spread) "
            f"x sqrt({self.depth} (depth) x {self.terms} (terms)) x {self.unit:.3g} (unit)"
        )


def layer_rounding(*modules: nn.Module, unit: float = FP32, passes: int = 1, sums: int = 1, safety: float = 1.0) -> Rounding:
    """The rounding of ``passes`` runs through ``modules`` (1: forward; 2: forward and backward).

    depth counts every linear, convolution and norm layer, parallel ones (q, k, v) included, which bounds
    the longest chain from above and also covers the weight-free operations between layers (an
    attention's scores, softmax and weighted sum ride on its three parallel projections; activations,
    residual sums and scalings are single roundings next to a layer's sum). terms is the largest inner
    dimension among them, or ``sums`` (a weight gradient's sum over batch and positions) where longer.
    """
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, LAYER_TYPES)]
    inner = [layer.in_features if isinstance(layer, nn.Linear) else layer.weight[0].numel() for layer in layers if isinstance(layer, (nn.Linear, nn.Conv2d))]
    return Rounding(unit=unit, terms=max([sums, *inner]), depth=passes * len(layers), safety=safety)


def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values.detach()).to(torch.float64)


def relative_error(actual, expected, scale: float | None = None) -> float:
    """||actual - expected|| / scale over all entries (2-norm, in float64), scale defaulting to ||expected||."""
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} and {tuple(expected.shape)}"
    difference = float((actual - expected).norm())
    if difference == 0:
        return 0.0  # an exact match, whatever the magnitude (zero included)
    scale = float(expected.norm()) if scale is None else scale
    return difference / scale if scale > 0 else math.inf


def assert_close_in_norm(actual, expected, rounding: Rounding, *, scale: float | None = None, what: str = "") -> None:
    """||actual - expected|| <= rounding.bound * scale, 2-norms over all entries; scale defaults to ||expected||."""
    measured = relative_error(actual, expected, scale)
    assert measured <= rounding.bound, (
        f"{what or 'values'}: ||actual - expected|| / {'||expected||' if scale is None else f'scale {scale:.3g}'} = {measured:.3g} "
        f"exceeds the rounding bound {rounding}"
    )


def assert_close_elementwise(actual, expected, rounding: Rounding, *, scale=None, what: str = "") -> None:
    """|actual - expected| <= rounding.bound * scale entry by entry; scale (a number or a tensor of the
    magnitudes each entry was computed from) defaults to |expected|."""
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} and {tuple(expected.shape)}"
    scale = expected.abs() if scale is None else _as_float64(scale).expand_as(expected)
    difference = (actual - expected).abs()
    ratio = torch.where(difference == 0, 0.0, difference / scale)  # an exact match needs no magnitude
    worst = int(ratio.flatten().argmax())
    index = tuple(int(i) for i in np.unravel_index(worst, tuple(ratio.shape)))
    assert ratio.flatten()[worst] <= rounding.bound, (
        f"{what or 'values'}: at {index} |actual - expected| = {float(difference.flatten()[worst]):.3g}, "
        f"{float(ratio.flatten()[worst]):.3g} times the magnitude {float(scale.flatten()[worst]):.3g}, exceeds the rounding bound {rounding}"
    )
