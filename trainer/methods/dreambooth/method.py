"""``method: dreambooth`` — retrain the whole model on a subject: the "Checkpoint" way of teaching it.

The UNet trains entirely; the text encoder optionally, at its own learning rate and, if asked, only for
the first ``text_encoder_steps`` optimizer steps. With prior preservation the class folder is filled
with the base model's own images of the class prompt (``class_images.py``) and trained on as a
regularisation subset: kohya's balancing of class against instance samples, the class loss weighted by
``prior_loss_weight``. Without it (and with tag captions) this is the plain full fine-tune. An optional
EMA of the trained weights is what gets exported. The artifact is a whole model: a diffusers folder
and/or one original-layout ``.safetensors`` file that AUTOMATIC1111 and ComfyUI load.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError
from trainer.formats.safetensors_file import DTYPES
from trainer.methods.base import ExportContext, TrainingMethod
from trainer.methods.dreambooth.class_images import ClassImageRequest, ensure_class_images, images_of_other_prompts
from trainer.models.base_model import BaseModel, copied_module, replace_parts
from trainer.models.export import save_diffusers_folder, save_single_file
from trainer.recipe import Recipe, SubsetConfig

STEPS_KEY = "dreambooth.optimizer_steps"
EMA_PREFIX = "ema."


def ema_decay(max_decay: float, steps: int) -> float:
    """The decay of the update after ``steps`` optimizer steps: diffusers' EMAModel warm-up,
    (1 + n) / (10 + n) with n = steps - 1, capped at ``max_decay``; the first update copies the weights."""
    n = steps - 1
    return 0.0 if n <= 0 else min(max_decay, (1 + n) / (10 + n))


def _check_config(recipe: Recipe, model: BaseModel) -> None:
    """What the recipe's values (checked in config.py) must also fit in this base model."""
    cfg = recipe.dreambooth
    if cfg.ema and recipe.train.shard_model:
        raise UserError(
            "Recipe keys 'dreambooth.ema' and 'train.shard_model' are both true: the EMA keeps a whole fp32 copy of the weights on "
            "every process, which sharding is there to avoid, and sdtrain does not shard it yet. Set dreambooth.ema=false, or "
            "train.shard_model=false (train.shard_optimizer=true still splits the optimizer state)."
        )
    resolution = cfg.class_resolution or recipe.data.resolution
    if cfg.prior_preservation and resolution % model.vae_scale_factor:
        raise UserError(
            f"Class images would be {resolution} px wide ('dreambooth.class_resolution', 0 = data.resolution), but the "
            f"base model draws only multiples of {model.vae_scale_factor} px. Set dreambooth.class_resolution to one."
        )


