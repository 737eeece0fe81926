"""Stable Diffusion 1.x/2.x weights: diffusers layout <-> the original ("ldm") single-file layout.

AUTOMATIC1111, ComfyUI and every model site exchange SD1/SD2 models as one ``.safetensors`` file in
the layout of the original CompVis/Stability code; our models live in diffusers' layout. The
conversion is a rename of *modules* (a parameter keeps its last name part), written here as tables:

* UNet (``model.diffusion_model.*``): built from the UNet config - how many down/up blocks, how many
  layers per block, which blocks have attention - so the same code serves the built-in tiny model,
  SD1.5 and SD2.1 (docs/formats.md#unet-module-paths). The tensors themselves are never changed.
* VAE (``first_stage_model.*``): built from the block counts found in the keys. The mid-block
  attention's q/k/v/proj_out are 1x1 convolutions in ldm and Linear layers in diffusers, so those
  weights are reshaped ``[C, C] <-> [C, C, 1, 1]``.
* Text encoder: SD1 keeps Hugging Face CLIP names under ``cond_stage_model.transformer.text_model.``;
  SD2 uses OpenCLIP names under ``cond_stage_model.model.`` with q/k/v fused into ``in_proj``
  (docs/formats.md#vae-and-text-encoders).

Each table is used in both directions, so diffusers -> ldm -> diffusers is exact by construction;
the tests check the names against diffusers' own ldm -> diffusers converter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.atomic import write_file
from trainer.formats.safetensors_file import modelspec

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
# What SD1 files contain; read without ``text_model.`` too (older files), but always written with it:
# diffusers recognises an SD1 text encoder only by a ``...transformer.text_model.`` key.
SD1_TEXT_WRITE_PREFIX = SD1_TEXT_PREFIX + "text_model."


class CheckpointLayoutError(ValueError):
    """A state dict is not in the layout the conversion expects (unknown, missing or extra tensors).

    Loaders turn it into a ``UserError`` that names the file; the message says which tensors.
    """


# --------------------------------------------------------------------------------------------------
# Renaming by module-path tables


def _rename(key: str, table: Mapping[str, str]) -> str | None:
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
        new_key = _rename(key, table)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = tensor
    if unknown:
        raise CheckpointLayoutError(
            f"{len(unknown)} {component} tensor(s) have no place in the SD1/SD2 layout, e.g. {', '.join(unknown[:3])}"
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
    """diffusers module path -> ldm module path for an SD1.x/SD2.x ``UNet2DConditionModel`` config.

    ldm numbers the UNet as flat ``input_blocks``/``output_blocks`` lists: each down block
    contributes ``layers_per_block`` entries (resnet at ``.0``, attention at ``.1``) plus one
    downsampler entry (``.0.op``); each up block ``layers_per_block + 1`` entries, its upsampler
    sharing the last entry after the attention (``.2.conv``) or after the resnet (``.1.conv``).
    Transformer internals (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...) are named alike.
    """
    down_types, up_types = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    per_block = unet_config["layers_per_block"]
    unsupported = [
        *(t for t in down_types if t not in _SD_DOWN_BLOCKS),
        *(t for t in up_types if t not in _SD_UP_BLOCKS),
    ]
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in (None, "UNetMidBlock2DCrossAttn"):
        unsupported.append(unet_config["mid_block_type"])
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        unsupported.append("class/addition embeddings (SDXL or an upscaler)")
    if unsupported or not isinstance(per_block, int) or len(down_types) != len(up_types):
        raise CheckpointLayoutError(f"not an SD1.x/SD2.x UNet config ({', '.join(map(str, unsupported)) or 'layers_per_block'})")

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
    """transformers >= 5 ``CLIPTextModel`` has no ``text_model.`` level; older versions do. Accept both.

    ``position_ids`` is a buffer some versions save; it is derived, not learned, so it is dropped.
    """
    return {
        key.removeprefix("text_model."): tensor
        for key, tensor in te_sd.items()
        if not key.endswith("embeddings.position_ids")
    }


def sd1_text_encoder_to_ldm(te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP-L state dict -> ``cond_stage_model.transformer.text_model.*`` (names unchanged)."""
    return {SD1_TEXT_WRITE_PREFIX + key: tensor for key, tensor in _without_text_model(te_sd).items()}


