"""AUTOMATIC1111's hypernetwork as a torch module, and the diffusers attention processor that applies it.

For each context width the hypernetwork has a pair of modules, one for keys and one for values,
each ``x + mlp(x) * strength``. Wherever an attention layer's context has one of those widths, the
pair rewrites it before ``to_k`` and ``to_v`` (docs/formats.md#where-a-hypernetwork-applies). That
is AUTOMATIC1111's and ComfyUI's rule, so a file means the same here as there: on SD1 (768) and
SD2 (1024) it picks exactly the cross-attention layers; on the built-in tiny model, whose deeper
blocks are as wide as its text (64), it also picks their self-attention, as the UIs would.

``mlp`` is laid out exactly like AUTOMATIC1111's ``self.linear`` Sequential (Linear, activation,
LayerNorm, Dropout per layer), so its state-dict indices are the file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from trainer.errors import UserError
from trainer.formats.a1111_hypernetwork import HypernetworkFile, a1111_structure, read_hypernetwork, upgrade_old_keys

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    # AUTOMATIC1111's (and ComfyUI's) "swish" is Hardswish; the smooth swish is "silu".
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    # AUTOMATIC1111 also takes any torch activation by its lower-cased class name; these are the
    # ones that need no arguments, keep the width and hold no weights.
    **{
        cls.__name__.lower(): cls
        for cls in (nn.Softsign, nn.Mish, nn.GELU, nn.SiLU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.RReLU, nn.Softplus, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.LogSigmoid)
    },
}
# The only activations ComfyUI's HypernetworkLoader builds; with any other it loads nothing.
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


@dataclass(frozen=True)
class Structure:
    """The layer flags of every module of a hypernetwork (the recipe's ``hypernetwork.*`` keys of the same names)."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation: str = "linear"
    layer_norm: bool = False
    activate_output: bool = False
    # Dropout probability after each layer; None or all zeros = none.
    dropout_structure: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        layers, dropout = self.layer_structure, self.dropout_structure
        if len(layers) < 2 or layers[0] != 1 or layers[-1] != 1 or min(layers) <= 0:
            raise ValueError(f"layer_structure is {list(layers)}; it must start and end with 1 and hold only positive widths, e.g. [1, 2, 1].")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation is '{self.activation}'; use one of {', '.join(ACTIVATIONS)}.")
        if dropout is not None:
            if len(dropout) != len(layers) or dropout[0] != 0 or dropout[-1] != 0 or not all(0 <= p < 1 for p in dropout):
                raise ValueError(
                    f"dropout_structure is {list(dropout)}; it needs one probability per layer_structure entry ({len(layers)}), "
                    "each in [0, 1), the first and last 0, e.g. [0, 0.3, 0]."
                )


class HypernetworkModule(nn.Module):
    """``x + mlp(x) * strength``; ``mlp`` is AUTOMATIC1111's ``linear`` Sequential, module for module."""

    def __init__(self, width: int, structure: Structure):
        super().__init__()
        widths = [int(width * factor) for factor in structure.layer_structure]
        dropout = structure.dropout_structure or (0,) * len(widths)
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            is_last = index == len(widths) - 2
            if structure.activation != "linear" and (structure.activate_output or not is_last):
                layers.append(ACTIVATIONS[structure.activation]())
            if structure.layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropout[index + 1] > 0:
                layers.append(nn.Dropout(p=dropout[index + 1]))
        self.linear = nn.Sequential(*layers)
        self.strength = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in AUTOMATIC1111, strength is an inference setting: training always runs at full strength.
        return x + self.linear(x) * (1.0 if self.training else self.strength)

    def initialise(self, weight_init: str, activation: str, generator: torch.Generator) -> None:
        """AUTOMATIC1111's initialisation, drawn from ``generator``.

        Its quirk is kept: LayerNorm weights are drawn from N(0, 0.01) like "Normal" Linear weights,
        not set to one, whatever ``weight_init`` says.
        """
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            weight = layer.weight.data
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(weight, mean=0.0, std=0.01, generator=generator)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(weight, generator=generator)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(weight, generator=generator)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity, generator=generator)
            elif weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)
            else:
                raise ValueError(f"weight_init is '{weight_init}'; use one of {', '.join(WEIGHT_INITS)}.")
            nn.init.zeros_(layer.bias.data)

    def a1111_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights numbered as AUTOMATIC1111's Sequential numbers them when the file says "no dropout"."""
        kept = [layer for layer in self.linear if not isinstance(layer, nn.Dropout)]
        return {f"linear.{index}.{name}": tensor.detach().to(dtype) for index, layer in enumerate(kept) for name, tensor in layer.state_dict().items()}


