"""The small interface every training method implements, and the defaults most of them share.

A method says which parameters train (``setup``, ``param_groups``), how the loss is formed
(``loss``), and how the artifact is written (``export``). The training loop in ``trainer.loop``
knows nothing else about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from trainer.errors import UserError
from trainer.models.base_model import BaseModel
from trainer.models.conditioning import ImageGeometry, TextConditioning
from trainer.recipe import Recipe
from trainer.sharding import copy_whole_into


@dataclass
class TrainingBatch:
    """One micro-batch as the loop hands it to a method: latents with their noise and timesteps drawn
    (``noise`` is the target's, ``input_noise`` what the latents are noised with: the same unless
    train.ip_noise_gamma perturbs it), the captions after the data's augmentation, each image's
    geometry, per-sample loss weights, and what the weighted sum of the per-sample losses is divided by:
    the number of samples that count in the whole batch, of which this process may train only a slice
    (docs/distributed.md); with data.masks, each sample's loss mask on the latent grid."""

    latents: torch.Tensor
    captions: list[str]
    geometry: list[ImageGeometry]
    loss_weights: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    loss_denominator: int
    input_noise: torch.Tensor | None = None
    masks: torch.Tensor | None = None


@dataclass
class ExportContext:
    """What an artifact's metadata may say about the run that made it."""

    output_dir: Path
    name: str
    step: int
    epoch: int
    started_at: str
    data: object  # trainer.data.TrainingData
    processes: int = 1


class TrainingMethod:
    name: ClassVar[str]
    # The values output.formats may hold for this method; the first is the default.
    formats: ClassVar[tuple[str, ...]]
    # Whether it trains whole model parts (a full fine-tune), which train.shard_model can shard.
    trains_whole_parts: ClassVar[bool] = False

    def __init__(self, recipe: Recipe, model: BaseModel):
        self.recipe = recipe
        self.model = model
        # A trainer.data.cache.TextCache when data.cache_text_encoder_outputs is on (use_text_cache).
        self.text_cache = None
        if not recipe.output.formats:
            # Resolved in the recipe itself, so every reader and the saved recipe.yaml agree.
            recipe.output.formats = [self.formats[0]]
        unknown = [f for f in recipe.output.formats if f not in self.formats]
        if unknown:
            raise UserError(
                f"Recipe key 'output.formats' has {unknown}, which method '{self.name}' cannot write. "
                f"Use any of: {', '.join(self.formats)}."
            )

    @classmethod
    def reg_loss_weight(cls, recipe: Recipe) -> float:
        """Loss weight of regularisation (is_reg) images; prior-preservation methods override it."""
        return 1.0

    @classmethod
    def text_encoder_training_key(cls, recipe: Recipe) -> str | None:
        """The recipe setting that makes this run train a text encoder (None: the text encoders stay frozen).

        Known before any model is loaded, so settings that need frozen encoders are refused at once.
        """
        return None

    @classmethod
    def full_precision_parts(cls, recipe: Recipe) -> frozenset[str]:
        """The base model's parts ("unet", "text_encoders", "vae") this method trains or reads in fp32 before
        training; the others load straight in the compute dtype under mixed precision (trainer.models.loading).

        An adapter made on a part is made in that part's dtype (peft's LoRA: its initial weights are rounded to
        the compute dtype, then trained in fp32).
        """
        return frozenset()

    def prepare_data(self, data, device: torch.device):
        """Last chance to complete the data with the base model at hand (e.g. generate class images).

        Returns the TrainingData to train on; the default keeps ``data``.
        """
        return data

    # --- which parameters train -------------------------------------------------------------
    def setup(self) -> None:
        """Freeze the base model and add or unfreeze what this method trains."""
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The model parts that hold trainable parameters, by their component name (used in checkpoints)."""
        parts = {"unet": self.model.unet, **self.model.text_encoder_modules()}
        return {name: module for name, module in parts.items() if any(p.requires_grad for p in module.parameters())}

    def param_groups(self) -> list[dict]:
        """One group per trained part; text encoders take the method section's ``text_encoder_lr`` if set."""
        text_encoder_lr = getattr(getattr(self.recipe, self.name, None), "text_encoder_lr", None)
        text_parts = self.model.text_encoder_modules()
        groups = []
        for part, module in self.trainable_modules().items():
            lr = text_encoder_lr if part in text_parts and text_encoder_lr is not None else self.recipe.train.lr
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that training changes, exactly, for checkpoints."""
        return {
            f"{part}.{name}": param.detach()
            for part, module in self.trainable_modules().items()
            for name, param in module.named_parameters()
            if param.requires_grad
        }

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise UserError(
                f"The checkpoint does not match this recipe's '{self.name}' setup ({len(missing)} trained tensors missing, "
                f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}). Resume with the recipe the checkpoint was made with."
            )
        with torch.no_grad():
            for key, value in own.items():
                copy_whole_into(value, tensors[key])

    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for module in self.model.text_encoder_modules().values() for p in module.parameters())

    # --- how the loss is formed --------------------------------------------------------------
    def use_text_cache(self, cache) -> None:
        """Read text encoder outputs through ``cache``; only sound while every text encoder is frozen.

        The loop refuses the setting for recipes whose ``text_encoder_training_key`` names a trained
        encoder, before anything loads; this checks that the method's setup agrees with it.
        """
        if self.text_encoder_trains():
            raise RuntimeError(f"method '{self.name}' trains a text encoder, but its text_encoder_training_key said it would not")
        self.text_cache = cache

    def encode_text(self, captions: list[str]) -> TextConditioning:
        """The prompt conditioning of ``captions``, with gradients while a text encoder trains."""
        def encode(texts: list[str]) -> TextConditioning:
            with torch.set_grad_enabled(self.text_encoder_trains()):
                return self.model.encode_text(texts, self.recipe.model.clip_skip, self.recipe.data.max_token_length)

        return self.text_cache.conditioning(captions, encode) if self.text_cache is not None else encode(captions)

    def loss(self, batch: TrainingBatch) -> torch.Tensor:
        """The denoising loss of one batch: predict the noise (or velocity) of the noised latents; the
        weighted per-sample losses summed and divided by ``batch.loss_denominator``."""
        objective = self.model.objective
        noisy = objective.add_noise(batch.latents, batch.noise if batch.input_noise is None else batch.input_noise, batch.timesteps)
        prediction = self.model.predict(noisy, batch.timesteps, self.encode_text(batch.captions), batch.geometry)
        target = objective.target(batch.latents, batch.noise, batch.timesteps)
        per_sample = objective.per_sample_loss(prediction, target, batch.timesteps, batch.masks)
        return (per_sample * batch.loss_weights.to(per_sample.device)).sum() / batch.loss_denominator

    def after_optimizer_step(self) -> None:
        """Hook for methods that must fix parameters after each update (e.g. untouched embedding rows)."""

    # --- how the artifact is written ---------------------------------------------------------
    def export(self, context: ExportContext) -> list[Path]:
        """Write the artifact(s) in every format of ``output.formats``; return their paths."""
        raise NotImplementedError
