"""Whole models as one file: diffusers layout <-> the original single-file layouts of SD1, SD2 and SDXL.

AUTOMATIC1111, ComfyUI and every model site exchange models as one ``.safetensors`` file in the
layout of Stability's original code (``ldm`` for SD1/SD2, ``generative-models``/"SGM" for SDXL); our
models live in diffusers' layout. The conversion is a rename of *modules* (a parameter keeps its
last name part), written here as tables (docs/formats.md#single-file-checkpoints):

* UNet (``model.diffusion_model.*``): built from the UNet config - how many down/up blocks, how many
  layers per block, which blocks have attention, SDXL's size/pooled-text embedding - so the same
  code serves the built-in tiny models, SD1.5, SD2.1 and SDXL. The tensors themselves are never changed.
* VAE (``first_stage_model.*``): built from the block counts found in the keys. The mid-block
  attention's q/k/v/proj_out are 1x1 convolutions in ldm and Linear layers in diffusers, so those
  weights are reshaped ``[C, C] <-> [C, C, 1, 1]``.
* Text encoders: Hugging Face CLIP names (SD1's, SDXL's first encoder) or OpenCLIP names with q/k/v
  fused into ``in_proj`` (SD2's, SDXL's second encoder), under a prefix per layout (``TEXT_LAYOUTS``).

Each table is used in both directions, so diffusers -> single file -> diffusers is exact by
construction; the tests check the names against diffusers' own converters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.atomic import write_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class CheckpointLayoutError(ValueError):
    """A state dict is not in the layout the conversion expects (unknown, missing or extra tensors).

    Loaders turn it into a ``UserError`` that names the file; the message says which tensors.
    """


# --------------------------------------------------------------------------------------------------
# Renaming by module-path tables


def rename_module(key: str, table: Mapping[str, str]) -> str | None:
    """Rename ``key`` by the longest module path in ``table`` that it starts with; None if none does.

    Matching whole dotted parts (never a bare string prefix) keeps ``resnets.1`` from matching
    ``resnets.10``. A table entry may also be a full key (a parameter renamed on its own).
    """
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = table.get(".".join(parts[:cut]))
        if mapped is not None:
            return ".".join([mapped, *parts[cut:]])
    return None


def _rename_all(state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str], component: str) -> dict[str, torch.Tensor]:
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        new_key = rename_module(key, table)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = tensor
    if unknown:
        raise CheckpointLayoutError(
            f"{len(unknown)} {component} tensor(s) have no place in the single-file layout, e.g. {', '.join(unknown[:3])}"
        )
    return renamed


def _inverted(table: Mapping[str, str]) -> dict[str, str]:
    return {ldm: diffusers for diffusers, ldm in table.items()}


def _count(keys, pattern: str) -> int:
    """1 + the largest number captured by ``pattern`` in ``keys`` (0 when nothing matches)."""
    regex = re.compile(pattern)
    found = [int(m.group(1)) for key in keys if (m := regex.match(key))]
    return max(found) + 1 if found else 0


# --------------------------------------------------------------------------------------------------
# UNet

# diffusers ResnetBlock2D -> ldm ResBlock (the whole block is renamed, its parameters by these).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SD_DOWN_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SD_UP_BLOCKS = {"CrossAttnUpBlock2D", "UpBlock2D"}


def _add_resnet(table: dict[str, str], diffusers_path: str, ldm_path: str, inner: Mapping[str, str]) -> None:
    # Only the known inner modules are listed, so an unexpected parameter is reported, not passed through.
    for diffusers_name, ldm_name in inner.items():
        table[f"{diffusers_path}.{diffusers_name}"] = f"{ldm_path}.{ldm_name}"


def unet_module_table(unet_config: Mapping) -> dict[str, str]:
    """diffusers module path -> ldm/SGM module path for an SD1.x/SD2.x/SDXL ``UNet2DConditionModel`` config.

    ldm numbers the UNet as flat ``input_blocks``/``output_blocks`` lists: each down block
    contributes ``layers_per_block`` entries (resnet at ``.0``, attention at ``.1``) plus one
    downsampler entry (``.0.op``); each up block ``layers_per_block + 1`` entries, its upsampler
    sharing the last entry after the attention (``.2.conv``) or after the resnet (``.1.conv``).
    Transformer internals (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...) are named alike.
    SDXL's embedding of pooled text and image sizes (``add_embedding``) is SGM's ``label_emb.0``.
    """
    down_types, up_types = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    per_block = unet_config["layers_per_block"]
    unsupported = [
        *(t for t in down_types if t not in _SD_DOWN_BLOCKS),
        *(t for t in up_types if t not in _SD_UP_BLOCKS),
    ]
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in (None, "UNetMidBlock2DCrossAttn"):
        unsupported.append(unet_config["mid_block_type"])
    addition = unet_config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        unsupported.append(f"addition embedding '{addition}'")
    if unet_config.get("class_embed_type") or unet_config.get("num_class_embeds"):
        unsupported.append("class embeddings (an upscaler?)")
    if unsupported or not isinstance(per_block, int) or len(down_types) != len(up_types):
        raise CheckpointLayoutError(f"not an SD1.x/SD2.x/SDXL UNet config ({', '.join(map(str, unsupported)) or 'layers_per_block'})")

    stride = per_block + 1
    last = len(down_types) - 1
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    if addition == "text_time":
        table.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for b, block_type in enumerate(down_types):
        for i in range(per_block):
            entry = 1 + stride * b + i
            _add_resnet(table, f"down_blocks.{b}.resnets.{i}", f"input_blocks.{entry}.0", _UNET_RESNET)
            if block_type.startswith("CrossAttn"):
                table[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{entry}.1"
        if b < last:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{stride * (b + 1)}.0.op"
    for b, block_type in enumerate(up_types):
        has_attention = block_type.startswith("CrossAttn")
        for i in range(stride):
            entry = stride * b + i
            _add_resnet(table, f"up_blocks.{b}.resnets.{i}", f"output_blocks.{entry}.0", _UNET_RESNET)
            if has_attention:
                table[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{entry}.1"
        if b < last:
            table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{stride * b + per_block}.{2 if has_attention else 1}.conv"
    return table


def unet_to_ldm(unet_sd: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> ``model.diffusion_model.*`` keys (tensors unchanged)."""
    renamed = _rename_all(unet_sd, unet_module_table(unet_config), "UNet")
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def unet_from_ldm(ldm_unet_sd: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` tensors (prefix stripped) -> diffusers UNet state dict."""
    return _rename_all(ldm_unet_sd, _inverted(unet_module_table(unet_config)), "UNet")


# --------------------------------------------------------------------------------------------------
# VAE

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# ldm keys of the attention weights that ldm stores as 1x1 convolutions.
_VAE_CONV_ATTENTION = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_module_table(num_blocks: int, layers_per_block: int) -> dict[str, str]:
    """diffusers ``AutoencoderKL`` module path -> ldm path.

    The decoder's up blocks are numbered in opposite directions: diffusers' ``up_blocks.0`` (lowest
    resolution, runs first) is ldm's ``up.{num_blocks-1}``. Decoder blocks have one resnet more.
    """
    table = {name: name for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = f"{side}.conv_in"
        table[f"{side}.conv_out"] = f"{side}.conv_out"
        table[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        _add_resnet(table, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET)
        _add_resnet(table, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)
        _add_resnet(table, f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION)
    for i in range(num_blocks):
        for j in range(layers_per_block):
            _add_resnet(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        up = num_blocks - 1 - i
        for j in range(layers_per_block + 1):
            _add_resnet(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
        if i < num_blocks - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return table


def vae_to_ldm(vae_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VAE state dict -> ``first_stage_model.*`` (attention Linear weights as 1x1 convs)."""
    table = vae_module_table(
        _count(vae_sd, r"encoder\.down_blocks\.(\d+)\."), _count(vae_sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    )
    out = {}
    for key, tensor in _rename_all(vae_sd, table, "VAE").items():
        if _VAE_CONV_ATTENTION.search(key) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + key] = tensor
    return out


def vae_from_ldm(ldm_vae_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` tensors (prefix stripped) -> diffusers VAE state dict."""
    table = vae_module_table(_count(ldm_vae_sd, r"encoder\.down\.(\d+)\."), _count(ldm_vae_sd, r"encoder\.down\.0\.block\.(\d+)\."))
    out = {}
    for key, tensor in ldm_vae_sd.items():
        if _VAE_CONV_ATTENTION.search(key) and tensor.ndim > 2:
            # [C, C, 1, 1] from ldm (some old files store [C, C, 1]) -> Linear [C, C]
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[key] = tensor
    return _rename_all(out, _inverted(table), "VAE")


# --------------------------------------------------------------------------------------------------
# Text encoders


def _without_text_model(te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 ``CLIPTextModel`` has no ``text_model.`` level; older versions (and
    ``CLIPTextModelWithProjection``) do. Accept both.

    ``position_ids`` is a buffer some versions save; it is derived, not learned, so it is dropped.
    """
    return {
        key.removeprefix("text_model."): tensor
        for key, tensor in te_sd.items()
        if not key.endswith("embeddings.position_ids")
    }


def openclip_module_table(num_layers: int) -> dict[str, str]:
    """HF ``CLIPTextModel`` path -> OpenCLIP path, except q/k/v which OpenCLIP fuses (see below)."""
    table = {
        "embeddings.token_embedding": "token_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",  # a bare Parameter in OpenCLIP
        "final_layer_norm": "ln_final",
    }
    for i in range(num_layers):
        hf, oc = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        table.update({
            f"{hf}.layer_norm1": f"{oc}.ln_1",
            f"{hf}.layer_norm2": f"{oc}.ln_2",
            f"{hf}.mlp.fc1": f"{oc}.mlp.c_fc",
            f"{hf}.mlp.fc2": f"{oc}.mlp.c_proj",
            f"{hf}.self_attn.out_proj": f"{oc}.attn.out_proj",
        })
    return table


_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
_OPENCLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
HF_PROJECTION = "text_projection.weight"
OPENCLIP_EXTRAS = ("text_projection", "logit_scale")
# OpenCLIP's logit scale as trained (ln 100); no image tower uses it here, the loaders only expect it.
_LOGIT_SCALE = 4.6052


def openclip_from_hf(te_sd: Mapping[str, torch.Tensor], *, repeat_last_block: bool) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text tower -> OpenCLIP names (without prefix), q/k/v fused into ``in_proj``.

    ``text_projection``: OpenCLIP stores the matrix P applied as ``x @ P`` ([width, projection]);
    a Hugging Face ``CLIPTextModelWithProjection`` stores ``Linear.weight`` = P transposed. Without a
    projection (SD2's diffusers text encoder has none) an unused identity is written, of the shape the
    loaders use to split ``in_proj``. ``repeat_last_block``: SD2's diffusers encoder keeps 23 of
    OpenCLIP-H's 24 blocks (SD2 conditions on the penultimate layer); loaders that expect the whole
    tower get what kohya writes, the last block copied once more.
    """
    te_sd = _without_text_model(te_sd)
    projection = te_sd.pop(HF_PROJECTION, None)
    num_layers = _count(te_sd, r"encoder\.layers\.(\d+)\.")
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in te_sd.items():
        match = _HF_QKV.match(key)
        if match:
            qkv.setdefault((int(match.group(1)), match.group(3)), {})[match.group(2)] = tensor
        else:
            rest[key] = tensor
    out = _rename_all(rest, openclip_module_table(num_layers), "text encoder")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if repeat_last_block:
        last = f"transformer.resblocks.{num_layers - 1}."
        for key in [k for k in out if k.startswith(last)]:
            out[f"transformer.resblocks.{num_layers}." + key[len(last):]] = out[key].clone()
    reference = out["token_embedding.weight"]
    out["text_projection"] = projection.t().contiguous() if projection is not None else torch.eye(reference.shape[1], dtype=reference.dtype)
    out["logit_scale"] = torch.tensor(_LOGIT_SCALE, dtype=reference.dtype)
    return out


def openclip_to_hf(openclip_sd: Mapping[str, torch.Tensor], *, num_layers: int | None, with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower tensors (prefix stripped) -> Hugging Face CLIP keys without ``text_model.``.

    Keeps the first ``num_layers`` blocks (the text encoder config's ``num_hidden_layers``; by default
    all but the last, which is what diffusers does with SD2's 24-block OpenCLIP-H tower).
    ``with_projection``: the tower becomes a ``CLIPTextModelWithProjection`` (SDXL's second encoder),
    whose ``text_projection.weight`` is OpenCLIP's ``text_projection`` transposed; otherwise the
    projection and ``logit_scale`` have no place and are dropped.
    """
    blocks = _count(openclip_sd, r"transformer\.resblocks\.(\d+)\.")
    keep = blocks - 1 if num_layers is None else num_layers
    if keep > blocks:
        raise CheckpointLayoutError(f"the OpenCLIP text encoder has {blocks} blocks, the config expects {keep}")
    out, rest = {}, {}
    for key, tensor in openclip_sd.items():
        block = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if (block and int(block.group(1)) >= keep) or key in OPENCLIP_EXTRAS:
            continue
        fused = _OPENCLIP_IN_PROJ.match(key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip("qkv", tensor.chunk(3), strict=True):
                out[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        else:
            rest[key] = tensor
    out.update(_rename_all(rest, _inverted(openclip_module_table(keep)), "text encoder"))
    if with_projection:
        if "text_projection" not in openclip_sd:
            raise CheckpointLayoutError("the OpenCLIP text encoder has no text_projection, which SDXL's pooled prompt needs")
        out[HF_PROJECTION] = openclip_sd["text_projection"].t().contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# Whole checkpoints: one layout per model family


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where a single file keeps one text encoder, and in which naming."""

    component: str  # the diffusers component it becomes ("text_encoder", "text_encoder_2")
    prefix: str  # read prefix
    openclip: bool  # OpenCLIP names with fused q/k/v; else Hugging Face CLIP names
    # Hugging Face encoders are read with or without ``text_model.`` (older files) but always written
    # with it: diffusers recognises an SD1 text encoder only by a ``...transformer.text_model.`` key.
    write_prefix: str = ""
    repeat_last_block: bool = False  # OpenCLIP: see openclip_from_hf
    with_projection: bool = False  # OpenCLIP: see openclip_to_hf

    def to_file(self, te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.openclip:
            tensors = openclip_from_hf(te_sd, repeat_last_block=self.repeat_last_block)
        else:
            tensors = _without_text_model(te_sd)
        return {(self.write_prefix or self.prefix) + key: tensor for key, tensor in tensors.items()}

    def from_file(self, tensors: Mapping[str, torch.Tensor], num_layers: int | None) -> dict[str, torch.Tensor]:
        if self.openclip:
            return openclip_to_hf(tensors, num_layers=num_layers, with_projection=self.with_projection)
        return _without_text_model(tensors)


SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

# The single-file layouts: the original SD1 (ldm), SD2 (ldm with OpenCLIP-H) and SDXL (Stability's
# generative-models, "SGM") code. UNet and VAE are named alike in all three (the UNet table follows
# the config); the text encoders differ (docs/formats.md#single-file-checkpoints).
TEXT_LAYOUTS: dict[str, tuple[TextEncoderLayout, ...]] = {
    "sd1": (TextEncoderLayout("text_encoder", SD1_TEXT_PREFIX, openclip=False, write_prefix=SD1_TEXT_PREFIX + "text_model."),),
    "sd2": (TextEncoderLayout("text_encoder", SD2_TEXT_PREFIX, openclip=True, repeat_last_block=True),),
    "sdxl": (
        TextEncoderLayout("text_encoder", SDXL_TEXT_PREFIXES[0], openclip=False, write_prefix=SDXL_TEXT_PREFIXES[0] + "text_model."),
        TextEncoderLayout("text_encoder_2", SDXL_TEXT_PREFIXES[1], openclip=True, with_projection=True),
    ),
}


def detect_layout(keys) -> str:
    """Which layout a checkpoint's keys are in, told by its text encoders (as AUTOMATIC1111 and diffusers
    tell them). Raises ``CheckpointLayoutError`` saying what is there when it is none of them."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("conditioner.embedders."):
        if has(SDXL_TEXT_PREFIXES[0]) and has(SDXL_TEXT_PREFIXES[1]):
            return "sdxl"
        present = sorted({".".join(key.split(".")[:3]) for key in keys if key.startswith("conditioner.embedders.")})
        raise CheckpointLayoutError(
            f"SDXL-style text encoders but not both of them (found {', '.join(present)}; an SDXL base needs "
            f"{SDXL_TEXT_PREFIXES[0]}* (CLIP-L) and {SDXL_TEXT_PREFIXES[1]}* (OpenCLIP-G); the SDXL refiner has only the second)"
        )
    if has(SD2_TEXT_PREFIX):
        return "sd2"
    if has(SD1_TEXT_PREFIX):
        return "sd1"
    raise CheckpointLayoutError("no text encoder (no cond_stage_model.* or conditioner.embedders.* tensors)")


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}


def to_single_file(components: Mapping[str, Mapping[str, torch.Tensor]], *, unet_config: Mapping, layout: str) -> dict[str, torch.Tensor]:
    """One single-file state dict from the diffusers state dicts ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``.

    Tensors are not copied (except SD2's repeated last block and the small OpenCLIP extras).
    """
    out = {**unet_to_ldm(components["unet"], unet_config), **vae_to_ldm(components["vae"])}
    for text in TEXT_LAYOUTS[layout]:
        out.update(text.to_file(components[text.component]))
    return out


def from_single_file(
    state_dict: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping,
    layout: str,
    text_encoder_layers: Mapping[str, int] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers state dicts ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}`` of a single file.

    Only the model parts are read: EMA copies (``model_ema.*``, as diffusers we take the regular
    weights), noise-schedule buffers and other extras of training checkpoints are ignored. Text
    encoder keys come without ``text_model.`` (transformers >= 5 ``CLIPTextModel``).
    ``text_encoder_layers``: per component, how many OpenCLIP blocks to keep (see ``openclip_to_hf``).
    """
    parts = {"UNet": _strip(state_dict, UNET_PREFIX), "VAE": _strip(state_dict, VAE_PREFIX)}
    for text in TEXT_LAYOUTS[layout]:
        parts[f"text encoder ({text.prefix}*)"] = _strip(state_dict, text.prefix)
    missing = [name for name, tensors in parts.items() if not tensors]
    if missing:
        raise CheckpointLayoutError(f"no {' and no '.join(missing)} tensors")
    components = {"unet": unet_from_ldm(parts["UNet"], unet_config), "vae": vae_from_ldm(parts["VAE"])}
    for text in TEXT_LAYOUTS[layout]:
        layers = (text_encoder_layers or {}).get(text.component)
        components[text.component] = text.from_file(parts[f"text encoder ({text.prefix}*)"], layers)
    return components


def save_single_file(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], dtype: torch.dtype) -> Path:
    """Write a single-file state dict atomically, floating-point tensors cast to ``dtype``.

    fp16 is what the UIs share; float32 is a lossless copy. ``header`` values must be strings.
    """
    wrong = [key for key, value in header.items() if not isinstance(value, str)]
    if wrong:
        raise TypeError(f"safetensors metadata values must be strings: {', '.join(wrong)}")
    tensors = {
        key: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for key, tensor in tensors.items()
    }
    # save_file streams the tensors to disk: a full checkpoint is gigabytes, too much to build in memory first.
    return write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=dict(header)))
