"""Shared fixtures: small, fast recipes on the built-in tiny model and the shipped sls-frog images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import trainer  # noqa: F401  (first: it sets MKL_CBWR before any test module imports torch)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
