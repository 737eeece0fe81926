"""Textual Inversion embeddings as the UIs read them (docs/formats.md#textual-inversion-embeddings).

Every format stores the vectors 2-D, ``[n_vectors, dim]`` (dim 768 for SD1, 1024 for SD2; SDXL has one
table per text encoder, 768 and 1280 wide):

- ``a1111``: ``{"emb_params": vectors}`` as ``.safetensors`` (kohya's layout). AUTOMATIC1111 and ComfyUI
  accept any single-tensor file and take the prompt word from the file name; diffusers needs ``token=``.
  A model with several text encoders (SDXL) gets one tensor per encoder, ``{"clip_l": …, "clip_g": …}``,
  the layout AUTOMATIC1111, ComfyUI and kohya share.
- ``a1111_pt``: AUTOMATIC1111's own pickle, ``{"string_to_token", "string_to_param": {"*": vectors},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}``, in torch's legacy (non-zip) serialisation:
  AUTOMATIC1111's safe unpickler rejects the extra members of torch's zip format
  (docs/formats.md#pickles-automatic1111-accepts), and ``torch.load(weights_only=True)`` (ComfyUI,
  diffusers) reads both. diffusers takes the token from ``name``.
- ``diffusers``: ``{token: vectors}`` as ``learned_embeds.safetensors``, what diffusers' own training
  script writes; ``load_textual_inversion`` takes the token from the key. With two text encoders, the
  second's vectors go to ``learned_embeds_2.safetensors`` (diffusers' SDXL script does the same) and are
  loaded with ``text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.atomic import write_legacy_torch_file
from trainer.errors import UserError
from trainer.formats.safetensors_file import iso_now, modelspec, read_safetensors, save_safetensors

EMB_PARAMS = "emb_params"
# AUTOMATIC1111 always writes this (the id of "*" in CLIP's vocabulary); no loader reads it.
A1111_STRING_TO_TOKEN = {"*": 265}
DIFFUSERS_FILE_NAME = "learned_embeds.safetensors"
# Kohya's implementation id for Textual Inversion files (docs/formats.md#modelspec).
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


# Text-encoder keys of multi-encoder embedding files (SDXL's CLIP-L and OpenCLIP-bigG).
ENCODER_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    """An embedding read from any of the formats."""

    # [n_vectors, dim] per text-encoder key; a single-table file's under None (it fits a one-encoder model).
    vectors: dict[str | None, torch.Tensor]
    token: str | None  # the word the file names, if it names one (A1111 .pt "name", diffusers key)
    metadata: dict

    def for_encoder(self, key: str, encoders: int, path: Path) -> torch.Tensor:
        """The vectors for the text encoder ``key`` of a model with ``encoders`` text encoders."""
        if key in self.vectors:
            return self.vectors[key]
        if None in self.vectors and encoders == 1:
            return self.vectors[None]
        have = ", ".join(str(k) for k in self.vectors) if None not in self.vectors else "one table"
        raise UserError(
            f"The embedding '{path}' holds vectors for {have}, but this model has {encoders} text encoder(s) and needs '{key}': "
            "it was trained for another model family."
        )


def _plain(vectors: torch.Tensor) -> torch.Tensor:
    if vectors.dim() != 2:
        raise ValueError(f"embedding vectors must be [n_vectors, dim], got shape {tuple(vectors.shape)}")
    # A plain, contiguous CPU tensor: no Parameter class or autograd state ends up in a pickle.
    return vectors.detach().cpu().contiguous().clone()


def save_a1111_safetensors(path: Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``vectors`` by text-encoder key (``clip_l``, ``clip_g``); one encoder's are stored as ``emb_params``."""
    if len(vectors) == 1:
        (single,) = vectors.values()
        return save_safetensors(path, {EMB_PARAMS: _plain(single)}, metadata)
    return save_safetensors(path, {key: _plain(value) for key, value in vectors.items()}, metadata)


