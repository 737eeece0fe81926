"""DreamBooth prior preservation, measured: how far training moved a prompt's noise predictions from the base model's.

Prior preservation should keep the class prompt ("a photo of a frog") predicting what the base model
predicts, while the instance prompt ("sls frog") learns the subject. This measures both:

    python -m trainer.dreambooth_drift [--recipe RECIPE] [--frog-base STEPS] [key=value ...]

trains the recipe (default ``recipes/sls_frog_dreambooth.yaml``) twice, with and without prior
preservation, and prints for each prompt two relative drifts, ``mean ||a_trained - a_base||^2 /
mean ||a_base||^2``, of

* the noise prediction ``a = eps(x_t, prompt)``, and
* the prompt's guidance direction ``a = eps(x_t, prompt) - eps(x_t, "")``: the part of the prediction
  that depends on the prompt, which classifier-free guidance amplifies (what "frog" looks like).

The inputs ``x_t`` are a fixed evaluation set: held-out images the base model draws for the class
prompt (other seeds than the training class images), VAE-encoded, noised with seeded noise at
timesteps spread evenly over the schedule. 0 means unchanged; 1 means the change is as large as the
quantity itself.

The built-in model's weights are random: it does not denoise yet, so any training rewrites its
predictions for every prompt. ``--frog-base STEPS`` first gives it something to preserve: a plain full
fine-tune on the mint frog and the blob cat of ``datasets/tagged_example`` captioned "a photo of a
frog" / "a photo of a cat", then measures DreamBooth on top of that.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from trainer.data.dataset import load_pixels
from trainer.data.scan import scan
from trainer.examples import example_path
from trainer.loop import train
from trainer.methods.dreambooth.class_images import ClassImageRequest, ensure_class_images
from trainer.models.base_model import BaseModel
from trainer.models.conditioning import ImageGeometry
from trainer.models.loading import load_base_model, load_recipe_model
from trainer.recipe import DataConfig, SubsetConfig, load_recipe

DEFAULT_RECIPE = example_path("recipes", "sls_frog_dreambooth.yaml")
# The default recipe names its data relative to the repository root; the measurement runs from anywhere.
DEFAULT_DATA = example_path("datasets", "sls_frog")
TAGGED_EXAMPLE = example_path("datasets", "tagged_example", "5_tagged")
EVAL_SEED = 1_000_000  # far from any class_seed + i of the training class images
EVAL_IMAGES = 8
TIMESTEPS = tuple(range(50, 1000, 100))
# Overrides of every measured run: fp32 exports, so the numbers are not blurred by the export's rounding.
MEASURED_RUN = ["output.formats=[diffusers]", "output.save_dtype=fp32", "output.tensorboard=false", "sample.every_steps=0", "sample.prompts=[]"]


@torch.no_grad()
def encode_images(model: BaseModel, directory: Path, resolution: int) -> torch.Tensor:
    """The folder's images as the training loop sees them (one square bucket), VAE-encoded (mean)."""
    cfg = DataConfig(subsets=[SubsetConfig(dir=str(directory))], resolution=resolution)
    cfg.buckets.enabled = False
    pixels = torch.stack([load_pixels(item, flipped=False) for item in scan(cfg).items])
    return model.encode_latents(pixels)


