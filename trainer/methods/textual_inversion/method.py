"""``method: textual_inversion`` — learn the embedding of a new word; the model itself stays frozen.

``setup`` adds the placeholder's tokens to the tokenizer — ``sls_frog``, then ``sls_frog_1``, ... for
more vectors, the names diffusers gives them, so its pipelines (our samples included) expand the
placeholder by themselves — and gives the text encoder an embedding whose new rows live in a
parameter of their own (``AddedTokenEmbedding``). Only that ``[n_vectors, dim]`` parameter trains, so
every original row stays bit-identical whatever the optimizer does, the frozen table can stay in half
precision, and checkpoints hold kilobytes. ``setup`` is deterministic, so a resumed run rebuilds the
same tokenizer and table before the checkpoint's rows are loaded.

Captions are prompt templates ("a photo of a {}") chosen per sample from (seed, epoch, sample), or
the dataset's captions; either way the placeholder becomes all of its tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from trainer.data.captions import add_trigger_word
from trainer.data.seeding import seeded_rng
from trainer.errors import UserError
from trainer.formats import textual_inversion as ti_format
from trainer.formats.safetensors_file import DTYPES
from trainer.methods.base import ExportContext, TrainingMethod
from trainer.methods.textual_inversion.config import BUILT_IN_TEMPLATES


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens added for a placeholder, named as diffusers' ``load_textual_inversion`` names them."""
    return [placeholder] + [f"{placeholder}_{index}" for index in range(1, num_vectors)]


class AddedTokenEmbedding(nn.Module):
    """A token embedding whose rows from ``first_added_id`` on come from a separate, trainable table.

    The original table is used as is (frozen, in whatever precision the rest of the model runs in).
    """

    def __init__(self, original: nn.Embedding, first_added_id: int, initial: torch.Tensor):
        super().__init__()
        # Registered before ``added``: transformers reads a model's dtype from its first parameter.
        self.original = original
        self.added = nn.Embedding.from_pretrained(initial, freeze=False)
        self.first_added_id = first_added_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_added = input_ids >= self.first_added_id
        original = self.original(input_ids.masked_fill(is_added, 0))
        added = self.added((input_ids - self.first_added_id).clamp(min=0))
        return torch.where(is_added.unsqueeze(-1), added.to(original.dtype), original)


class PlaceholderCaptions:
    """The run's TrainingData with each batch's captions rewritten by the method; the rest is unchanged."""

    def __init__(self, data, rewrite, settings: dict):
        self._data = data
        self._rewrite = rewrite
        # The rewriting is part of what a resumed run must find unchanged.
        self.fingerprint = hashlib.sha256(json.dumps([data.fingerprint, settings]).encode("utf-8")).hexdigest()

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def load_batch(self, sample_indices: list[int], epoch: int):
        batch = self._data.load_batch(sample_indices, epoch)
        batch.captions = [self._rewrite(caption, epoch, sample) for caption, sample in zip(batch.captions, batch.sample_indices)]
        return batch


