"""Convolutions with few output positions run as one matrix product on the CPU (docs/benchmarks.md).

At training sizes on a CPU the UNet's deepest blocks convolve 2x2 to 8x8 latents with weights of up
to 2560x1280x3x3 (118 MB in fp32). Such a convolution is bound by reading its weight, and torch's CPU
kernels read it slowly there: oneDNN gets the weight in torch's plain layout on every call (and
seemingly converts it each time), the fallback multiplies the weight by a matrix of only a few
columns. Written as unfold + ``linear`` (the output positions as rows, the weight as a transposed
right-hand matrix, the layout the CPU matrix kernels read fastest) the same convolution forward and
backward takes a quarter to two thirds of the time. With many output positions the convolution
kernels are faster, so the product is used only where the positions (images x height x width) are at
most 1/16 of the output channels: measured on SD1.5's shapes at 1 and 2 threads, batch 1 and 2,
every such convolution but one ran faster, and all together in about half the time.

Same sums in another order: outputs differ from ``F.conv2d`` by rounding only. The choice depends on
the shapes alone, so a run and its resumption compute the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Used when output positions x POSITIONS_PER_CHANNEL <= output channels (see the module docstring).
POSITIONS_PER_CHANNEL = 16


class MatmulConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict) that multiplies instead where that is faster."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Measured in fp32 only: under CPU autocast the product would run in bf16.
        if input.dim() != 4 or input.device.type != "cpu" or input.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return super()._conv_forward(input, weight, bias)
        batch, _, height, width = input.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        if batch * out_h * out_w * POSITIONS_PER_CHANNEL > self.out_channels:
            return super()._conv_forward(input, weight, bias)
        columns = F.unfold(input, self.kernel_size, padding=self.padding, stride=self.stride)  # [B, C*kh*kw, positions]
        out = F.linear(columns.transpose(1, 2), weight.flatten(1), bias)  # [B, positions, out channels]
        # Contiguous, as the convolution's output is (a copy of few positions).
        return out.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w).contiguous()


def _applies(module: nn.Module) -> bool:
    # Only plain zero-padded, ungrouped, undilated kernels larger than 1x1 (1x1 ones gained nothing).
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.kernel_size != (1, 1)
    )


def use_matmul_convolutions(module: nn.Module) -> int:
    """Let every applicable convolution in ``module`` multiply where that is faster; returns how many."""
    convolutions = [child for child in module.modules() if _applies(child)]
    for conv in convolutions:
        conv.__class__ = MatmulConv2d
    return len(convolutions)
