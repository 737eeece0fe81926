"""``method: hypernetwork`` — AUTOMATIC1111's hypernetworks: small networks that rewrite the attention
context before it becomes keys and values (module.py), trained with the base model frozen.

The artifact is AUTOMATIC1111's ``.pt`` (``output.formats: [a1111]``), which ComfyUI also loads,
and/or the same weights as safetensors (``safetensors``); formats/a1111_hypernetwork.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.formats.a1111_hypernetwork import HypernetworkFile, a1111_info, write_hypernetwork
from trainer.formats.safetensors_file import DTYPES
from trainer.methods.base import ExportContext, TrainingMethod
from trainer.methods.hypernetwork.config import structure as hypernetwork_structure
from trainer.methods.hypernetwork.module import COMFYUI_ACTIVATIONS, Hypernetwork, Structure, attach, cross_attention_widths

SUFFIXES = {"a1111": ".pt", "safetensors": ".safetensors"}


def comfyui_differences(structure: Structure) -> list[str]:
    """Where ComfyUI's HypernetworkLoader would read a file of this structure differently from AUTOMATIC1111
    (docs/formats.md#how-comfyui-reads-a-hypernetwork)."""
    differences = []
    if structure.activation not in COMFYUI_ACTIVATIONS:
        differences.append(
            f"ComfyUI's HypernetworkLoader does not know hypernetwork.activation '{structure.activation}' and applies nothing; "
            f"AUTOMATIC1111 reads it. For both, use one of {', '.join(COMFYUI_ACTIVATIONS)}."
        )
    if structure.layer_norm and structure.activation != "linear" and not structure.activate_output:
        differences.append(
            "with hypernetwork.layer_norm on and activate_output off, ComfyUI still applies the activation after the last layer "
            "(it counts the LayerNorms as layers), so its results differ from AUTOMATIC1111's. "
            "Set hypernetwork.activate_output: true or layer_norm: false for a file both read alike."
        )
    return differences


class HypernetworkMethod(TrainingMethod):
    name = "hypernetwork"
    formats = ("a1111", "safetensors")

    def setup(self) -> None:
        cfg, model = self.recipe.hypernetwork, self.model
        for part in model.parts().values():
            part.requires_grad_(False)
        structure = hypernetwork_structure(cfg)
        self.hypernetwork = Hypernetwork(cross_attention_widths(model.unet), structure)
        # Its own generator seeded by train.seed: the same start whatever drew random numbers before.
        self.hypernetwork.initialise(cfg.weight_init, torch.Generator().manual_seed(self.recipe.train.seed))
        self.hypernetwork.set_strength(cfg.sample_strength)
        attach(model.unet, self.hypernetwork)
        for difference in comfyui_differences(structure):
            print(f"warning: {difference}")

    def export(self, context: ExportContext) -> list[Path]:
        cfg, recipe = self.recipe.hypernetwork, self.recipe
        content = HypernetworkFile(
            layers=self.hypernetwork.a1111_layers(DTYPES[recipe.output.save_dtype]),
            info=a1111_info(
                name=context.name,
                step=context.step,
                layer_structure=list(cfg.layer_structure),
                activation=cfg.activation,
                layer_norm=cfg.layer_norm,
                activate_output=cfg.activate_output,
                weight_init=cfg.weight_init,
                sd_checkpoint_name=self.model.name,
                optional_info=recipe.output.comment or None,
            ),
        )
        return [write_hypernetwork(context.output_dir / f"{context.name}{SUFFIXES[fmt]}", content) for fmt in self.formats if fmt in recipe.output.formats]
