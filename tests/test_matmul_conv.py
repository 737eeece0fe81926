"""Convolutions as matrix products on the CPU (trainer/matmul_conv.py): the same convolution up to
float rounding, forward and backward, used only where it pays, and switched on for CPU training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.matmul_conv import POSITIONS_PER_CHANNEL, MatmulConv2d, use_matmul_convolutions

UNIT_ROUNDOFF = 2.0**-24  # fp32


def _gamma(terms: int) -> float:
    # Higham's bound: a sum of `terms` products in any order is off from the exact value by at most
    # gamma * (the sum of the products' magnitudes).
    return terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)


def _pair(in_channels, out_channels, stride, trained_weight):
    torch.manual_seed(0)
    plain = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    plain.weight.requires_grad_(trained_weight)
    fast = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    fast.load_state_dict(plain.state_dict())
    fast.weight.requires_grad_(trained_weight)
    assert use_matmul_convolutions(fast) == 1
    return plain, fast


@pytest.mark.parametrize("stride, size, trained_weight", [(1, 2, False), (2, 4, False), (1, 2, True)])
def test_equal_to_the_convolution_up_to_rounding_forward_and_backward(stride, size, trained_weight):
    # 2x2 outputs of 64 channels: 4 positions x 16 <= 64, the case the product is used for.
    plain, fast = _pair(32, 64, stride, trained_weight)
    x = torch.randn(1, 32, size, size)
    x_plain, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_fast = plain(x_plain), fast(x_fast)
    assert out_fast.shape == out_plain.shape == (1, 64, 2, 2) and out_fast.is_contiguous()
    g = torch.randn_like(out_plain)
    out_plain.backward(g)
    out_fast.backward(g)

    weight = plain.weight.detach()
    # Forward: each output sums in_channels * 9 products and the bias.
    magnitudes = F.conv2d(x.abs(), weight.abs(), plain.bias.detach().abs(), stride=stride, padding=1)
    assert ((out_fast - out_plain).abs() <= 2 * _gamma(32 * 9 + 1) * magnitudes).all()
    # Input gradient: each element sums out_channels * 9 products (the transposed convolution).
    grad_magnitudes = torch.nn.grad.conv2d_input(x.shape, weight.abs(), g.abs(), stride=stride, padding=1)
    assert ((x_fast.grad - x_plain.grad).abs() <= 2 * _gamma(64 * 9) * grad_magnitudes).all()
    if trained_weight:
        # Weight gradient: each element sums the products over the 4 output positions.
        weight_magnitudes = torch.nn.grad.conv2d_weight(x.abs(), weight.shape, g.abs(), stride=stride, padding=1)
        assert ((fast.weight.grad - plain.weight.grad).abs() <= 2 * _gamma(4) * weight_magnitudes).all()
    else:
        assert fast.weight.grad is None


def test_many_output_positions_run_the_convolution_itself():
    plain, fast = _pair(8, 16, 1, False)
    # 4x4 = 16 positions x 16 > 16 channels: torch's convolution, bit for bit.
    x = torch.randn(1, 8, 4, 4)
    assert 16 * POSITIONS_PER_CHANNEL > 16
    assert torch.equal(fast(x), plain(x))


def test_lower_precision_runs_the_convolution_itself():
    # The product was measured in fp32 only: bf16 inputs and CPU autocast (train.mixed_precision=bf16) use torch's.
    plain, fast = _pair(32, 64, 1, False)
    x = torch.randn(1, 32, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), plain(x))
    plain, fast = plain.to(torch.bfloat16), fast.to(torch.bfloat16)
    assert torch.equal(fast(x.bfloat16()), plain(x.bfloat16()))


def test_only_plain_kernels_are_switched_and_the_state_dict_is_unchanged():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 1),  # 1x1: gained nothing when measured
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding="same"),
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert use_matmul_convolutions(model) == 1
    assert [type(layer) for layer in model] == [MatmulConv2d] + [nn.Conv2d] * 5
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


def test_cpu_training_switches_the_models_convolutions(tmp_path):
    from tests.conftest import REPO, fast_overrides
    from trainer import loop
    from trainer.methods import method_class
    from trainer.models.loading import load_recipe_model
    from trainer.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "sls_frog_lora.yaml", fast_overrides(tmp_path))
    model = load_recipe_model(recipe.model)
    method = method_class(recipe.method)(recipe, model)
    method.setup()
    loop._prepare_model(model, method, torch.device("cpu"), torch.float32, gradient_checkpointing=False)
    kernels = [module for module in model.unet.modules() if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)]
    assert kernels and all(type(module) is MatmulConv2d for module in kernels)
