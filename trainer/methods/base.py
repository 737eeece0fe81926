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

from trainer import diffusion
from trainer.errors import UserError
from trainer.models.loading import BaseModel
from trainer.recipe import Recipe


@dataclass
class ExportContext:
    """What an artifact's metadata may say about the run that made it."""

    output_dir: Path
    name: str
    step: int
    epoch: int
    started_at: str
    data: object  # trainer.data.TrainingData


class TrainingMethod:
    name: ClassVar[str]
    # The values output.formats may hold for this method; the first is the default.
    formats: ClassVar[tuple[str, ...]]

    def __init__(self, recipe: Recipe, model: BaseModel):
        self.recipe = recipe
        self.model = model
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
        """The model parts that hold trainable parameters, by a stable name used in checkpoints."""
        parts = {"unet": self.model.unet, "text_encoder": self.model.text_encoder}
        return {name: module for name, module in parts.items() if any(p.requires_grad for p in module.parameters())}

    def param_groups(self) -> list[dict]:
        """One group per trained part; the text encoder takes the method section's ``text_encoder_lr`` if set."""
        text_encoder_lr = getattr(getattr(self.recipe, self.name, None), "text_encoder_lr", None)
        groups = []
        for part, module in self.trainable_modules().items():
            lr = text_encoder_lr if part == "text_encoder" and text_encoder_lr is not None else self.recipe.train.lr
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
                value.copy_(tensors[key].to(value.device, value.dtype))

    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.model.text_encoder.parameters())

    # --- how the loss is formed --------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        with torch.set_grad_enabled(self.text_encoder_trains()):
            return diffusion.encode_prompts(
                self.model.tokenizer, self.model.text_encoder, captions, self.recipe.model.clip_skip, self.model.unet.device
            )

    def loss(self, latents: torch.Tensor, captions: list[str], loss_weights: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoising loss of one batch: predict the noise (or velocity) of the noised latents."""
        scheduler = self.model.noise_scheduler
        hidden_states = self.encode_text(captions)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.model.unet(noisy, timesteps, hidden_states).sample
        target = diffusion.target_for(scheduler, latents, noise, timesteps)
        per_sample = diffusion.per_sample_loss(prediction, target, timesteps, scheduler, self.recipe.train.min_snr_gamma)
        return (per_sample * loss_weights.to(per_sample.device)).mean()

    def after_optimizer_step(self) -> None:
        """Hook for methods that must fix parameters after each update (e.g. untouched embedding rows)."""

    # --- how the artifact is written ---------------------------------------------------------
    def export(self, context: ExportContext) -> list[Path]:
        """Write the artifact(s) in every format of ``output.formats``; return their paths."""
        raise NotImplementedError
