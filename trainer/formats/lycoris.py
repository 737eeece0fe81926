"""LyCORIS files: kohya's LoRA key format carrying the tensors of LoCon, LoHa, LoKr, DoRA, (IA)^3 or full.

Module names are kohya's (``lora_unet_...``, ``lora_te_text_model_...``; kohya_lora.py makes them), and
each module holds the tensors of one algorithm (docs/formats.md#lycoris-tensors-per-algorithm):

  LoCon   ``lora_down.weight`` [r, in, *k], ``lora_up.weight`` [out, r, *1], Tucker ``lora_mid.weight`` [r, r, *k]
  LoHa    ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in*k], ``hada_w2_a``, ``hada_w2_b``;
          Tucker ``hada_t1``/``hada_t2`` [r, r, *k] with ``hada_w*_a`` [r, out], ``hada_w*_b`` [r, in]
  LoKr    ``lokr_w1`` [a, c] or ``lokr_w1_a``/``_b``; ``lokr_w2`` [b, d, *k] or ``lokr_w2_a``/``_b``
          (Tucker ``lokr_t2``); the weight change is kron(w1, w2) with out = a*b, in = c*d
  DoRA    ``dora_scale`` [1, in, *1] next to the tensors of a low-rank algorithm (docs/formats.md#dora-magnitude)
  (IA)^3  ``weight`` (the per-channel factor) and ``on_input`` (0-dim int64)
  full    ``diff`` (the weight change itself) and ``diff_b``

Low-rank modules carry a 0-dim float32 ``alpha`` and are scaled by alpha / r, with r read from the
tensors as AUTOMATIC1111 and ComfyUI read it (``rank_of``). The functions here compute exactly what
those two apply; the trainer's adapters (trainer/methods/lycoris/modules.py) use the same functions,
so what trains is what the UIs rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trainer.errors import UserError
from trainer.formats.kohya_lora import kohya_name

# LyCORIS' generic wrapper writes this prefix for UNet modules; ComfyUI reads it, A1111 and diffusers do not.
GENERIC_PREFIX = "lycoris"

LOCON, LOHA, LOKR, IA3, FULL = "locon", "loha", "lokr", "ia3", "full"
# The only keys diffusers' load_lora_weights accepts in a kohya-named file.
PLAIN_LORA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}


def split_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<module>.<suffix>": tensor}`` -> ``{module: {suffix: tensor}}`` (kohya names hold no dots)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    return modules


def to_state_dict(modules: Mapping[str, Mapping[str, torch.Tensor | float | int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{module: {suffix: tensor}}`` -> the tensors of a file; weights in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for suffix, value in module.items():
            if suffix == "alpha":
                # Consumers call .item() on alpha; keep it float32 whatever the weights' dtype.
                stored = torch.tensor(float(value), dtype=torch.float32)
            elif suffix == "on_input":
                stored = torch.tensor(int(value), dtype=torch.int64)
            else:
                stored = value.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.{suffix}"] = stored
    return tensors


def algo_of(module: Mapping[str, torch.Tensor]) -> str | None:
    """Which algorithm a module's tensors belong to (None for ones no UI here knows, e.g. OFT or GLoRA)."""
    if "lora_down.weight" in module:
        return LOCON
    if "hada_w1_a" in module:
        return LOHA
    if "lokr_w1" in module or "lokr_w1_a" in module:
        return LOKR
    if "on_input" in module:
        return IA3
    if "diff" in module:
        return FULL
    return None


def rank_of(module: Mapping[str, torch.Tensor]) -> int | None:
    """The r of alpha / r as AUTOMATIC1111 and ComfyUI take it; None when they apply no scale."""
    algo = algo_of(module)
    if algo == LOCON:
        return module["lora_down.weight"].shape[0]
    if algo == LOHA:
        return module["hada_w1_b"].shape[0]
    if algo == LOKR:
        # A LoKr with both factors stored in full is never scaled, whatever alpha says.
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in module:
                return module[key].shape[0]
    return None


def scale_of(module: Mapping[str, torch.Tensor]) -> float:
    rank, alpha = rank_of(module), module.get("alpha")
    if rank is None or alpha is None:
        return 1.0
    return float(alpha) / rank


def rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored kernel: ``core`` [r1, r2, *k], ``up`` [r1, out], ``down`` [r2, in] -> [out, in, *k]."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core, up, down)


