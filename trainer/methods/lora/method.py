"""``method: lora`` — low-rank adapters (peft) on the UNet and optionally the text encoder.

Targets follow kohya: the UNet's attention projections by default; with ``feed_forward`` also the
transformer blocks' feed-forward layers and proj_in/proj_out; with ``conv_rank`` > 0 also the ResNet
and up/down-sampler convolutions (LoCon) at their own rank; with ``text_encoder`` the CLIP attention
and MLP layers at their own learning rate. The artifact is a kohya-format file (formats/kohya_lora.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from trainer.atomic import replaced_directory
from trainer.formats import kohya_lora
from trainer.formats.kohya_metadata import network_metadata
from trainer.formats.safetensors_file import DTYPES, save_safetensors
from trainer.methods.base import ExportContext, TrainingMethod

ATTENTION = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
FEED_FORWARD = re.compile(r"(ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in|attentions\.\d+\.proj_out)$")
CONVOLUTIONS = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
TEXT_ENCODER = re.compile(r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def _matching(module: nn.Module, pattern: re.Pattern) -> list[str]:
    return [name for name, child in module.named_modules() if pattern.search(name) and isinstance(child, (nn.Linear, nn.Conv2d))]


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    return {name: child for name, child in module.named_modules() if isinstance(child, LoraLayer)}


class LoraMethod(TrainingMethod):
    name = "lora"
    formats = ("kohya", "diffusers")

    @classmethod
    def text_encoder_training_key(cls, recipe) -> str | None:
        return "lora.text_encoder" if recipe.lora.text_encoder else None

    def setup(self) -> None:
        cfg, model = self.recipe.lora, self.model
        for part in model.parts().values():
            part.requires_grad_(False)
        linear = _matching(model.unet, ATTENTION) + (_matching(model.unet, FEED_FORWARD) if cfg.feed_forward else [])
        convs = _matching(model.unet, CONVOLUTIONS) if cfg.conv_rank > 0 else []
        model.unet.add_adapter(
            PeftLoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=linear + convs,
                # Full module names, anchored, so a conv's rank never leaks onto a sibling layer.
                rank_pattern={f"^{re.escape(n)}$": cfg.conv_rank for n in convs},
                alpha_pattern={f"^{re.escape(n)}$": cfg.conv_alpha for n in convs},
            )
        )
        if cfg.text_encoder:
            for encoder in model.text_encoder_modules().values():
                # peft directly: transformers' own add_adapter demands a newer peft than PyPI has.
                inject_adapter_in_model(
                    PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=_matching(encoder, TEXT_ENCODER)),
                    encoder,
                )
        for part in (model.unet, *model.text_encoder_modules().values()):
            for name, param in part.named_parameters():
                param.requires_grad_("lora_" in name)

    def adapted_parts(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet, **self.model.text_encoder_modules()}

    def kohya_modules(self) -> dict[str, kohya_lora.LoraWeights]:
        modules = {}
        for component, part in self.adapted_parts().items():
            for path, layer in lora_layers(part).items():
                modules[self.model.kohya_name(component, path)] = kohya_lora.LoraWeights(
                    down=layer.lora_A["default"].weight.detach().float().cpu(),
                    up=layer.lora_B["default"].weight.detach().float().cpu(),
                    alpha=float(layer.lora_alpha["default"]),
                )
        return modules

    def export(self, context: ExportContext) -> list[Path]:
        paths = []
        if "kohya" in self.recipe.output.formats:
            paths.append(self._export_kohya(context))
        if "diffusers" in self.recipe.output.formats:
            paths.append(self._export_diffusers(context))
        return paths

    def _export_kohya(self, context: ExportContext) -> Path:
        cfg, recipe, model = self.recipe.lora, self.recipe, self.model
        tensors = kohya_lora.to_state_dict(self.kohya_modules(), DTYPES[recipe.output.save_dtype])
        network_args = {"conv_dim": cfg.conv_rank, "conv_alpha": cfg.conv_alpha} if cfg.conv_rank else {}
        metadata = network_metadata(
            recipe, model, context, adapter="lora", network_module="networks.lora", network_dim=cfg.rank, network_alpha=cfg.alpha, network_args=network_args
        )
        return save_safetensors(context.output_dir / f"{context.name}.safetensors", tensors, metadata, with_hashes=True)

    def _export_diffusers(self, context: ExportContext) -> Path:
        dtype = DTYPES[self.recipe.output.save_dtype]
        # diffusers' save_lora_weights names its arguments after the pipeline's components.
        layers = {
            f"{component}_lora_layers": {k: v.to(dtype) for k, v in get_peft_model_state_dict(part).items()}
            for component, part in self.adapted_parts().items()
            if lora_layers(part)
        }
        directory = context.output_dir / f"{context.name}_diffusers"
        with replaced_directory(directory) as tmp:
            self.model.family.pipeline_class().save_lora_weights(tmp, safe_serialization=True, **layers)
        return directory
