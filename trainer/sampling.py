"""Sample images during training, with the prompt and seed in each PNG's metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from trainer.atomic import write_file
from trainer.models.base_model import BaseModel
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


def sampling_pipeline(model: BaseModel, device: torch.device):
    """The model family's diffusers pipeline over the model's parts (DDIM sampling), without progress bars."""
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def draw(model: BaseModel, pipe, prompts: list[str], **call) -> list:
    """The pipeline's PIL images for ``prompts``, decoded by the model's VAE in the VAE's own precision.

    Pipelines decode in the UNet's precision; a VAE kept in fp32 under mixed precision (model.vae_fp32)
    needs its latents in fp32, so the pipeline stops at the latents and the decoding happens here.
    """
    latents = pipe(prompts, output_type="latent", **call).images
    return pipe.image_processor.postprocess(model.decode_latents(latents), output_type="pil")


def write_samples(model: BaseModel, recipe: Recipe, step: int, directory: Path, device: torch.device) -> list[Path]:
    """One PNG per prompt, seeded; leaves every training RNG and module mode as it found them."""
    cfg = recipe.sample
    width = cfg.width or recipe.data.resolution
    height = cfg.height or recipe.data.resolution
    pipe = sampling_pipeline(model, device)
    modes = {m: m.training for m in model.parts().values()}
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for module in modes:
            module.eval()
        for index, prompt in enumerate(cfg.prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed + index)
            image = draw(
                model,
                pipe,
                [prompt],
                negative_prompt=[cfg.negative_prompt] if cfg.negative_prompt else None,
                width=width,
                height=height,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=generator,
                clip_skip=recipe.model.clip_skip - 1 or None,
            )[0]
            path = save_png_with_settings(
                directory / f"step-{step:08d}-{index:02d}.png", image, prompt=prompt, negative_prompt=cfg.negative_prompt,
                seed=cfg.seed + index, steps=cfg.steps, guidance_scale=cfg.guidance_scale, extra={"training_step": step},
            )
            paths.append(path)
    for module, was_training in modes.items():
        module.train(was_training)
    return paths
