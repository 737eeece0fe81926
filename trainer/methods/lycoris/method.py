"""``method: lycoris`` — LoCon, LoHa, LoKr, DoRA, (IA)^3 or full fine-tuning of chosen layers, written
as a LyCORIS file that AUTOMATIC1111 and ComfyUI apply exactly (trainer/formats/lycoris.py).

Each targeted Linear/Conv2d of the UNet (and optionally of the text encoder) is replaced by an adapter
(modules.py) that keeps the layer frozen and trains the algorithm's tensors. The preset picks the
layers by module path, so every layer is wrapped once and gets one kohya name (the lycoris-lora
package's own "full" preset names ``time_embedding.linear_1`` twice and fails).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from trainer.errors import UserError
from trainer.formats import lycoris as lycoris_format
from trainer.formats.kohya_metadata import network_metadata
from trainer.formats.safetensors_file import DTYPES, save_safetensors
from trainer.methods.base import ExportContext, TrainingMethod
from trainer.methods.lycoris import modules
from trainer.methods.lycoris.config import LycorisConfig

UNET_ATTENTION = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# Everything inside a Transformer2DModel: proj_in/proj_out, attention, feed-forward.
UNET_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
TEXT_ATTENTION = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
TEXT_MLP = re.compile(r"mlp\.(fc1|fc2)$")
# The layers fed by a feed-forward block's hidden activations: (IA)^3 scales their input, as in its paper.
FEED_FORWARD_OUTPUT = re.compile(r"(ff\.net\.2|mlp\.fc2)$")

# The layers of each lycoris.preset (config.PRESET_NAMES, in the same order).
PRESETS = {
    "attn-only": {"unet": (UNET_ATTENTION,), "text_encoder": (TEXT_ATTENTION,)},
    "attn-mlp": {"unet": (UNET_TRANSFORMER,), "text_encoder": (TEXT_ATTENTION, TEXT_MLP)},
    # None: every Linear and Conv2d of the UNet (resnets, samplers, conv_in/out, time embedding).
    "full": {"unet": None, "text_encoder": (TEXT_ATTENTION, TEXT_MLP)},
}


def _targets(part: nn.Module, patterns: tuple[re.Pattern, ...] | None) -> dict[str, nn.Module]:
    return {
        path: layer
        for path, layer in part.named_modules()
        if (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1))
        and (patterns is None or any(p.search(path) for p in patterns))
    }


def build_adapter(cfg: LycorisConfig, path: str, layer: nn.Module) -> modules.LycorisAdapter | None:
    """The adapter ``cfg`` puts on ``layer`` (None: this algo leaves such a layer alone)."""
    has_kernel = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
    rank, alpha = cfg.rank, cfg.alpha
    if has_kernel:
        rank = cfg.rank if cfg.conv_rank is None else cfg.conv_rank
        alpha = cfg.alpha if cfg.conv_alpha is None else cfg.conv_alpha
        if rank == 0:
            return None
    if cfg.algo == "ia3":
        # AUTOMATIC1111 applies (IA)^3 to Linear layers only (docs/formats.md#what-each-consumer-applies).
        return modules.ia3(layer, on_input=bool(FEED_FORWARD_OUTPUT.search(path))) if isinstance(layer, nn.Linear) else None
    if cfg.algo == "full":
        return modules.full(layer)
    drops = {"dropout": cfg.dropout, "rank_dropout": cfg.rank_dropout}
    if cfg.algo == "lokr":
        return modules.lokr(layer, rank, alpha, cfg.use_tucker, cfg.factor, cfg.decompose_both, **drops)
    build = {"locon": modules.locon, "loha": modules.loha, "dora": modules.dora}[cfg.algo]
    return build(layer, rank, alpha, cfg.use_tucker, **drops)


def add_adapters(part: nn.Module, kohya_name, cfg: LycorisConfig, patterns: tuple[re.Pattern, ...] | None) -> dict[str, modules.LycorisAdapter]:
    """Replace the targeted layers of ``part`` by adapters; returns them by kohya name (``kohya_name(path)``)."""
    adapters = {}
    for path, layer in _targets(part, patterns).items():
        adapter = build_adapter(cfg, path, layer)
        if adapter is None:
            continue
        name = kohya_name(path)
        if name in adapters:
            raise UserError(f"Two layers of the model both get the kohya name '{name}'; this model's module names cannot be written as a LyCORIS file.")
        parent_path, _, child = path.rpartition(".")
        setattr(part.get_submodule(parent_path), child, adapter)
        adapters[name] = adapter
    return adapters


class LycorisMethod(TrainingMethod):
    name = "lycoris"
    # The LyCORIS tensors in kohya's naming: the file AUTOMATIC1111 and ComfyUI load from models/Lora.
    formats = ("kohya",)

    @classmethod
    def text_encoder_training_key(cls, recipe) -> str | None:
        return "lycoris.text_encoder" if recipe.lycoris.text_encoder else None

    def setup(self) -> None:
        cfg, model = self.recipe.lycoris, self.model
        for part in model.parts().values():
            part.requires_grad_(False)
        preset = PRESETS[cfg.preset]
        self.adapters = add_adapters(model.unet, lambda path: model.kohya_name("unet", path), cfg, preset["unet"])
        if cfg.text_encoder:
            for component, encoder in model.text_encoder_modules().items():
                self.adapters.update(add_adapters(encoder, lambda path, c=component: model.kohya_name(c, path), cfg, preset["text_encoder"]))
        if not self.adapters:
            raise UserError(f"lycoris.algo={cfg.algo} with lycoris.preset={cfg.preset} targets no layer. Choose a larger preset (e.g. attn-mlp).")
        for adapter in self.adapters.values():
            adapter.trained.requires_grad_(True)

    def file_modules(self) -> dict[str, dict]:
        """The file's content before dtype conversion: ``{kohya name: {suffix: tensor or number}}``."""
        return {name: adapter.file_tensors() for name, adapter in self.adapters.items()}

    def export(self, context: ExportContext) -> list[Path]:
        cfg, recipe, model = self.recipe.lycoris, self.recipe, self.model
        tensors = lycoris_format.to_state_dict(self.file_modules(), DTYPES[recipe.output.save_dtype])
        for warning in lycoris_format.compatibility_warnings(tensors):
            print(f"warning: {warning}")
        metadata = network_metadata(
            recipe, model, context, adapter="lycoris", network_module="lycoris.kohya", network_dim=cfg.rank, network_alpha=cfg.alpha, network_args=self._network_args()
        )
        return [save_safetensors(context.output_dir / f"{context.name}.safetensors", tensors, metadata, with_hashes=True)]

    def _network_args(self) -> dict[str, str]:
        """lycoris.kohya's network_args for the same network (strings, as kohya's command line passes them)."""
        cfg = self.recipe.lycoris
        args = {
            "algo": "locon" if cfg.algo == "dora" else cfg.algo,
            "preset": cfg.preset,
            "conv_dim": cfg.rank if cfg.conv_rank is None else cfg.conv_rank,
            "conv_alpha": cfg.alpha if cfg.conv_alpha is None else cfg.conv_alpha,
            "use_tucker": cfg.use_tucker,
            "dropout": cfg.dropout,
            "rank_dropout": cfg.rank_dropout,
            "train_norm": False,
        }
        if cfg.algo == "lokr":
            args.update(factor=cfg.factor, decompose_both=cfg.decompose_both)
        if cfg.algo == "dora":
            args.update(dora_wd=True, wd_on_output=False)
        return {key: str(value) for key, value in args.items()}
