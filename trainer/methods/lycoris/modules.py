"""The trainable LyCORIS adapters: each wraps a frozen Linear or Conv2d and trains a change of its weight.

An adapter's trained tensors have the names and shapes the file stores (trainer/formats/lycoris.py),
and its weight change is computed by that module's functions, the ones that mirror AUTOMATIC1111 and
ComfyUI; so the tensors written are exactly what trained, and the UIs rebuild the trained change.

The frozen layer always runs on the input as it is and the change is added as a separate branch
(``base(x) + op(x, dW)``): in fp16/bf16 a small dW added to W would round away.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.formats import lycoris as lycoris_format


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = ``factor`` when it divides ``dimension``, else the
    largest divisor <= min(factor, sqrt(dimension)) (factor -1: no limit). LyCORIS splits LoKr this way."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = math.isqrt(dimension) if factor <= 0 else min(factor, math.isqrt(dimension))
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def _kernel(layer: nn.Module) -> tuple[int, ...]:
    return tuple(layer.weight.shape[2:])


def _has_kernel(layer: nn.Module) -> bool:
    return any(k != 1 for k in _kernel(layer))


def _kaiming(*shape: int) -> torch.Tensor:
    tensor = torch.empty(shape)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


def _normal(std: float, *shape: int) -> torch.Tensor:
    return torch.randn(shape) * std


def _rank_keep_mask(shape: tuple[int, ...], probability: float, like: torch.Tensor) -> torch.Tensor:
    """1/(1-p) where kept, 0 where dropped, so the expected change stays the same."""
    keep = (torch.rand(shape, device=like.device) >= probability).to(like.dtype)
    return keep / (1.0 - probability)


_LAYER_SHAPE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding")


class LycorisAdapter(nn.Module):
    """A frozen layer plus trained tensors ``{file suffix: tensor}`` whose change the format functions compute."""

    def __init__(self, base: nn.Linear | nn.Conv2d, trained: dict[str, torch.Tensor], constants: dict[str, float | int], dropout: float = 0.0, rank_dropout: float = 0.0):
        super().__init__()
        self.base = base
        device = base.weight.device
        # Parameter names cannot hold dots ("lora_down.weight"); keep the file's suffix beside each.
        self.trained = nn.ParameterDict({suffix.replace(".", "_"): nn.Parameter(t.to(device, torch.float32)) for suffix, t in trained.items()})
        self.suffixes = {suffix.replace(".", "_"): suffix for suffix in trained}
        self.constants = dict(constants)
        self.dropout = nn.Dropout(dropout)
        self.rank_dropout = rank_dropout

    def __getattr__(self, name: str):
        # The wrapped layer's shape attributes (in_features, out_channels, ...): model code reads them
        # (diffusers' SDXL pipeline asks add_embedding.linear_1.in_features).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _LAYER_SHAPE_ATTRIBUTES:
                return getattr(self.base, name)
            raise

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors as the file has them (live parameters, so gradients flow through them)."""
        tensors = {self.suffixes[key]: param for key, param in self.trained.items()}
        tensors.update({name: torch.tensor(value) for name, value in self.constants.items()})
        return tensors

    def file_tensors(self) -> dict[str, torch.Tensor | float | int]:
        tensors: dict[str, torch.Tensor | float | int] = {self.suffixes[key]: param.detach().float().cpu() for key, param in self.trained.items()}
        tensors.update(self.constants)
        return tensors

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's operation (with its stride, padding, ...) under another weight."""
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        if isinstance(self.base, nn.Conv2d):
            return F.conv2d(x, weight, bias, self.base.stride, self.base.padding, self.base.dilation, self.base.groups)
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.tensors()
        delta = lycoris_format.delta_weight(tensors, self.base.weight.float())
        if self.training and self.rank_dropout:
            # LoHa and LoKr have no single rank axis; like LyCORIS, drop whole output rows of the change.
            delta = delta * _rank_keep_mask((delta.shape[0],), self.rank_dropout, delta).reshape(-1, *[1] * (delta.dim() - 1))
        return self.base(x) + self.dropout(self.op(x, delta, tensors.get("diff_b")))


