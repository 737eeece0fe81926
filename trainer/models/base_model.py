"""``BaseModel``: the model a run trains on, its parts by role, and the few calls every method makes.

The parts are diffusers/transformers modules (UNet, VAE, one or more CLIP text encoders with their
tokenizers, the training noise scheduler); ``family`` is the model family that knows how they fit
together (trainer/families). Methods use the calls here - ``encode_text``, ``predict``,
``encode_latents``, ``objective`` - and never ask which family they run on.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from trainer.diffusion import DDPMObjective, ObjectiveSettings
from trainer.formats import kohya_lora
from trainer.models.conditioning import ImageGeometry, TextConditioning
from trainer.models.text import TextEncoderSpec


@dataclass
class TextEncoder:
    """One of the model's text encoders, with its tokenizer and the family's description of it."""

    spec: TextEncoderSpec
    tokenizer: object  # transformers CLIPTokenizer
    model: nn.Module

    @property
    def component(self) -> str:
        return self.spec.component


@dataclass
class BaseModel:
    family: object  # trainer.families.base.ModelFamily
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]
    noise_scheduler: DDPMScheduler
    # What model.base said, and a short name for metadata (file or folder name).
    source: str
    name: str
    # Keep the VAE in fp32 under fp16/bf16 mixed precision (model.vae_fp32).
    vae_fp32: bool = False
    # How training draws noise and forms the loss (the recipe's train.* loss and noise options).
    objective_settings: ObjectiveSettings = field(default_factory=ObjectiveSettings)

    # --- parts ------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """Every module by its diffusers component name: unet, vae, text_encoder[, text_encoder_2]."""
        return {"unet": self.unet, "vae": self.vae, **{te.component: te.model for te in self.text_encoders}}

    def text_encoder_modules(self) -> dict[str, nn.Module]:
        return {te.component: te.model for te in self.text_encoders}

    def replace_part(self, component: str, module: nn.Module) -> None:
        """Put ``module`` in the place of the part named ``component`` (see ``parts``)."""
        if component == "unet":
            self.unet = module
        elif component == "vae":
            self.vae = module
        else:
            self.text_encoder(component).model = module

    def text_encoder(self, component: str) -> TextEncoder:
        return next(te for te in self.text_encoders if te.component == component)

    def kohya_name(self, component: str, module_path: str) -> str:
        """The name kohya, AUTOMATIC1111 and ComfyUI give a module of ``component`` in adapter files."""
        if component == "unet":
            return kohya_lora.kohya_name(kohya_lora.UNET_PREFIX, self.family.foreign_unet_path(self.unet.config, module_path))
        return kohya_lora.kohya_name(self.text_encoder(component).spec.kohya_prefix, kohya_lora.text_encoder_path(module_path))

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def objective(self) -> DDPMObjective:
        """Noise, timesteps, targets and loss weighting of the family's training objective."""
        return self.family.objective(self.noise_scheduler, self.objective_settings)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image size the UNet was configured for."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # --- the calls methods make ------------------------------------------------------------------
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's mean latents of ``pixels`` ([-1, 1]), scaled (and shifted) as the UNet expects them."""
        return self.scale_latents(self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self._latent_shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents scaled as the UNet sees them, decoded in the VAE's precision."""
        unscaled = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + self._latent_shift
        return self.vae.decode(unscaled).sample

    @property
    def _latent_shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def encode_text(self, captions: list[str], clip_skip: int = 1, max_token_length: int = 75) -> TextConditioning:
        return self.family.encode_text(self, captions, clip_skip, max_token_length)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, geometry: list[ImageGeometry]) -> torch.Tensor:
        """The denoiser's prediction (noise or velocity) for ``noisy`` latents."""
        text = text.to(noisy.device)
        return self.unet(noisy, timesteps, **self.family.unet_inputs(text, geometry, noisy)).sample

    def pipeline(self):
        """A diffusers pipeline over these parts (for sampling and saving), with a DDIM sampler."""
        return self.family.pipeline(self)


def copied_module(module: nn.Module, parameter: Callable[[torch.Tensor], torch.Tensor], buffer: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of ``module`` whose parameters are ``parameter(p)`` (keeping requires_grad) and buffers ``buffer(b)``.
    The original tensors are never copied as they are first (as ``copy.deepcopy`` would), so a copy to the
    CPU does not need room for a second copy on the GPU, and one on the meta device needs no room at all."""
    memo = {id(param): nn.Parameter(parameter(param.detach()), requires_grad=param.requires_grad) for param in module.parameters()}
    memo.update({id(tensor): buffer(tensor) for tensor in module.buffers()})
    return copy.deepcopy(module, memo)


def replace_parts(model: BaseModel, parts: dict[str, nn.Module]) -> BaseModel:
    """``model`` with some of its modules (by component name) swapped for others; the rest is shared."""
    text_encoders = [TextEncoder(te.spec, te.tokenizer, parts.get(te.component, te.model)) for te in model.text_encoders]
    return dataclasses.replace(model, unet=parts.get("unet", model.unet), vae=parts.get("vae", model.vae), text_encoders=text_encoders)


# Each tensor starts at a multiple of this in the paged-out file, so it can be viewed in any dtype.
_PAGE_ALIGNMENT = 64


def page_out(modules: list[nn.Module], directory: Path) -> None:
    """Keep the modules' weights in a file the OS reads in on demand instead of in memory.

    For frozen parts training no longer uses (a VAE half, once every latent is cached and no sample is
    drawn): their memory is returned, yet every value stays exactly where it was, so whatever still
    reads them (a full model's export, a later encode) gets the same numbers from the page cache or the
    disk. The file is a private mapping of a temporary file in ``directory``, unlinked at once; a GPU
    part is moved to the CPU first. Only a saving: where the file cannot be written (a full disk) or
    mapped while open (Windows), the parts simply stay in memory.
    """
    tensors = [t for module in modules for t in itertools.chain(module.parameters(), module.buffers())]
    if not tensors or os.name == "nt":
        return
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += -(-tensor.numel() * tensor.element_size() // _PAGE_ALIGNMENT) * _PAGE_ALIGNMENT
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".paged-", suffix=".bin") as handle:
            for tensor, offset in zip(tensors, offsets):
                handle.seek(offset)
                handle.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            handle.truncate(size)
            handle.flush()
            mapped = torch.from_file(handle.name, shared=False, size=size, dtype=torch.uint8)
    except (OSError, RuntimeError):  # torch reports a failed mapping as RuntimeError
        return
    with torch.no_grad():
        for tensor, offset in zip(tensors, offsets):
            nbytes = tensor.numel() * tensor.element_size()
            tensor.data = mapped[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