def sd1_text_encoder_from_ldm(ldm_te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cond_stage_model.transformer.*`` tensors (prefix stripped) -> CLIPTextModel keys without ``text_model.``."""
    return _without_text_model(ldm_te_sd)


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


def sd2_text_encoder_to_ldm(te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD2 text encoder -> OpenCLIP-H ``cond_stage_model.model.*``.

    diffusers keeps 23 of OpenCLIP's 24 blocks (SD2 conditions on the penultimate layer) and no
    projection. Loaders that expect the whole OpenCLIP tower get what kohya writes: the last block
    copied once more, plus an unused ``text_projection`` (identity here, of the shape diffusers uses
    to split ``in_proj``) and ``logit_scale``.
    """
    te_sd = _without_text_model(te_sd)
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

    last = f"transformer.resblocks.{num_layers - 1}."
    for key in [k for k in out if k.startswith(last)]:
        out[f"transformer.resblocks.{num_layers}." + key[len(last):]] = out[key].clone()
    reference = out["token_embedding.weight"]
    width = reference.shape[1]
    out["text_projection"] = torch.eye(width, dtype=reference.dtype)
    out["logit_scale"] = torch.tensor(1.0, dtype=reference.dtype)
    return {SD2_TEXT_PREFIX + key: tensor for key, tensor in out.items()}


def sd2_text_encoder_from_ldm(ldm_te_sd: Mapping[str, torch.Tensor], num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP ``cond_stage_model.model.*`` tensors (prefix stripped) -> diffusers CLIPTextModel keys.

    Keeps the first ``num_layers`` blocks (the text encoder config's ``num_hidden_layers``); by
    default all but the last, which is what diffusers does with a full 24-block OpenCLIP-H tower.
    ``text_projection`` and ``logit_scale`` have no place in ``CLIPTextModel`` and are dropped.
    """
    blocks = _count(ldm_te_sd, r"transformer\.resblocks\.(\d+)\.")
    keep = blocks - 1 if num_layers is None else num_layers
    if keep > blocks:
        raise CheckpointLayoutError(f"the OpenCLIP text encoder has {blocks} blocks, the config expects {keep}")
    out, rest = {}, {}
    for key, tensor in ldm_te_sd.items():
        block = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if (block and int(block.group(1)) >= keep) or key in ("text_projection", "logit_scale"):
            continue
        fused = _OPENCLIP_IN_PROJ.match(key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip("qkv", tensor.chunk(3), strict=True):
                out[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        else:
            rest[key] = tensor
    out.update(_rename_all(rest, _inverted(openclip_module_table(keep)), "text encoder"))
    return out


# --------------------------------------------------------------------------------------------------
# Whole checkpoints


def is_sd2_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """SD2 if the text encoder is OpenCLIP (``cond_stage_model.model.*``), SD1 if it is HF CLIP.

    The text encoder decides, as in AUTOMATIC1111 and diffusers
    (docs/formats.md#how-loaders-tell-sd1-from-sd2); the UNet is the same family either way. Raises ``CheckpointLayoutError`` when neither is present.
    """
    if any(key.startswith(SD2_TEXT_PREFIX) for key in state_dict):
        return True
    if any(key.startswith(SD1_TEXT_PREFIX) for key in state_dict):
        return False
    raise CheckpointLayoutError("no text encoder (neither cond_stage_model.transformer.* nor cond_stage_model.model.* tensors)")


def diffusers_to_ldm(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping,
    is_v2: bool,
) -> dict[str, torch.Tensor]:
    """One original-layout state dict from the three diffusers state dicts (tensors are not copied)."""
    text = sd2_text_encoder_to_ldm(text_encoder_sd) if is_v2 else sd1_text_encoder_to_ldm(text_encoder_sd)
    return {**unet_to_ldm(unet_sd, unet_config), **vae_to_ldm(vae_sd), **text}


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping,
    is_v2: bool,
    text_encoder_layers: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(unet, vae, text_encoder) diffusers state dicts from an original-layout checkpoint.

    Only the three model parts are read: EMA copies (``model_ema.*``, as diffusers we take the
    regular weights), noise-schedule buffers and other extras of training checkpoints are ignored.
    Text encoder keys come without ``text_model.`` (transformers >= 5 ``CLIPTextModel``).
    ``text_encoder_layers``: see ``sd2_text_encoder_from_ldm`` (SD2 only).
    """
    parts = {
        "UNet": _strip(state_dict, UNET_PREFIX),
        "VAE": _strip(state_dict, VAE_PREFIX),
        "text encoder": _strip(state_dict, SD2_TEXT_PREFIX if is_v2 else SD1_TEXT_PREFIX),
    }
    missing = [name for name, tensors in parts.items() if not tensors]
    if missing:
        raise CheckpointLayoutError(f"no {' and no '.join(missing)} tensors")
    text = (
        sd2_text_encoder_from_ldm(parts["text encoder"], text_encoder_layers)
        if is_v2
        else sd1_text_encoder_from_ldm(parts["text encoder"])
    )
    return unet_from_ldm(parts["UNet"], unet_config), vae_from_ldm(parts["VAE"]), text


# --------------------------------------------------------------------------------------------------
# Writing a single-file checkpoint

MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def modelspec_architecture(is_v2: bool, prediction_type: str) -> str:
    """ModelSpec architecture id (docs/formats.md#modelspec); SD1 has one id whatever it predicts."""
    if not is_v2:
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"


def save_single_file(
    path: Path,
    unet,
    vae,
    text_encoder,
    *,
    is_v2: bool,
    prediction_type: str = "epsilon",
    dtype: torch.dtype = torch.float16,
    title: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write UNet + VAE + text encoder as one original-layout ``.safetensors`` file, atomically.

    Floating-point tensors are cast to ``dtype`` (fp16 is what the UIs share; pass float32 for a
    lossless copy). The header carries Stability AI ModelSpec keys so UIs show the architecture and
    prediction type; ``metadata`` adds or overrides keys (values must be strings).
    Returns the path written.
    """
    path = Path(path)
    state_dict = diffusers_to_ldm(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), unet_config=unet.config, is_v2=is_v2
    )
    tensors = {
        key: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for key, tensor in state_dict.items()
    }
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    header = modelspec(
        modelspec_architecture(is_v2, prediction_type),
        MODELSPEC_IMPLEMENTATION,
        title or path.stem,
        resolution,
        prediction_type,
    )
    header.update(metadata or {})
    wrong = [key for key, value in header.items() if not isinstance(value, str)]
    if wrong:
        raise TypeError(f"safetensors metadata values must be strings: {', '.join(wrong)}")
    # save_file streams the tensors to disk: a full checkpoint is gigabytes, too much to build in memory first.
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
