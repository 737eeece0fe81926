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
    # Only the parts that are elsewhere move: `to` on a part sharded by train.shard_model, even to where it
    # is, would put the weights gathered for sampling back into their shards (trainer.sharding).
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and not all(_is_on(param.device, device) for param in component.parameters()):
            component.to(device)
    return pipe


def _is_on(place: torch.device, device: torch.device) -> bool:
    """Whether a tensor at ``place`` is on ``device``: ``cuda`` means the current GPU, as ``to`` reads it;
    the CPU is one device whatever its index (accelerate calls it ``cpu:0`` in a distributed run)."""
    if place.type != device.type or device.type == "cpu":
        return place.type == device.type
    return place.index == (device.index if device.index is not None else torch.cuda.current_device())


def draw(model: BaseModel, pipe, prompts: list[str], negative_prompt: str, clip_skip: int, max_token_length: int, **call) -> list:
    """The pipeline's PIL images for ``prompts``, conditioned and decoded as training sees the model.

    The prompts are encoded by the model family as training encodes captions (clip skip, long prompts,
    every text encoder) and given to the pipeline as embeddings: the pipelines' own clip skip reaches
    for ``text_encoder.text_model``, which transformers 5's ``CLIPTextModel`` no longer has, and knows
    no long prompts. Clip skip applies to the negative prompt too, as in AUTOMATIC1111 and kohya's
    samples. Pipelines decode in the UNet's precision; a VAE kept in fp32 under mixed precision
    (model.vae_fp32) needs its latents in fp32, so the pipeline stops at the latents and the VAE
    decodes here.
    """
    # Each multi-vector Textual Inversion word expanded to all its tokens, as the pipeline would.
    def expand(texts: list[str]) -> list[str]:
        return pipe.maybe_convert_prompt(texts, model.text_encoders[0].tokenizer)

    with torch.no_grad():
        inputs = model.family.sampling_inputs(model, expand(prompts), expand([negative_prompt] * len(prompts)), clip_skip, max_token_length)
        latents = pipe(**inputs, output_type="latent", **call).images
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
                cfg.negative_prompt,
                recipe.model.clip_skip,
                recipe.data.max_token_length,
                width=width,
                height=height,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=generator,
            )[0]
            path = save_png_with_settings(
                directory / f"step-{step:08d}-{index:02d}.png", image, prompt=prompt, negative_prompt=cfg.negative_prompt,
                seed=cfg.seed + index, steps=cfg.steps, guidance_scale=cfg.guidance_scale, extra={"training_step": step},
            )
            paths.append(path)
    for module, was_training in modes.items():
        module.train(was_training)
    return paths