def diffusers_file_name(component: str) -> str:
    """``learned_embeds.safetensors`` for the first text encoder, ``learned_embeds_2.safetensors`` for ``text_encoder_2``."""
    return DIFFUSERS_FILE_NAME.replace(".safetensors", component.removeprefix("text_encoder") + ".safetensors")


def save_a1111_pt(path: Path, vectors: torch.Tensor, *, name: str, step: int, sd_checkpoint_name: str, sd_checkpoint: str | None = None) -> Path:
    """AUTOMATIC1111's ``Embedding.save`` layout; ``sd_checkpoint`` is the base model's short hash when known."""
    payload = {
        "string_to_token": dict(A1111_STRING_TO_TOKEN),
        "string_to_param": {"*": _plain(vectors)},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    return write_legacy_torch_file(path, payload)


def save_diffusers(path: Path, token: str, vectors: torch.Tensor, metadata: dict[str, str]) -> Path:
    return save_safetensors(path, {token: _plain(vectors)}, metadata)


def _single_tensor(tensors: dict, path: Path) -> tuple[str, torch.Tensor]:
    if len(tensors) != 1:
        raise UserError(
            f"'{path}' holds {len(tensors)} tensors ({', '.join(sorted(map(str, tensors))[:4])}); an embedding holds one, "
            f"or one per text encoder ({', '.join(ENCODER_KEYS)})."
        )
    key, value = next(iter(tensors.items()))
    return key, value


def _as_2d(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.unsqueeze(0) if vectors.dim() == 1 else vectors


def read_embedding(path: Path) -> Embedding:
    """Read an embedding in any of the three formats (``.pt``/``.bin`` only with ``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, "embedding")
        if len(tensors) > 1 and set(tensors) <= set(ENCODER_KEYS):
            return Embedding(vectors={key: _as_2d(value) for key, value in tensors.items()}, token=None, metadata=metadata)
        key, vectors = _single_tensor(tensors, path)
        token = None if key == EMB_PARAMS else key
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a refused or broken pickle
            raise UserError(f"'{path}' cannot be read as an embedding with torch.load(weights_only=True) ({err.__class__.__name__}).") from None
        if isinstance(content, dict) and "string_to_param" in content:
            _, vectors = _single_tensor(content["string_to_param"], path)
            token = content.get("name")
            metadata = {key: content.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name")}
        elif isinstance(content, dict):
            key, vectors = _single_tensor(content, path)
            token, metadata = (None if key == EMB_PARAMS else key), {}
        else:
            raise UserError(f"'{path}' holds a {type(content).__name__}, not an embedding dictionary.")
    return Embedding(vectors={None: _as_2d(vectors)}, token=token, metadata=metadata)


def embedding_metadata(recipe, model, context) -> dict[str, str]:
    """Header metadata of the safetensors files: base model, steps, how the embedding was made, and ModelSpec."""
    ti = recipe.textual_inversion
    values = {
        "ss_sd_model_name": model.name,
        "ss_base_model_version": model.family.ss_base_model_version(model.prediction_type),
        "ss_v2": model.family.is_sd2,
        "ss_steps": context.step,
        "ss_epoch": context.epoch,
        "ss_max_train_steps": recipe.train.max_steps,
        "ss_learning_rate": recipe.train.lr,
        "ss_seed": recipe.train.seed,
        "ss_training_started_at": context.started_at,
        "ss_training_finished_at": iso_now(),
        "ss_training_comment": recipe.output.comment,
        "ti_placeholder": ti.placeholder,
        "ti_num_vectors": ti.num_vectors,
        "ti_initializer": ti.initializer,
        "ti_captions": ti.captions,
    }
    metadata = {key: str(value) for key, value in values.items()}
    metadata.update(
        modelspec(
            f"{model.family.modelspec_architecture(model.prediction_type)}/textual-inversion",
            MODELSPEC_IMPLEMENTATION,
            recipe.output.name,
            recipe.data.resolution,
            model.prediction_type,
            trigger_phrase=ti.placeholder,
            encoder_layer=str(recipe.model.clip_skip) if recipe.model.clip_skip > 1 else "",
            description=recipe.output.comment,
        )
    )
    return metadata