@torch.no_grad()
def noise_predictions(model: BaseModel, prompt: str, latents: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The UNet's predictions for ``latents`` noised at every timestep of ``TIMESTEPS``; the noise is
    seeded, so every model and prompt sees the same inputs."""
    generator = torch.Generator("cpu").manual_seed(EVAL_SEED)
    text = model.encode_text([prompt] * len(latents), clip_skip)
    geometry = [ImageGeometry.square(latents.shape[-1] * model.vae_scale_factor)] * len(latents)
    predictions = []
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(latents),), t, dtype=torch.long)
        noisy = model.objective.add_noise(latents, noise, timesteps)
        predictions.append(model.predict(noisy, timesteps, text, geometry))
    return torch.cat(predictions)


def relative_drift(base: torch.Tensor, trained: torch.Tensor) -> float:
    return float(((trained - base) ** 2).mean() / (base**2).mean())


def prompt_drift(base: BaseModel, trained: BaseModel, prompt: str, latents: torch.Tensor, clip_skip: int) -> dict[str, float]:
    """{"prediction": drift of eps(prompt), "guidance": drift of eps(prompt) - eps("")}."""
    base_eps, trained_eps = (noise_predictions(m, prompt, latents, clip_skip) for m in (base, trained))
    base_uncond, trained_uncond = (noise_predictions(m, "", latents, clip_skip) for m in (base, trained))
    return {
        "prediction": relative_drift(base_eps, trained_eps),
        "guidance": relative_drift(base_eps - base_uncond, trained_eps - trained_uncond),
    }


def measure(recipe_path: Path, overrides: list[str], root: Path, instance_prompt: str) -> dict[str, dict[str, dict[str, float]]]:
    """{run: {prompt: {metric: drift}}} for the recipe trained with and without prior preservation."""
    common = [*overrides, f"dreambooth.class_dir={root / 'class_images'}", *MEASURED_RUN]
    recipes = {
        f"{label} prior preservation": load_recipe(
            recipe_path, [*common, f"dreambooth.prior_preservation={flag}", f"output.dir={root / f'{label}_prior_preservation'}"]
        )
        for label, flag in (("with", "true"), ("without", "false"))
    }
    recipe = next(iter(recipes.values()))
    cfg, clip_skip = recipe.dreambooth, recipe.model.clip_skip
    base = load_recipe_model(recipe.model)
    resolution = cfg.class_resolution or recipe.data.resolution
    held_out = ClassImageRequest(
        directory=root / "eval_class_images", count=EVAL_IMAGES, prompt=cfg.class_prompt, negative_prompt=cfg.class_negative_prompt,
        width=resolution, height=resolution, steps=cfg.class_sample_steps, guidance_scale=cfg.class_guidance_scale,
        seed=EVAL_SEED, batch_size=cfg.class_batch_size, clip_skip=clip_skip, max_token_length=recipe.data.max_token_length,
    )
    ensure_class_images(base, held_out, torch.device("cpu"))
    latents = encode_images(base, held_out.directory, resolution)
    results = {}
    for label, run_recipe in recipes.items():
        trained = load_base_model(str(train(run_recipe, show_progress=False).artifacts[0]))
        results[label] = {prompt: prompt_drift(base, trained, prompt, latents, clip_skip) for prompt in (cfg.class_prompt, instance_prompt)}
    return results


def train_frog_base(recipe_path: Path, overrides: list[str], root: Path, steps: int) -> Path:
    """The built-in model after a plain full fine-tune on the mint frog ("a photo of a frog") and the blob
    cat ("a photo of a cat") of datasets/tagged_example; returns its diffusers folder."""
    folders = {"mint frog": root / "data" / "1_a photo of a frog", "blob cat": root / "data" / "1_a photo of a cat"}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for caption_file in sorted(TAGGED_EXAMPLE.glob("*.txt")):
        character = caption_file.read_text(encoding="utf-8").split(",")[0].strip()
        if character in folders:
            # No caption file next to the copy: the folder words are the caption.
            shutil.copy(caption_file.with_suffix(".png"), folders[character])
    recipe = load_recipe(recipe_path, [
        *overrides, f"data.dir={root / 'data'}", f"train.max_steps={steps}", f"output.dir={root / 'run'}", *MEASURED_RUN,
        "dreambooth.prior_preservation=false", "dreambooth.train_text_encoder=true", "dreambooth.text_encoder_steps=0",
    ])
    return train(recipe, show_progress=False).artifacts[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="default: recipes/sls_frog_dreambooth.yaml on datasets/sls_frog")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. train.max_steps=50")
    parser.add_argument("--instance-prompt", default="sls frog", help="the subject's prompt, for comparison")
    parser.add_argument("--frog-base", type=int, default=0, metavar="STEPS", help="first fine-tune the base on frogs and cats for STEPS steps")
    parser.add_argument("--out", default="output/dreambooth_drift", help="folder for the runs")
    args = parser.parse_args(argv)
    out, overrides = Path(args.out), list(args.overrides)
    recipe = Path(args.recipe) if args.recipe else DEFAULT_RECIPE
    if not args.recipe:
        overrides.insert(0, f"data.dir={DEFAULT_DATA}")
    if args.frog_base:
        overrides.append(f"model.base={train_frog_base(recipe, overrides, out / 'frog_base', args.frog_base)}")
    results = measure(recipe, overrides, out / "dreambooth", args.instance_prompt)
    print(f"{'run':28s} {'prompt':20s} {'prediction drift':>16s} {'guidance drift':>16s}")
    for label, prompts in results.items():
        for prompt, drift in prompts.items():
            print(f"{label:28s} {prompt:20s} {drift['prediction']:16.4f} {drift['guidance']:16.4f}")


if __name__ == "__main__":
    main()
