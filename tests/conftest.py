"""Shared fixtures: small, fast recipes on the built-in tiny model and the shipped sls-frog images, and a
per-user cache of the test session's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import trainer  # noqa: F401  (first: it sets MKL_CBWR before any test module imports torch)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.loop import computes_bf16  # noqa: E402  (after HF_HUB_OFFLINE: huggingface_hub reads it on import)


# Training in bf16 needs a GPU or a CPU that computes bf16; elsewhere the loop refuses it (tests/test_recipe.py).
trains_in_bf16 = pytest.mark.skipif(not computes_bf16(), reason="this CPU does not compute bf16 (no AVX-512 or Arm bf16): sdtrain refuses bf16 here")


def fast_overrides(output_dir: Path, **extra) -> list[str]:
    """Overrides that make recipes/sls_frog_lora.yaml train in seconds: 64 px, no sampling, no TensorBoard."""
    values = {
        "data.dir": str(REPO / "datasets" / "sls_frog"),
        "data.resolution": 64,
        "data.buckets.min_side": 64,
        "data.buckets.max_side": 128,
        "sample.every_steps": 0,
        "sample.prompts": "[]",
        "output.tensorboard": False,
        "output.dir": str(output_dir),
        "train.lr_warmup_steps": 0,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture
def lora_recipe_path() -> Path:
    return REPO / "recipes" / "sls_frog_lora.yaml"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test, and every process a test starts, uses this session's own per-user cache (SDTRAIN_CACHE_DIR),
    never ~/.cache/sdtrain: the toy base is written there on first use and reused by the tests after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDTRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("sdtrain-cache")))
        yield


def draw(pipe, prompt: str = "sls frog"):
    """One 64 px image (numpy) from a diffusers pipeline in 3 steps with a fixed seed: every part of the pipeline runs."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, generator=generator, output_type="np").images[0]


def train_keeping_model(recipe, load=None, **train_kwargs):
    """Run the loop and hand back its result and the (trained) model it ran on; ``load`` replaces the
    loop's ``load_recipe_model`` (e.g. to train on a model built in the test)."""
    from trainer import loop
    from trainer.models.loading import load_recipe_model

    load = load or load_recipe_model
    models = []

    def load_and_keep(*args, **kwargs):
        models.append(load(*args, **kwargs))
        return models[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "load_recipe_model", load_and_keep)
        result = loop.train(recipe, show_progress=False, **train_kwargs)
    return result, models[0]


def train_and_resume(recipe_path, tmp_path, settings: dict):
    """Train ``settings`` (which must save at step 2) uninterrupted, and again resumed from the step-2
    checkpoint alone; asserts the two end with the same trained tensors, bit for bit. Returns the
    uninterrupted run's result."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from trainer.checkpoint import resolve_checkpoint
    from trainer.loop import train
    from trainer.recipe import load_recipe

    def run(out, resume=None):
        return train(load_recipe(recipe_path, fast_overrides(out, **settings)), resume=resume, show_progress=False)

    full = run(tmp_path / "full")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    run(resumed, resume="latest")
    expected, actual = (load_file(resolve_checkpoint(out, "latest") / "trainable.safetensors") for out in (tmp_path / "full", resumed))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)
    return full
