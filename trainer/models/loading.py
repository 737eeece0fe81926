"""Load a base model from a local source, never from the network, and tell its model family.

``model.base`` may be a built-in model (``tiny``, ``tiny-sdxl``, ``toy``), a diffusers folder, a
single-file ``.safetensors`` (or ``.ckpt``) checkpoint in the original SD1/SD2/SDXL layout, or a hub
id already in the local Hugging Face cache. For benchmarks, ``random:<config>`` builds a packaged
architecture (``trainer/models/configs``: ``sd1``, ``sd2``, ``sd2-base``, ``sdxl``) with seeded random
weights: real sizes and speeds, meaningless images.

The family is found before any weight is read (``locate_base``): a diffusers folder's pipeline class
and text-encoder width, a single file's key layout. ``model.family`` overrides it only where that
evidence cannot decide (an SD pipeline with text encoders of unusual width); contradicting decisive
evidence is an error that names both.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

from trainer.errors import UserError
from trainer.families import AUTO, all_families, family_named
from trainer.families.base import PACKAGED_CONFIGS
from trainer.formats.ldm_checkpoint import CheckpointLayoutError, detect_layout
from trainer.formats.safetensors_file import stored_float_dtype
from trainer.models.base_model import BaseModel, TextEncoder
from trainer.models.conversion import move_part
from trainer.models.single_file import (
    load_single_file,
    load_vae_file,
    read_safetensors_keys,
    read_state_dict,
    text_encoder_class,
    what_else,
)
from trainer.models.text import fix_pooling
from trainer.models.tokenizer import clip_tokenizer

RANDOM_PREFIX = "random:"
RANDOM_SEED = 20261126


@dataclass
class BaseSource:
    """Where ``model.base`` points and which family it is, found without loading the model."""

    base: str
    family: object  # trainer.families.base.ModelFamily
    kind: str  # "builtin", "random", "folder" or "single_file"
    name: str  # a short name for metadata (file or folder name)
    # How the family was told, for messages; decisive evidence rules every other family out.
    evidence: str
    decisive: bool = True
    path: Path | None = None
    # A single file's tensors, once read (pickles have no cheap header).
    tensors: dict | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)


def _builtin_families() -> dict[str, object]:
    return {name: family for family in all_families() for name in family.builtin_bases}


def builtin_base_names() -> list[str]:
    """The built-in bases' names (each family lists its own)."""
    return list(_builtin_families())


def _random_families() -> dict[str, object]:
    return {config: family for family in all_families() for config in dict.fromkeys(family.packaged_configs.values())}


def _looks_like_hub_id(base: str) -> bool:
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(base)


