"""Base models come from local sources only, with the real CLIP tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch

from trainer.errors import UserError
from trainer.models.export import save_diffusers_folder
from trainer.models.loading import load_base_model
from trainer.models.tokenizer import clip_tokenizer


def test_tokenizer_is_clip_vit_l14():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of sls frog").input_ids == [49406, 320, 1125, 539, 33651, 11438, 49407]


def test_tiny_model_is_identical_on_every_build():
    first, second = load_base_model("tiny"), load_base_model("tiny")
    for name, tensor in first.unet.state_dict().items():
        assert torch.equal(tensor, second.unet.state_dict()[name]), name
    assert first.family.name == "sd1" and first.vae_scale_factor == 8


def test_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    # The Hugging Face cache layout: models--{org}--{name}/snapshots/{revision}/ and refs/main naming it.
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    save_diffusers_folder(load_base_model("tiny"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model = load_base_model("someone/tiny-sd")
    assert model.name == "tiny-sd"
    shutil.rmtree(repo)
    with pytest.raises(UserError, match="local Hugging Face cache.*never downloads"):
        load_base_model("someone/tiny-sd")
