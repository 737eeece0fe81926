"""The linear algebra of the tools: a module's weight change as a matrix, its SVD, the rank to keep.

A weight change dW of a Linear [out, in] or a Conv2d [out, in, kh, kw] is the matrix [out, in*kh*kw];
a LoRA of rank r is a factorisation of it, ``up`` [out, r] @ ``down`` [r, in*kh*kw], times alpha / r.
By Eckart–Young the best rank-r approximation in the Frobenius norm is the SVD cut after r singular
values, and its error is the root-sum-square of the singular values cut off. Everything runs in
float32 on the CPU (docs/tools.md#precision).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer.formats import lycoris


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: ``rank`` alone is a fixed rank; with one of the dynamic rules it
    caps the rank the rule picks (docs/tools.md#choosing-the-rank)."""

    rank: int | None = None
    sv_ratio: float | None = None  # keep sigma_i >= sigma_1 / sv_ratio
    sv_fro: float | None = None  # the fewest values whose root-sum-square is this share of the Frobenius norm
    sv_cumulative: float | None = None  # the fewest values whose sum is this share of the sum of all

    @property
    def dynamic(self) -> bool:
        return any(value is not None for value in (self.sv_ratio, self.sv_fro, self.sv_cumulative))

    def choose(self, singular_values: torch.Tensor) -> int:
        """The rank to keep of a matrix with these singular values (descending), at least 1."""
        s = singular_values.double()
        if s[0] == 0:  # no change at all: one (zero) rank keeps the module's place in the file
            return 1
        if self.sv_ratio is not None:
            rank = int((s >= s[0] / self.sv_ratio).sum())
        elif self.sv_fro is not None:
            rank = _first_reaching(torch.cumsum(s**2, 0) / (s**2).sum(), self.sv_fro**2)
        elif self.sv_cumulative is not None:
            rank = _first_reaching(torch.cumsum(s, 0) / s.sum(), self.sv_cumulative)
        else:
            rank = len(s)
        if self.rank is not None:
            rank = min(rank, self.rank)
        return max(1, min(rank, len(s)))


def _first_reaching(shares: torch.Tensor, target: float) -> int:
    """The fewest leading values whose share reaches ``target`` (all of them when rounding keeps the share below it)."""
    return int(torch.searchsorted(shares, torch.tensor([target], dtype=shares.dtype))[0]) + 1


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``up @ down`` ([out, r] @ [r, n]) without forming it: QR of both factors, then the
    SVD of the small r x r core (the product's singular values are the core's)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


@dataclass
class Truncation:
    """A weight change cut to ``rank``: the LoRA factors (alpha = rank: scale 1) and what was kept."""

    up: torch.Tensor  # [out, rank(, 1, 1)]
    down: torch.Tensor  # [rank, in(, kh, kw)]
    singular_values: torch.Tensor  # all of them, descending

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def kept_fro_share(self) -> float:
        """||kept part|| / ||dW|| (1 for a zero change, which loses nothing)."""
        total = float(self.singular_values.double().norm())
        return float(self.singular_values[: self.rank].double().norm()) / total if total > 0 else 1.0

    @property
    def error_norm(self) -> float:
        """||dW - kept part||_F: the root-sum-square of the singular values cut off (Eckart–Young)."""
        return float(self.singular_values[self.rank :].double().norm())

    def module(self) -> dict:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "alpha": float(self.rank)}


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: torch.Size, rule: RankRule) -> Truncation:
    """The rank ``rule`` picks of the SVD ``u @ diag(s) @ vh`` of a change of the weight ``shape``.

    The singular values are split evenly (sqrt on each side), so up and down have the same magnitude:
    the least rounding when the file is stored in fp16 or bf16.
    """
    rank = rule.choose(s)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).reshape(shape[0], rank, *[1] * (len(shape) - 2))
    down = (root[:, None] * vh[:rank]).reshape(rank, *shape[1:])
    return Truncation(up.contiguous(), down.contiguous(), s)


def truncate_dense(delta: torch.Tensor, rule: RankRule) -> Truncation:
    """Cut a dense weight change [out, in(, kh, kw)] to the rank ``rule`` picks."""
    u, s, vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    return truncate(u, s, vh, delta.shape, rule)


def has_kernel(shape) -> bool:
    """A convolution with a spatial kernel (3x3), which kohya gives its own rank (conv_dim)."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def is_factored_lora(module: Mapping[str, torch.Tensor]) -> bool:
    """A LoRA/LoCon module without a Tucker core: its change is up @ down, the form resize and concat need."""
    return lycoris.algo_of(module) == lycoris.LOCON and "lora_mid.weight" not in module


def factors(module: Mapping[str, torch.Tensor], multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, n]) in float32 with up @ down = the module's weight change (alpha / r and
    ``multiplier`` folded into up)."""
    down = module["lora_down.weight"].float().flatten(1)
    up = module["lora_up.weight"].float().flatten(1)
    return up * (lycoris.scale_of(module) * multiplier), down


def weight_shape(module: Mapping[str, torch.Tensor]) -> torch.Size:
    """The shape of the weight a base-independent module changes (what its change is reshaped to)."""
    if lycoris.algo_of(module) == lycoris.FULL:
        return module["diff"].shape
    if "lora_down.weight" in module:
        down, up = module["lora_down.weight"], module["lora_up.weight"]
        kernel = module["lora_mid.weight"].shape[2:] if "lora_mid.weight" in module else down.shape[2:]
        return torch.Size((up.shape[0], down.shape[1], *kernel))
    if "hada_w1_a" in module:
        if "hada_t1" in module:
            return torch.Size((module["hada_w1_a"].shape[1], module["hada_w1_b"].shape[1], *module["hada_t1"].shape[2:]))
        return torch.Size((module["hada_w1_a"].shape[0], module["hada_w1_b"].shape[1]))
    return _lokr_shape(module)


def _lokr_shape(module: Mapping[str, torch.Tensor]) -> torch.Size:
    w1 = (module["lokr_w1"].shape) if "lokr_w1" in module else (module["lokr_w1_a"].shape[0], module["lokr_w1_b"].shape[1])
    if "lokr_w2" in module:
        w2 = tuple(module["lokr_w2"].shape)
    elif "lokr_t2" in module:
        w2 = (module["lokr_w2_a"].shape[1], module["lokr_w2_b"].shape[1], *module["lokr_t2"].shape[2:])
    else:
        w2 = (module["lokr_w2_a"].shape[0], module["lokr_w2_b"].shape[1])
    return torch.Size((w1[0] * w2[0], w1[1] * w2[1], *w2[2:]))


def dense_delta(module: Mapping[str, torch.Tensor], multiplier: float = 1.0) -> torch.Tensor:
    """The weight change a UI applies at strength ``multiplier``, for the modules whose change does not
    depend on the base weight (LoRA/LoCon, LoHa, LoKr, full); float32."""
    module = {suffix: value.float() for suffix, value in module.items()}
    shape = weight_shape(module)
    return lycoris.delta_weight(module, torch.empty(shape, device="meta")) * multiplier


def depends_on_base(module: Mapping[str, torch.Tensor]) -> bool:
    """(IA)^3 scales the base weight and DoRA renormalises it: their change cannot be known without the model."""
    return lycoris.algo_of(module) == lycoris.IA3 or "dora_scale" in module