def _shipped_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the export ships it: a copy on the CPU, floating point in float32."""
    return tensor.to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)


class DreamBoothMethod(TrainingMethod):
    name = "dreambooth"
    formats = ("single_file", "diffusers")
    trains_whole_parts = True

    def __init__(self, recipe: Recipe, model: BaseModel):
        super().__init__(recipe, model)
        _check_config(recipe, model)
        self.cfg = recipe.dreambooth
        self._parts = ("unet", *model.text_encoder_modules()) if self.cfg.train_text_encoder else ("unet",)
        # Decides when the text encoder stops and the EMA decay, so it is part of every checkpoint.
        self._steps = torch.zeros((), dtype=torch.int64)
        self._ema: dict[str, torch.Tensor] = {}

    @classmethod
    def reg_loss_weight(cls, recipe: Recipe) -> float:
        return recipe.dreambooth.prior_loss_weight

    @classmethod
    def full_precision_parts(cls, recipe: Recipe) -> frozenset[str]:
        # The trained parts' fp32 weights are the master weights; prior preservation draws its class images with
        # the whole model before training, in fp32 as the base model is.
        cfg = recipe.dreambooth
        if cfg.prior_preservation:
            return frozenset({"unet", "text_encoders", "vae"})
        return frozenset({"unet", "text_encoders"} if cfg.train_text_encoder else {"unet"})

    @classmethod
    def text_encoder_training_key(cls, recipe: Recipe) -> str | None:
        return "dreambooth.train_text_encoder" if recipe.dreambooth.train_text_encoder else None

    # --- data ---------------------------------------------------------------------------------
    def class_image_request(self) -> ClassImageRequest:
        cfg, recipe = self.cfg, self.recipe
        size = cfg.class_resolution or recipe.data.resolution
        return ClassImageRequest(
            directory=Path(cfg.class_dir) if cfg.class_dir else Path(recipe.output.dir) / "class_images",
            count=cfg.num_class_images,
            prompt=cfg.class_prompt,
            negative_prompt=cfg.class_negative_prompt,
            width=size,
            height=size,
            steps=cfg.class_sample_steps,
            guidance_scale=cfg.class_guidance_scale,
            seed=cfg.class_seed,
            batch_size=cfg.class_batch_size,
            clip_skip=recipe.model.clip_skip,
            max_token_length=recipe.data.max_token_length,
        )

    def prepare_data(self, data, device: torch.device):
        """Fill the class folder, then train on it as a regularisation subset captioned with the class prompt."""
        if not self.cfg.prior_preservation:
            return data
        request = self.class_image_request()
        ensure_class_images(self.model, request, device)
        other = images_of_other_prompts(request)
        if other:
            print(
                f"warning: {len(other)} images in '{request.directory}' were generated for another prompt, but are captioned "
                f"'{request.prompt}' now (e.g. {other[0]}). Empty the folder, or point dreambooth.class_dir elsewhere, to draw new ones."
            )
        with_class = data.with_subsets([SubsetConfig(dir=str(request.directory), caption=request.prompt, is_reg=True)])
        for warning in with_class.warnings:
            if warning not in data.warnings:
                print(f"warning: {warning}")
        return with_class

    # --- which parameters train -------------------------------------------------------------------
    def setup(self) -> None:
        self.model.vae.requires_grad_(False)
        self.model.unet.requires_grad_(True)
        for encoder in self.model.text_encoder_modules().values():
            encoder.requires_grad_(self.cfg.train_text_encoder)
        if self.cfg.ema:
            self._ema = {key: param.detach().float().clone() for key, param in self._weights().items()}

    def trainable_modules(self) -> dict[str, nn.Module]:
        # By configuration, not by requires_grad: the text encoder stays a trained part after it stops.
        parts = self.model.parts()
        return {part: parts[part] for part in self._parts}

    def _weights(self) -> dict[str, nn.Parameter]:
        return {f"{part}.{name}": param for part, module in self.trainable_modules().items() for name, param in module.named_parameters()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, their EMA and the step count: a resumed run continues exactly."""
        state = {key: param.detach() for key, param in self._weights().items()}
        state.update({EMA_PREFIX + key: shadow for key, shadow in self._ema.items()})
        state[STEPS_KEY] = self._steps
        return state

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state_dict(tensors)
        self._stop_text_encoder_when_due()

    def _stop_text_encoder_when_due(self) -> None:
        # Without gradients AdamW skips the text encoder's parameters entirely (no update, no weight decay).
        limit = self.cfg.text_encoder_steps
        if self.cfg.train_text_encoder and limit and int(self._steps) >= limit:
            for encoder in self.model.text_encoder_modules().values():
                encoder.requires_grad_(False)

    def after_optimizer_step(self) -> None:
        self._steps += 1
        if self._ema:
            decay = ema_decay(self.cfg.ema_decay, int(self._steps))
            with torch.no_grad():
                for key, param in self._weights().items():
                    shadow = self._ema[key]
                    if shadow.device != param.device:
                        shadow = self._ema[key] = shadow.to(param.device)
                    shadow.lerp_(param.detach().float(), 1.0 - decay)
        self._stop_text_encoder_when_due()

    # --- how the artifact is written ---------------------------------------------------------------
    def exported_model(self) -> BaseModel:
        """The model as it is shipped, in float32 on the CPU: the EMA weights if kept.

        Float32 so that the diffusers folder's main files hold the trained weights unrounded; each file casts
        to output.save_dtype itself. Parts that are so already (a CPU run's, without an EMA of them) are
        shipped as they are; the others are copied, one tensor at a time, so the training model is left as it was.
        """
        parts = {}
        for name, part in self.model.parts().items():
            shipped = not any(key.startswith(name + ".") for key in self._ema) and all(
                tensor.device.type == "cpu" and (tensor.dtype == torch.float32 or not tensor.is_floating_point())
                for tensor in itertools.chain(part.parameters(), part.buffers())
            )
            if not shipped:
                part = copied_module(part, parameter=_shipped_copy, buffer=_shipped_copy).eval()
            parts[name] = part
        with torch.no_grad():
            for key, shadow in self._ema.items():
                part, _, name = key.partition(".")
                parts[part].get_parameter(name).copy_(shadow)
        return replace_parts(self.model, parts)

    def export(self, context: ExportContext) -> list[Path]:
        recipe, model = self.recipe, self.exported_model()
        paths = []
        if "single_file" in recipe.output.formats:
            extra = {"modelspec.description": recipe.output.comment}
            if recipe.model.clip_skip > 1:
                extra["modelspec.encoder_layer"] = str(recipe.model.clip_skip)
            paths.append(save_single_file(
                model, context.output_dir / f"{context.name}.safetensors", dtype=DTYPES[recipe.output.save_dtype],
                title=recipe.output.name, metadata={key: value for key, value in extra.items() if value},
            ))
        if "diffusers" in recipe.output.formats:
            directory = context.output_dir / f"{context.name}_diffusers"
            save_diffusers_folder(model, directory, recipe.output.save_dtype, replace=True)
            paths.append(directory)
        return paths