def _locon_delta(module: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    down, up = module["lora_down.weight"], module["lora_up.weight"]
    if "lora_mid.weight" in module:
        return rebuild_tucker(module["lora_mid.weight"], up.flatten(1).T, down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _loha_delta(module: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    def branch(index: int) -> torch.Tensor:
        w_a, w_b = module[f"hada_w{index}_a"], module[f"hada_w{index}_b"]
        if f"hada_t{index}" in module:
            return rebuild_tucker(module[f"hada_t{index}"], w_a, w_b)
        return (w_a @ w_b).reshape(shape)

    return branch(1) * branch(2)


def _lokr_delta(module: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = module["lokr_w1"] if "lokr_w1" in module else module["lokr_w1_a"] @ module["lokr_w1_b"]
    if "lokr_w2" in module:
        w2 = module["lokr_w2"]
    elif "lokr_t2" in module:
        w2 = rebuild_tucker(module["lokr_t2"], module["lokr_w2_a"], module["lokr_w2_b"])
    else:
        w2 = module["lokr_w2_a"] @ module["lokr_w2_b"]
    # A 4-D w2 keeps the kernel; w1 then repeats over it. torch.kron needs contiguous inputs.
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return torch.kron(w1, w2.contiguous()).reshape(shape)


def _ia3_delta(module: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    axis = 1 if int(module["on_input"]) else 0
    view = [1] * weight.dim()
    view[axis] = -1
    return weight * module["weight"].reshape(view)


def delta_weight(module: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change a UI adds at strength 1, before any DoRA decomposition (``weight``: the base W)."""
    algo = algo_of(module)
    if algo == IA3:
        return _ia3_delta(module, weight)
    if algo == FULL:
        return module["diff"]
    rebuild = {LOCON: _locon_delta, LOHA: _loha_delta, LOKR: _lokr_delta}[algo]
    return rebuild(module, weight.shape) * scale_of(module)


def dora_on_input(dora_scale: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for the per-input-column convention ([1, in, *1]), the one AUTOMATIC1111 and ComfyUI apply right."""
    return dora_scale.shape[0] == 1 and dora_scale.shape[1] == weight.shape[1]


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of W (over output rows and kernel), shaped [1, in, *1]."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))


def weight_decompose(weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA: rescale W (= W0 + dW) so each column (or row, LyCORIS' wd_on_output) has the magnitude ``dora_scale``."""
    if dora_on_input(dora_scale, weight):
        return weight * (dora_scale / column_norm(weight))
    row_norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return weight * (dora_scale / row_norm)


def updated_weight(module: Mapping[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') as AUTOMATIC1111 and ComfyUI compute them at strength ``multiplier`` (DoRA: they blend
    linearly between W0 and the decomposed weight)."""
    delta = delta_weight(module, weight)
    if "dora_scale" in module:
        delta = weight_decompose(weight + delta, module["dora_scale"]) - weight
    if "diff_b" in module:
        bias = multiplier * module["diff_b"] + (bias if bias is not None else 0)
    return weight + multiplier * delta, bias


def _layers_by_name(model) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the UNet and text encoders by its kohya name (and the UNet's by LyCORIS'
    generic ``lycoris_<diffusers path>`` name, which ComfyUI also reads)."""
    layers = {}
    for component, part in {"unet": model.unet, **model.text_encoder_modules()}.items():
        for path, layer in part.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                layers[model.kohya_name(component, path)] = layer
                if component == "unet":
                    layers[kohya_name(GENERIC_PREFIX, path)] = layer
    return layers


@torch.no_grad()
def apply_to_model(tensors: Mapping[str, torch.Tensor], model, multiplier: float = 1.0) -> list[str]:
    """Merge a LyCORIS or LoRA file into a base model's (a ``BaseModel``'s) weights, as the UIs would at
    strength ``multiplier``.

    Returns the names of the file's modules that match no layer of the model (a UI ignores those too).
    """
    layers = _layers_by_name(model)
    unmatched = []
    for name, module in split_modules(tensors).items():
        if algo_of(module) is None:
            raise UserError(
                f"Module '{name}' of the LyCORIS file has the tensors {sorted(module)}, which are none of LoCon, LoHa, LoKr, "
                "(IA)^3 or full. sdtrain cannot apply this algorithm; merge the file with the tool that made it."
            )
        layer = layers.get(name)
        if layer is None:
            unmatched.append(name)
            continue
        weight = layer.weight.float()
        bias = layer.bias.float() if layer.bias is not None else None
        module = {suffix: value.to(weight.device, torch.float32) for suffix, value in module.items()}
        new_weight, new_bias = updated_weight(module, weight, bias, multiplier)
        layer.weight.copy_(new_weight)
        if new_bias is not None and layer.bias is None:
            # AUTOMATIC1111 gives a bias-free layer the file's bias change as its new bias.
            layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype), requires_grad=False)
        elif new_bias is not None:
            layer.bias.copy_(new_bias)
    return unmatched


def compatibility_warnings(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """What AUTOMATIC1111, ComfyUI and diffusers cannot apply, or apply differently, in this file
    (docs/formats.md#what-each-consumer-applies); one line per consumer and problem, naming the consumer first."""
    modules = split_modules(tensors)
    suffixes = {suffix for module in modules.values() for suffix in module}
    ia3 = [name for name, module in modules.items() if algo_of(module) == IA3]
    lokr_tucker = [name for name, module in modules.items() if "lokr_t2" in module]
    dora_on_output = [name for name, module in modules.items() if "dora_scale" in module and module["dora_scale"].shape[0] > 1]
    warnings = []
    if dora_on_output:
        warnings.append(
            f"AUTOMATIC1111 and ComfyUI: {len(dora_on_output)} DoRA modules keep the magnitude per output row "
            "(dora_scale [out, 1]); both UIs normalise this convention wrongly and produce a different image."
        )
    if any(tensors[f"{name}.weight"].dim() > 1 for name in ia3):
        warnings.append("AUTOMATIC1111: (IA)^3 on convolutions is applied wrongly (it reshapes the factor for Linear layers only).")
    if ia3:
        warnings.append(f"ComfyUI: has no (IA)^3; it skips all {len(ia3)} modules of this file ('lora key not loaded').")
    if lokr_tucker:
        warnings.append(
            f"ComfyUI: LoKr with Tucker (lokr_t2) fails in torch.kron and ComfyUI skips those {len(lokr_tucker)} layers; "
            "train LoKr with use_tucker=false for ComfyUI."
        )
    if "dora_scale" in suffixes and suffixes - PLAIN_LORA_SUFFIXES == {"dora_scale"}:
        warnings.append("diffusers: load_lora_weights drops dora_scale and applies the file as a plain LoRA, a different result.")
    elif suffixes - PLAIN_LORA_SUFFIXES:
        extra = ", ".join(sorted(suffixes - PLAIN_LORA_SUFFIXES))
        warnings.append(f"diffusers: load_lora_weights rejects the whole file (it reads plain LoRA/LoCon only; this file has {extra}).")
    return warnings