class LoconAdapter(LycorisAdapter):
    """LoRA / LoCon: down (the kernel), optional Tucker mid, up; run as three small layers, never as dW."""

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.trained["lora_down_weight"], self.trained["lora_up_weight"]
        if isinstance(self.base, nn.Linear):
            hidden = F.linear(x, down.to(x.dtype))
        elif "lora_mid_weight" in self.trained:
            hidden = self.op(F.conv2d(x, down.to(x.dtype)), self.trained["lora_mid_weight"])
        else:
            hidden = self.op(x, down)
        if self.training and self.rank_dropout:
            # Drop whole ranks, per sample (kohya's rank_dropout).
            rank_axis = -1 if isinstance(self.base, nn.Linear) else 1
            shape = [1] * hidden.dim()
            shape[0], shape[rank_axis] = hidden.shape[0], hidden.shape[rank_axis]
            hidden = hidden * _rank_keep_mask(tuple(shape), self.rank_dropout, hidden)
        out = F.linear(hidden, up.to(x.dtype)) if isinstance(self.base, nn.Linear) else F.conv2d(hidden, up.to(x.dtype))
        return self.dropout(out * lycoris_format.scale_of(self.tensors()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._branch(x)


class DoraAdapter(LoconAdapter):
    """DoRA on the input axis: W' = (W0 + dW) * m / ||W0 + dW|| per input column, which is the same as
    scaling each input channel of x by m / ||.||; the convention AUTOMATIC1111 and ComfyUI apply right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight.float()
        lora = {suffix: t for suffix, t in self.tensors().items() if suffix != "dora_scale"}
        magnitude = self.trained["dora_scale"] / lycoris_format.column_norm(weight + lycoris_format.delta_weight(lora, weight))
        # [1, in] broadcasts over a Linear input's last axis, [1, in, 1, 1] over a conv input's channels.
        scaled = x * magnitude.reshape(magnitude.shape[1:] if isinstance(self.base, nn.Linear) else magnitude.shape).to(x.dtype)
        return self.base(scaled) + self._branch(scaled)


# --- construction: shapes and initialisation per algorithm (the change is zero at step 0) ------------


def _locon_tensors(base: nn.Module, rank: int, tucker: bool) -> dict[str, torch.Tensor]:
    out_dim, in_dim, *kernel = base.weight.shape
    ones = [1] * len(kernel)
    trained = {"lora_up.weight": torch.zeros(out_dim, rank, *ones)}
    if tucker and _has_kernel(base):
        trained["lora_down.weight"] = _kaiming(rank, in_dim, *ones)
        trained["lora_mid.weight"] = _kaiming(rank, rank, *kernel)
    else:
        trained["lora_down.weight"] = _kaiming(rank, in_dim, *kernel)
    return trained


def locon(base: nn.Module, rank: int, alpha: float, tucker: bool, dropout: float = 0.0, rank_dropout: float = 0.0) -> LoconAdapter:
    return LoconAdapter(base, _locon_tensors(base, rank, tucker), {"alpha": alpha}, dropout, rank_dropout)


def dora(base: nn.Module, rank: int, alpha: float, tucker: bool, dropout: float = 0.0, rank_dropout: float = 0.0) -> DoraAdapter:
    trained = _locon_tensors(base, rank, tucker)
    trained["dora_scale"] = lycoris_format.column_norm(base.weight.detach().float().cpu())
    return DoraAdapter(base, trained, {"alpha": alpha}, dropout, rank_dropout)


def loha(base: nn.Module, rank: int, alpha: float, tucker: bool, dropout: float = 0.0, rank_dropout: float = 0.0) -> LycorisAdapter:
    out_dim, in_dim, *kernel = base.weight.shape
    trained = {}
    for index in (1, 2):
        if tucker and _has_kernel(base):
            trained[f"hada_t{index}"] = _normal(0.1, rank, rank, *kernel)
            w_a, w_b = (rank, out_dim), (rank, in_dim)
        else:
            w_a, w_b = (out_dim, rank), (rank, in_dim * math.prod(kernel))
        # LyCORIS' scheme: the second branch's a starts at zero, so the product does too.
        trained[f"hada_w{index}_a"] = _normal(0.1, *w_a) if index == 1 else torch.zeros(w_a)
        trained[f"hada_w{index}_b"] = _normal(1.0, *w_b)
    return LycorisAdapter(base, trained, {"alpha": alpha}, dropout, rank_dropout)


def lokr(base: nn.Module, rank: int, alpha: float, tucker: bool, factor: int, decompose_both: bool, dropout: float = 0.0, rank_dropout: float = 0.0) -> LycorisAdapter:
    """kron(w1 [a, c], w2 [b, d, *k]); each factor is stored low-rank only where rank is below half its size."""
    out_dim, in_dim, *kernel = base.weight.shape
    (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
    trained = {}
    if decompose_both and rank < max(a, c) / 2:
        trained["lokr_w1_a"], trained["lokr_w1_b"] = _kaiming(a, rank), _kaiming(rank, c)
    else:
        trained["lokr_w1"] = _kaiming(a, c)
    if rank >= max(b, d) / 2:
        trained["lokr_w2"] = torch.zeros(b, d, *kernel)
    elif tucker and _has_kernel(base):
        trained["lokr_t2"] = _kaiming(rank, rank, *kernel)
        trained["lokr_w2_a"], trained["lokr_w2_b"] = _kaiming(rank, b), torch.zeros(rank, d)
    else:
        trained["lokr_w2_a"], trained["lokr_w2_b"] = _kaiming(b, rank), torch.zeros(rank, d * math.prod(kernel))
    return LycorisAdapter(base, trained, {"alpha": alpha}, dropout, rank_dropout)


def ia3(base: nn.Linear, on_input: bool) -> LycorisAdapter:
    """W' = W * (1 + w), w per output row, or per input column (``on_input``: a layer fed by activations)."""
    size = base.in_features if on_input else base.out_features
    return LycorisAdapter(base, {"weight": torch.zeros(size)}, {"on_input": int(on_input)})


def full(base: nn.Module) -> LycorisAdapter:
    trained = {"diff": torch.zeros(base.weight.shape)}
    if base.bias is not None:
        trained["diff_b"] = torch.zeros(base.bias.shape)
    return LycorisAdapter(base, trained, {})
