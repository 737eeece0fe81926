"""``sdtrain lora extract``: a LoRA from a fine-tuned model (DreamBooth, a full fine-tune) and its base.

The layers a kohya LoRA trains are compared: in the UNet every Linear and 1x1 convolution of the
transformer blocks (attention, feed-forward, proj_in/out), with ``conv_rank`` also the ResNet and
sampler convolutions; in each text encoder the attention and MLP layers, but only when the encoder
changed by more than ``te_threshold`` somewhere (kohya's ``--min_diff``). Each change is cut by SVD
to its rank: the best approximation there is, exact when the change has at most that rank.
Optional quantile clamping bounds the factors' entries (kohya does it always, at 0.99) and reports the
error it adds. docs/tools.md#extract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.adapters.files import check_output, network_dims, save_adapter
from trainer.adapters.lowrank import RankRule, Truncation, has_kernel, truncate_dense
from trainer.errors import UserError
from trainer.formats.safetensors_file import iso_now, modelspec

UNET_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
UNET_CONVOLUTIONS = re.compile(r"(^|\.)(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.")
TEXT_ENCODER = re.compile(r"layers\.\d+\.(self_attn|mlp)\.")
DEFAULT_TE_THRESHOLD = 0.01  # kohya's --min_diff


def load_model(spec: str, role: str, config: str | None = None):
    """A base model by built-in name, diffusers folder or single file (``config``: the diffusers folder of a
    single file's architecture, the commands' ``--config``); errors name the command's argument."""
    from trainer.models.loading import builtin_base_names, load_base_model

    if spec not in builtin_base_names() and not Path(spec).exists():
        raise UserError(f"{role} '{spec}' does not exist. Give a diffusers folder, a single-file .safetensors checkpoint, or a built-in name ({', '.join(builtin_base_names())}).")
    try:
        return load_base_model(spec, config=config)
    except UserError as err:
        raise UserError(f"{role}: {err} (Here model.config is the --config option.)") from None


def _targets(component: str, part: nn.Module, with_convs: bool) -> dict[str, nn.Module]:
    found = {}
    for path, layer in part.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            continue
        if component != "unet":
            wanted = TEXT_ENCODER.search(path) and isinstance(layer, nn.Linear)
        else:
            wanted = UNET_TRANSFORMER.search(path) or (with_convs and UNET_CONVOLUTIONS.search(path) and isinstance(layer, nn.Conv2d))
        if wanted:
            found[path] = layer
    return found


def _clamp(cut: Truncation, quantile: float) -> float:
    """Clamp up and down to the ``quantile`` of their entries' magnitudes; returns ||added error|| (Frobenius)."""
    before = cut.up.flatten(1) @ cut.down.flatten(1)
    values = torch.cat([cut.up.flatten(), cut.down.flatten()]).abs().sort().values
    limit = float(values[min(len(values) - 1, int(quantile * (len(values) - 1)))])
    cut.up.clamp_(-limit, limit)
    cut.down.clamp_(-limit, limit)
    return float((cut.up.flatten(1) @ cut.down.flatten(1) - before).norm())


@dataclass
class ExtractReport:
    output: Path
    lines: list[str]

    def text(self) -> str:
        return "\n".join([*self.lines, f"Wrote {self.output}"])


def extract(
    tuned: str, base: str, out: Path, rank: int, *, conv_rank: int | None = None, te_threshold: float = DEFAULT_TE_THRESHOLD,
    clamp_quantile: float | None = None, config: str | None = None, dtype: torch.dtype = torch.float16, overwrite: bool = False,
) -> ExtractReport:
    check_output(out, overwrite)
    tuned_model, base_model = load_model(tuned, "Tuned model", config), load_model(base, "Base model", config)
    if tuned_model.family is not base_model.family:
        raise UserError(f"Tuned model '{tuned}' is {tuned_model.family.title} but base model '{base}' is {base_model.family.title}; give the base the tuned model was trained from.")
    tuned_parts, base_parts = tuned_model.parts(), base_model.parts()
    modules, lines, kept, clamp_errors = {}, [], [], []
    for component in ("unet", *base_model.text_encoder_modules()):
        layers = _targets(component, base_parts[component], conv_rank is not None)
        tuned_layers = dict(tuned_parts[component].named_modules())
        deltas = {}
        for path, layer in layers.items():
            other = tuned_layers.get(path)
            if other is None or other.weight.shape != layer.weight.shape:
                raise UserError(f"Tuned model '{tuned}' and base model '{base}' differ in shape at {component}.{path}: they are different architectures.")
            deltas[path] = other.weight.detach().float() - layer.weight.detach().float()
        largest = max((float(d.abs().max()) for d in deltas.values()), default=0.0)
        if component != "unet" and largest <= te_threshold:
            lines.append(f"{component}: unchanged (largest weight change {largest:.3g} <= --te-threshold {te_threshold:g}); left out.")
            continue
        unchanged = 0
        for path, delta in deltas.items():
            if not delta.any():
                unchanged += 1
                continue
            cut = truncate_dense(delta, RankRule(rank=conv_rank if has_kernel(delta.shape) else rank))
            total = float(delta.double().norm())
            kept.append(cut.kept_fro_share)
            if clamp_quantile is not None:
                clamp_errors.append(_clamp(cut, clamp_quantile) / total)
            modules[base_model.kohya_name(component, path)] = cut.module()
        lines.append(f"{component}: {len(deltas) - unchanged} changed layers extracted" + (f", {unchanged} unchanged left out" if unchanged else "") + f" (largest weight change {largest:.3g}).")
    if not modules:
        raise UserError(f"Tuned model '{tuned}' does not differ from base model '{base}' in any layer a LoRA holds; there is nothing to extract.")
    lines.append(f"Kept share of each layer's change (Frobenius): mean {100 * sum(kept) / len(kept):.2f}%, lowest {100 * min(kept):.2f}%.")
    if clamp_errors:
        lines.append(f"Clamping at the {clamp_quantile:g} quantile added an error of mean {100 * sum(clamp_errors) / len(clamp_errors):.3f}%, largest {100 * max(clamp_errors):.3f}% of a layer's change.")
    save_adapter(out, modules, _metadata(base_model, tuned, base, Path(out), modules, rank, conv_rank), dtype)
    return ExtractReport(Path(out), lines)


def _metadata(model, tuned: str, base: str, out: Path, modules: dict, rank: int, conv_rank: int | None) -> dict[str, str]:
    family = model.family
    metadata = {
        "ss_network_module": "networks.lora",
        **network_dims(modules),
        "ss_output_name": out.stem,
        "ss_v2": str(family.is_sd2),
        "ss_base_model_version": family.ss_base_model_version(model.prediction_type),
        "ss_sd_model_name": model.name,
        "ss_training_comment": f"extracted by sdtrain from {Path(tuned).name} against {Path(base).name} at rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else ""),
        "ss_training_finished_at": iso_now(),
    }
    metadata.update(modelspec(f"{family.modelspec_architecture(model.prediction_type)}/lora", family.adapter_implementation, out.stem, model.native_resolution, model.prediction_type))
    return metadata