class TextualInversionMethod(TrainingMethod):
    name = "textual_inversion"
    formats = ("a1111", "a1111_pt", "diffusers")

    def __init__(self, recipe, model):
        super().__init__(recipe, model)
        cfg = recipe.textual_inversion
        if "a1111_pt" in recipe.output.formats and len(model.text_encoders) > 1:
            raise UserError(
                f"Recipe key 'output.formats' has a1111_pt, AUTOMATIC1111's pickle of one text encoder's vectors; this {model.family.title} "
                "model has several text encoders, whose embeddings are written as safetensors. Use output.formats: [a1111] (or diffusers)."
            )
        self.tokens = placeholder_tokens(cfg.placeholder, cfg.num_vectors)
        # Per text encoder: every encoder learns its own vectors for the same new tokens.
        self.initializer_ids = {}
        for te in model.text_encoders:
            vocabulary = te.tokenizer.get_vocab()
            for token in self.tokens:
                _check_new_word(te.tokenizer, vocabulary, token, cfg.placeholder)
            self.initializer_ids[te.component] = _initializer_ids(te.tokenizer, cfg.initializer, cfg.num_vectors)
        self.templates = _templates(cfg)
        # What the placeholder becomes in a caption: all of its tokens.
        self.prompt_words = " ".join(self.tokens)
        self.placeholder_pattern = re.compile(rf"(?<!\w){re.escape(cfg.placeholder)}(?!\w)", re.IGNORECASE)
        self.embeddings: dict[str, AddedTokenEmbedding] = {}

    @classmethod
    def full_precision_parts(cls, recipe) -> frozenset[str]:
        # The new vectors start from the initializer word's fp32 embedding.
        return frozenset({"text_encoders"})

    @classmethod
    def text_encoder_training_key(cls, recipe) -> str | None:
        return "method: textual_inversion (it trains the new words' embeddings)"

    # --- captions -------------------------------------------------------------------------------
    def prepare_data(self, data, device: torch.device):
        if not self.templates:
            self._check_captions_mention_placeholder(data)
        settings = {"tokens": self.tokens, "templates": list(self.templates)}
        return PlaceholderCaptions(data, self.caption_for, settings)

    def caption_for(self, caption: str, epoch: int, sample: int) -> str:
        """A template chosen per (seed, epoch, sample), or the dataset caption; the placeholder expanded."""
        if self.templates:
            pick = seeded_rng(self.recipe.train.seed, epoch, sample, "template").random()
            template = self.templates[min(int(pick * len(self.templates)), len(self.templates) - 1)]
            return template.replace("{}", self.prompt_words)
        return self.placeholder_pattern.sub(self.prompt_words, caption)

    def _check_captions_mention_placeholder(self, data) -> None:
        placeholder = self.recipe.textual_inversion.placeholder
        captions = [add_trigger_word(item.caption, data.cfg.trigger_word, data.cfg.tag_separator) for item in data.items if not item.is_reg]
        missing = [caption for caption in captions if not self.placeholder_pattern.search(caption)]
        if captions and len(missing) == len(captions):
            raise UserError(
                f"Recipe key 'textual_inversion.captions' is 'dataset', but no caption mentions the placeholder '{placeholder}' "
                f"(e.g. '{missing[0]}'), so the embedding would never train. Write '{placeholder}' into the captions where they "
                f"name the subject, set data.trigger_word: {placeholder}, or use textual_inversion.captions: object (prompt templates)."
            )
        if missing:
            print(f"warning: {len(missing)} of {len(captions)} captions do not mention '{placeholder}'; their images teach the embedding nothing.")

    # --- which parameters train -----------------------------------------------------------------
    def setup(self) -> None:
        for part in self.model.parts().values():
            part.requires_grad_(False)
        for te in self.model.text_encoders:
            original = te.model.get_input_embeddings()
            te.tokenizer.add_tokens(self.tokens)
            ids = te.tokenizer.convert_tokens_to_ids(self.tokens)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise RuntimeError(f"the tokenizer gave the new tokens {self.tokens} non-consecutive ids {ids}")
            initial = original.weight.detach()[self.initializer_ids[te.component]].float().clone()
            self.embeddings[te.component] = AddedTokenEmbedding(original, ids[0], initial)
            te.model.set_input_embeddings(self.embeddings[te.component])

    def trained_vectors(self) -> dict[str, torch.Tensor]:
        """The placeholder's vectors per text encoder (by its key, e.g. ``clip_l``), ``[num_vectors, dim]`` float32."""
        return {te.spec.key: self.embeddings[te.component].added.weight.detach().float().cpu() for te in self.model.text_encoders}

    # --- how the artifact is written ------------------------------------------------------------
    def export(self, context: ExportContext) -> list[Path]:
        recipe, placeholder = self.recipe, self.recipe.textual_inversion.placeholder
        formats = recipe.output.formats
        vectors = {key: value.to(DTYPES[recipe.output.save_dtype]) for key, value in self.trained_vectors().items()}
        metadata = ti_format.embedding_metadata(recipe, self.model, context)
        # The UIs take the prompt word from the file name: every file is named after the placeholder.
        paths = []
        if "a1111" in formats:
            paths.append(ti_format.save_a1111_safetensors(context.output_dir / f"{placeholder}.safetensors", vectors, metadata))
        if "a1111_pt" in formats:
            (single,) = vectors.values()
            paths.append(
                ti_format.save_a1111_pt(context.output_dir / f"{placeholder}.pt", single, name=placeholder, step=context.step, sd_checkpoint_name=self.model.name)
            )
        if "diffusers" in formats:
            folder = context.output_dir / f"{placeholder}_diffusers"
            for te in self.model.text_encoders:
                path = folder / ti_format.diffusers_file_name(te.component)
                paths.append(ti_format.save_diffusers(path, placeholder, vectors[te.spec.key], metadata))
        return paths


def _check_new_word(tokenizer, vocabulary: dict[str, int], token: str, placeholder: str) -> None:
    """``token`` must be new: a word the tokenizer already knows would be taken over by the embedding."""
    pieces = tokenizer.tokenize(token)
    if token in vocabulary or len(pieces) == 1:
        known = token if token in vocabulary else pieces[0]
        raise UserError(
            f"Recipe key 'textual_inversion.placeholder' is '{placeholder}', but the token '{token}' already exists in the tokenizer's "
            f"vocabulary (as '{known}'). Adding it would pollute that existing word: every prompt that uses '{token}' in its ordinary "
            f"meaning would get the embedding instead. Choose a made-up word the tokenizer splits into several pieces, e.g. '{placeholder}_emb'."
        )


def _initializer_ids(tokenizer, initializer: str, num_vectors: int) -> list[int]:
    """One token id per vector: the initializer's tokens, the single one repeated for every vector."""
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not ids:
        raise UserError("Recipe key 'textual_inversion.initializer' is empty. Set it to a word that describes the subject, e.g. 'frog'.")
    if len(ids) not in (1, num_vectors):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(
            f"Recipe key 'textual_inversion.initializer' is '{initializer}', which the tokenizer splits into {len(ids)} tokens {pieces}, "
            f"but textual_inversion.num_vectors is {num_vectors}: each vector starts from one token, or all from the same one. "
            f"Use a single-token word (e.g. 'frog') or set textual_inversion.num_vectors to {len(ids)}."
        )
    return [ids[index % len(ids)] for index in range(num_vectors)]


def _templates(cfg) -> tuple[str, ...]:
    """The prompt templates of the recipe, or () when the dataset's captions are used."""
    if cfg.captions == "dataset":
        return ()
    return tuple(cfg.templates) or BUILT_IN_TEMPLATES[cfg.captions]