def _hub_snapshot(base: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except Exception as err:
        raise UserError(
            f"model.base '{base}' is neither a file nor a folder, and no copy of the hub repository '{base}' is in the "
            f"local Hugging Face cache ({err.__class__.__name__}). sdtrain never downloads: download it on a machine with "
            "network access, or set model.base to 'tiny', a diffusers folder or a .safetensors file."
        ) from None


def _folder_family(path: Path, base: str) -> tuple[object, str, bool]:
    """(family, evidence, decisive) of a diffusers pipeline folder."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(
            f"model.base '{base}' is a folder but not a diffusers pipeline (no model_index.json). "
            "Point it at a folder written by save_pretrained or 'sdtrain base tiny DIR', or at a single .safetensors file."
        )
    try:
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as err:
        raise UserError(f"model.base '{base}': '{index_file}' cannot be read ({err.__class__.__name__}). Check that the folder is complete.") from None
    candidates = [family for family in all_families() if family.pipeline_class_name == class_name]
    if not candidates:
        known = ", ".join(sorted({family.pipeline_class_name for family in all_families()}))
        raise UserError(f"model.base '{base}' is a {class_name} folder; sdtrain trains {known} models.")
    if len(candidates) == 1:
        return candidates[0], f"a {class_name} folder", True
    width = None
    config_file = path / candidates[0].text_encoders[0].component / "config.json"
    if config_file.is_file():
        width = json.loads(config_file.read_text(encoding="utf-8")).get("hidden_size")
    for family in candidates:
        if family.text_widths[0] == width:
            return family, f"a {class_name} folder with a {width}-wide text encoder", True
    return candidates[0], f"a {class_name} folder with a {width}-wide text encoder (no real model's width)", False


def _file_family(path: Path, base: str, allow_unsafe_pickle: bool) -> BaseSource:
    if path.suffix.lower() == ".safetensors":
        keys, metadata = read_safetensors_keys(path, "model.base")
        tensors = None
    else:
        # A pickle has no cheap header: read once, kept for loading. Unknown extensions are refused there.
        tensors, metadata = read_state_dict(path, allow_unsafe_pickle)
        keys = list(tensors)
    other = what_else(keys)
    if other:
        raise UserError(f"model.base '{path}' is {other}. Set model.base to a full SD1.x/SD2.x/SDXL checkpoint or a diffusers folder.")
    try:
        layout = detect_layout(keys)
    except CheckpointLayoutError as err:
        raise UserError(f"model.base '{path}' has {err}; sdtrain needs a full checkpoint (UNet, VAE and text encoders). Use a full SD1.x/SD2.x/SDXL checkpoint or a diffusers folder.") from None
    family = next(family for family in all_families() if family.single_file_layout == layout)
    return BaseSource(base, family, "single_file", path.stem, f"a single file in the {layout} layout", path=path, tensors=tensors, metadata=metadata)


def locate_base(base: str, family: str = AUTO, allow_unsafe_pickle: bool = False) -> BaseSource:
    """Where ``base`` (``model.base``) is and which family it is; ``family`` is ``model.family``.

    Reads no weights except a pickled single file's (which has no cheap header).
    """
    builtins = _builtin_families()
    if base in builtins:
        source = BaseSource(base, builtins[base], "builtin", f"sdtrain-{base}", f"the built-in '{base}' model")
    elif base.startswith(RANDOM_PREFIX):
        config = base[len(RANDOM_PREFIX):]
        randoms = _random_families()
        if config not in randoms:
            choices = ", ".join(f"'{RANDOM_PREFIX}{name}' ({f.title})" for name, f in randoms.items())
            raise UserError(f"model.base '{base}' names no packaged architecture; use {choices}.")
        source = BaseSource(base, randoms[config], "random", f"sdtrain-random-{config}", f"the packaged {config} architecture")
    elif Path(base).is_dir():
        found, evidence, decisive = _folder_family(Path(base), base)
        source = BaseSource(base, found, "folder", Path(base).resolve().name, evidence, decisive, path=Path(base))
    elif Path(base).is_file():
        source = _file_family(Path(base), base, allow_unsafe_pickle)
    elif _looks_like_hub_id(base):
        path = _hub_snapshot(base)
        found, evidence, decisive = _folder_family(path, base)
        source = BaseSource(base, found, "folder", base.split("/")[-1], f"{evidence} in the local Hugging Face cache", decisive, path=path)
    else:
        builtin = ", ".join(f"'{name}'" for name in builtins)
        raise UserError(
            f"model.base '{base}' does not exist. Use a built-in model ({builtin}), a diffusers folder, a single-file "
            ".safetensors checkpoint, a hub id already in the local Hugging Face cache, or for benchmarks "
            f"'{RANDOM_PREFIX}sd1' (or another packaged architecture): that architecture with random weights."
        )
    if family == AUTO or family == source.family.name:
        return source
    wanted = family_named(family)
    if source.decisive or wanted.pipeline_class_name != source.family.pipeline_class_name:
        raise UserError(
            f"Recipe key 'model.family' is '{family}' ({wanted.title}), but model.base '{base}' is {source.evidence}: a "
            f"{source.family.title} model. Remove model.family (auto finds it), or point model.base at a {wanted.title} model."
        )
    source.family, source.evidence = wanted, f"{source.evidence}, read as {wanted.title} (model.family)"
    return source


def _set_prediction_type(scheduler: DDPMScheduler, prediction_type: str) -> DDPMScheduler:
    if prediction_type == "auto":
        return scheduler
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"Recipe key 'model.prediction_type' is '{prediction_type}'; use 'auto', 'epsilon' or 'v_prediction'.")
    return DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)


def training_scheduler(scheduler_config) -> DDPMScheduler:
    # Whatever scheduler a pipeline ships for sampling, training uses DDPM with its betas.
    config = dict(scheduler_config)
    config["clip_sample"] = False
    return DDPMScheduler.from_config(config)


# A component's weight files as from_pretrained names them: plain or a variant's ("fp16"), whole or sharded.
_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.(?P<variant>\w+))?(?:-\d+-of-\d+)?\.safetensors$")


def _weight_files(folder: Path) -> dict[str | None, list[Path]]:
    """A component folder's .safetensors weight files by variant (None: the plain ones)."""
    files: dict[str | None, list[Path]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        match = _WEIGHT_FILE.match(path.name)
        if match:
            files.setdefault(match["variant"], []).append(path)
    return files


def _folder_loading(folders: dict[str, Path]) -> tuple[str | None, dict[str, torch.dtype]]:
    """(variant, dtypes) for from_pretrained of the model folders named in ``folders`` (a pipeline's components).

    The variant is the one held by the folders that have no plain weight files (a model downloaded with
    variant="fp16" has only those; the first by name if there are several); from_pretrained then reads it
    wherever a folder has it. Each folder loads in the one dtype its files store, so nothing is widened while
    loading and an fp32 file stays mapped: load_base_model's move_part then converts tensor by tensor, giving
    the file's pages back (docs/benchmarks.md). Files that mix dtypes, or are not safetensors, load in fp32.
    """
    weights = {name: _weight_files(folder) for name, folder in folders.items()}
    variants = sorted({variant for files in weights.values() if None not in files for variant in files})
    variant = variants[0] if variants else None
    dtypes = {}
    for name, files in weights.items():
        read = files.get(variant) or files.get(None)
        dtypes[name] = (stored_float_dtype(read, "model weight file") if read else None) or torch.float32
    return variant, dtypes


def _from_pretrained(loader, folder: Path, **kwargs):
    """``loader(folder, local_files_only=True, **kwargs)``. diffusers 0.42 deprecates ``torch_dtype`` for ``dtype``,
    which the oldest diffusers sdtrain supports (0.35) does not take: the old name, without the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        return loader(str(folder), local_files_only=True, **kwargs)


def _folder_parts(source: BaseSource, components: Collection[str]) -> dict:
    family = source.family
    variant, dtypes = _folder_loading({component: source.path / component for component in components})
    try:
        pipe = _from_pretrained(
            family.pipeline_class().from_pretrained, source.path, variant=variant, torch_dtype={"default": torch.float32, **dtypes},
            **family.folder_loading_extras(),
        )
    except Exception as err:  # diffusers raises many types for a broken folder
        raise UserError(f"model.base '{source.base}' could not be loaded as a {family.pipeline_class_name} folder: {err}. Check that the folder is complete.") from err
    parts = {name: component for name, component in pipe.components.items() if component is not None}
    parts["scheduler"] = training_scheduler(pipe.scheduler.config)
    return parts


def _random_parts(source: BaseSource) -> dict:
    """The packaged architecture with seeded random weights."""
    family = source.family
    config_dir = PACKAGED_CONFIGS / source.base[len(RANDOM_PREFIX):]
    parts = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_dir), subfolder="unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir), subfolder="vae"))
        for spec in family.text_encoders:
            parts[spec.component] = text_encoder_class(spec)(CLIPTextConfig.from_json_file(config_dir / spec.component / "config.json"))
    for spec in family.text_encoders:
        parts[spec.tokenizer_component] = clip_tokenizer(pad_token=spec.pad_token)
    for name in ("unet", "vae", *(spec.component for spec in family.text_encoders)):
        parts[name].eval()
    parts["scheduler"] = training_scheduler(DDPMScheduler.load_config(str(config_dir), subfolder="scheduler"))
    return parts


def _load_vae(vae: str, base_vae: AutoencoderKL, family, allow_unsafe_pickle: bool) -> AutoencoderKL:
    """``model.vae``: a VAE folder (or a pipeline folder's vae/) or a single VAE file, for this model's architecture."""
    path = Path(vae)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"model.vae '{vae}' is a folder without a VAE config.json (nor a vae/ subfolder). Point it at a diffusers VAE folder or a .safetensors VAE file.")
        variant, dtypes = _folder_loading({"vae": folder})
        try:
            loaded = _from_pretrained(AutoencoderKL.from_pretrained, folder, variant=variant, torch_dtype=dtypes["vae"])
        except Exception as err:
            raise UserError(f"model.vae '{vae}' could not be loaded as a diffusers VAE: {err}.") from None
        expected, got = base_vae.config, loaded.config
        if (got.latent_channels, len(got.block_out_channels)) != (expected.latent_channels, len(expected.block_out_channels)):
            raise UserError(
                f"model.vae '{vae}' has {got.latent_channels} latent channels and {len(got.block_out_channels)} levels; this "
                f"{family.title} model's VAE has {expected.latent_channels} and {len(expected.block_out_channels)}: it is a VAE of "
                "another model family. Use a VAE made for this model (or leave model.vae unset)."
            )
        return loaded.eval()
    if path.is_file():
        return load_vae_file(path, dict(base_vae.config), family.title, allow_unsafe_pickle)
    raise UserError(f"model.vae '{vae}' does not exist. Set it to a diffusers VAE folder or a .safetensors VAE file, or remove it.")


def _check_config_family(source: BaseSource, config: Path) -> None:
    """``model.config`` must describe a model of the single file's family (where its folder can tell)."""
    if not (config / "model_index.json").is_file():
        return  # a folder of bare configs: the strict load reports any mismatch, part by part
    described, evidence, decisive = _folder_family(config, str(config))
    if decisive and described is not source.family:
        raise UserError(
            f"model.base '{source.base}' is a {source.family.title} checkpoint ({source.evidence}), but model.config "
            f"'{config}' describes a {described.title} model ({evidence}). Set model.config to the diffusers folder of the "
            "model this file was made from (or of the same architecture), or leave it unset."
        )


def load_base_model(
    base: str | BaseSource,
    *,
    config: str | None = None,
    family: str = AUTO,
    prediction_type: str = "auto",
    vae: str | None = None,
    vae_fp32: bool | None = None,
    allow_unsafe_pickle: bool = False,
    frozen_dtype: torch.dtype = torch.float32,
    full_precision_parts: Collection[str] = (),
) -> BaseModel:
    """Load ``model.base`` (or an already located source); raises ``UserError`` with the fix when it cannot be read.

    The parts load frozen (no gradients) in ``frozen_dtype`` (a run's compute dtype under mixed precision), but
    those ``full_precision_parts`` names ("unet", "text_encoders", "vae") and a VAE kept in fp32 (``vae_fp32``)
    load in fp32. A single file's tensors are read straight into their part's dtype, and a folder's components
    load in the dtype their files store, so a half-precision model is never widened to fp32 first; then each part
    converts tensor by tensor (trainer.models.conversion).
    """
    source = base if isinstance(base, BaseSource) else locate_base(base, family, allow_unsafe_pickle)
    found = source.family
    vae_fp32 = found.vae_fp32_by_default if vae_fp32 is None else vae_fp32
    roles = {"unet": "unet", "vae": "vae", **{spec.component: "text_encoders" for spec in found.text_encoders}}
    dtypes = {
        component: torch.float32 if role in full_precision_parts or (role == "vae" and vae_fp32) else frozen_dtype
        for component, role in roles.items()
    }
    if source.kind == "builtin":
        built = found.builtin(source.base)
        parts = built if isinstance(built, dict) else _folder_parts(BaseSource(source.base, found, "folder", source.name, source.evidence, path=built), dtypes)
    elif source.kind == "random":
        parts = _random_parts(source)
    elif source.kind == "folder":
        parts = _folder_parts(source, dtypes)
    else:
        if config:
            _check_config_family(source, Path(config))
        tensors, metadata = (source.tensors, source.metadata) if source.tensors is not None else read_state_dict(source.path, allow_unsafe_pickle)
        source.tensors = None  # the loaded model holds the weights now
        parts = load_single_file(source.path, found, tensors, metadata, Path(config) if config else None, dtypes)
    if vae is not None:
        parts["vae"] = _load_vae(vae, parts["vae"], found, allow_unsafe_pickle)
    for component, dtype in dtypes.items():
        parts[component].requires_grad_(False)
        move_part(parts[component], None, dtype)
    text_encoders = []
    for spec in found.text_encoders:
        fix_pooling(parts[spec.component], parts[spec.tokenizer_component])
        text_encoders.append(TextEncoder(spec, parts[spec.tokenizer_component], parts[spec.component]))
    return BaseModel(
        family=found,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=text_encoders,
        noise_scheduler=_set_prediction_type(parts["scheduler"], prediction_type),
        source=source.base,
        name=source.name,
        vae_fp32=vae_fp32,
    )


def load_recipe_model(
    model_cfg, source: BaseSource | None = None, frozen_dtype: torch.dtype = torch.float32, full_precision_parts: Collection[str] = ()
) -> BaseModel:
    """The base model a recipe's ``model`` section describes (``frozen_dtype``, ``full_precision_parts``: load_base_model)."""
    return load_base_model(
        source or model_cfg.base,
        config=model_cfg.config,
        family=model_cfg.family,
        prediction_type=model_cfg.prediction_type,
        vae=model_cfg.vae,
        vae_fp32=model_cfg.vae_fp32,
        allow_unsafe_pickle=model_cfg.allow_unsafe_pickle,
        frozen_dtype=frozen_dtype,
        full_precision_parts=full_precision_parts,
    )
