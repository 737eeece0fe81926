"""Sample images during training, with the prompt and seed in each PNG's metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from trainer import diffusion
from trainer.atomic import write_file
from trainer.models.loading import BaseModel
from trainer.recipe import Recipe


SAMPLER = "DDIM"


def save_png_with_settings(path: Path, image, *, prompt: str, negative_prompt: str, seed: int, steps: int, guidance_scale: float, extra: dict | None = None) -> Path:
    """Write ``image`` atomically as PNG with how it was made in its text chunks.

    Each setting gets its own chunk (easy to read back), and AUTOMATIC1111's "parameters" text is
    added so the UIs' PNG-info tabs show the prompt and settings.
    """
    extra = extra or {}
    info = PngInfo()
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "sampler": SAMPLER, **extra}
    for key, value in settings.items():
        info.add_text(key, str(value))
    extras = "".join(f", {key.replace('_', ' ').capitalize()}: {value}" for key, value in extra.items())
    info.add_text(
        "parameters",
        f"{prompt}\nNegative prompt: {negative_prompt}\nSteps: {steps}, Sampler: {SAMPLER}, CFG scale: {guidance_scale}, "
        f"Seed: {seed}, Size: {image.width}x{image.height}{extras}",
    )
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def sampling_scheduler(noise_scheduler_config):
    """DDIM with SD's sampling settings.

    DDIM inherits clip_sample=True from DDPM's defaults; SD latents must not be clipped.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sampling_pipeline(model: BaseModel, device: torch.device):
    from diffusers import StableDiffusionPipeline

    scheduler = sampling_scheduler(model.noise_scheduler.config)
    pipe = StableDiffusionPipeline(
        unet=model.unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prompt_embeddings(pipe, prompts: list[str], clip_skip: int, device: torch.device) -> torch.Tensor:
    """What ``pipe``'s UNet is conditioned on for ``prompts``: the text encoder's hidden states as training forms
    them (``diffusion.encode_prompts``), each multi-vector textual-inversion word first expanded to all its vectors
    as the pipeline would.

    Given to the pipeline as ``prompt_embeds``/``negative_prompt_embeds`` because its own ``clip_skip`` reads
    ``text_encoder.text_model``, which transformers 5's CLIPTextModel no longer has; this way clip skip also applies
    to the negative prompt, as in AUTOMATIC1111 and kohya's samples.
    """
    with torch.no_grad():
        return diffusion.encode_prompts(pipe.tokenizer, pipe.text_encoder, pipe.maybe_convert_prompt(prompts, pipe.tokenizer), clip_skip, device)


def write_samples(model: BaseModel, recipe: Recipe, step: int, directory: Path, device: torch.device) -> list[Path]:
    """One PNG per prompt, seeded; leaves every training RNG and module mode as it found them."""
    cfg = recipe.sample
    width = cfg.width or recipe.data.resolution
    height = cfg.height or recipe.data.resolution
    pipe = sampling_pipeline(model, device)
    modes = {m: m.training for m in (model.unet, model.text_encoder, model.vae)}
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for module in modes:
            module.eval()
        for index, prompt in enumerate(cfg.prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed + index)
            image = pipe(
                prompt_embeds=prompt_embeddings(pipe, [prompt], recipe.model.clip_skip, device),
                negative_prompt_embeds=prompt_embeddings(pipe, [cfg.negative_prompt], recipe.model.clip_skip, device),
                width=width,
                height=height,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=generator,
            ).images[0]
            path = save_png_with_settings(
                directory / f"step-{step:08d}-{index:02d}.png", image, prompt=prompt, negative_prompt=cfg.negative_prompt,
                seed=cfg.seed + index, steps=cfg.steps, guidance_scale=cfg.guidance_scale, extra={"training_step": step},
            )
            paths.append(path)
    for module, was_training in modes.items():
        module.train(was_training)
    return paths