class Hypernetwork(nn.Module):
    """A (keys, values) pair of :class:`HypernetworkModule` per context width."""

    def __init__(self, widths: list[int], structure: Structure):
        super().__init__()
        self.structure = structure
        self.pairs = nn.ModuleDict({str(width): nn.ModuleDict({"k": HypernetworkModule(width, structure), "v": HypernetworkModule(width, structure)}) for width in widths})

    @property
    def widths(self) -> list[int]:
        return [int(width) for width in self.pairs]

    def pair_for(self, width: int) -> nn.ModuleDict | None:
        return self.pairs[str(width)] if str(width) in self.pairs else None

    def set_strength(self, strength: float) -> None:
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.strength = strength

    def initialise(self, weight_init: str, generator: torch.Generator) -> None:
        for pair in self.pairs.values():
            for branch in ("k", "v"):
                pair[branch].initialise(weight_init, self.structure.activation, generator)

    def a1111_layers(self, dtype: torch.dtype) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        return {int(width): (pair["k"].a1111_state_dict(dtype), pair["v"].a1111_state_dict(dtype)) for width, pair in self.pairs.items()}

    @classmethod
    def from_file(cls, content: HypernetworkFile) -> Hypernetwork:
        """Build the modules AUTOMATIC1111 builds for a file and load its weights strictly, as it does."""
        hypernetwork = cls(list(content.layers), Structure(**a1111_structure(content.info)))
        for width, branches in content.layers.items():
            for branch, state_dict in zip(("k", "v"), branches):
                hypernetwork.pairs[str(width)][branch].load_state_dict(upgrade_old_keys(state_dict))
        return hypernetwork


def cross_attention_widths(unet: nn.Module) -> list[int]:
    """The context widths the UNet's cross-attention layers see (the text encoder's width)."""
    return sorted({module.to_k.in_features for module in unet.modules() if isinstance(module, Attention) and module.is_cross_attention})


def _transformer_attentions(unet: nn.Module) -> list[Attention]:
    # The attention of transformer blocks, which AUTOMATIC1111 hooks; not the group-normed
    # spatial attention some UNet mid-blocks have (ldm's AttnBlock, which it leaves alone).
    return [module for module in unet.modules() if isinstance(module, Attention) and module.group_norm is None and module.spatial_norm is None]


class HypernetworkAttnProcessor:
    """diffusers' AttnProcessor2_0 (scaled-dot-product attention) with the context rewritten for keys and values.

    A plain object holding a reference, not an nn.Module: the hypernetwork is registered once on
    the UNet, not once per attention layer.
    """

    def __init__(self, hypernetwork: Hypernetwork):
        self.hypernetwork = hypernetwork

    def keys_and_values(self, attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        pair = self.hypernetwork.pair_for(context.shape[-1])
        if pair is not None:
            # The hypernetwork keeps fp32 weights when the UNet runs in fp16 (sampling, loaded pipelines).
            weight_dtype = pair["k"].linear[0].weight.dtype
            context_k = pair["k"](context.to(weight_dtype)).to(context.dtype)
            context_v = pair["v"](context.to(weight_dtype)).to(context.dtype)
        return attn.to_k(context_k), attn.to_v(context_v)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key, value = self.keys_and_values(attn, context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (tensor.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for tensor in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def attach(unet: nn.Module, hypernetwork: Hypernetwork) -> None:
    """Apply ``hypernetwork`` in every attention layer of ``unet`` whose context has one of its widths.

    It is registered as ``unet.hypernetwork``, so it moves with the UNet between devices, follows its
    train/eval mode (samples are drawn at the chosen strength, without dropout) and is saved with
    it in checkpoints. The UNet's own weights are untouched.
    """
    unet.hypernetwork = hypernetwork
    processor = HypernetworkAttnProcessor(hypernetwork)
    for attention in _transformer_attentions(unet):
        attention.set_processor(processor)


def load_hypernetwork(unet: nn.Module, path: Path | str, strength: float = 1.0) -> Hypernetwork:
    """Apply an AUTOMATIC1111 ``.pt`` (or its sdtrain safetensors twin) to a diffusers UNet at ``strength``."""
    content = read_hypernetwork(Path(path))
    try:
        hypernetwork = Hypernetwork.from_file(content)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"'{path}' cannot be loaded as AUTOMATIC1111 loads it: {' '.join(str(err).split())}") from None
    seen = sorted({attention.to_k.in_features for attention in _transformer_attentions(unet)})
    if not set(hypernetwork.widths) & set(seen):
        raise UserError(
            f"'{path}' is for context widths {hypernetwork.widths}, but this UNet's attention layers see {seen}: "
            "it was trained for another model family (768 = SD1, 1024 = SD2, 2048 = SDXL)."
        )
    text_widths = cross_attention_widths(unet)
    if not set(hypernetwork.widths) & set(text_widths):
        # AUTOMATIC1111 and ComfyUI pick modules by width alone, so the UIs would apply it too - to self-attention.
        print(
            f"warning: '{path}' has no module for this model's text width ({', '.join(map(str, text_widths))}): it was trained for "
            f"another model family, and its {', '.join(str(w) for w in hypernetwork.widths if w in seen)}-wide modules change "
            "self-attention layers here, as they would in AUTOMATIC1111 and ComfyUI."
        )
    hypernetwork.set_strength(strength)
    hypernetwork.to(unet.device).eval()
    attach(unet, hypernetwork)
    return hypernetwork
