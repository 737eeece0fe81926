"""What the speed and memory levers change for a user: nothing in the result, only when work happens.

Latents are encoded before step 1 (so the first steps run at the steady pace) and training is
bit-identical to encoding them when first met; AdamW is the fused implementation and a resumed run
still equals an uninterrupted one (tests/test_resume.py runs that with the default optimizer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer import loop, warm_start
from trainer.loop import train
from trainer.models.base_model import BaseModel
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "sls_frog_lora.yaml"
STEPS = 3


def _recipe(out, **extra):
    # 10 images with 10 repeats, batch 2: the 3 steps read 6 samples of the first epoch.
    return load_recipe(RECIPE, fast_overrides(out, **{"train.max_steps": STEPS, "train.save_every_steps": 0, **extra}))


def _events(monkeypatch) -> list[str]:
    """The order in which the VAE encodes images and the UNet runs."""
    events: list[str] = []
    encode, predict = BaseModel.encode_latents, BaseModel.predict

    def recording_encode(self, pixels):
        events.append("encode")
        return encode(self, pixels)

    def recording_predict(self, *args, **kwargs):
        events.append("predict")
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(BaseModel, "encode_latents", recording_encode)
    monkeypatch.setattr(BaseModel, "predict", recording_predict)
    return events


def test_latents_are_encoded_before_step_one_and_training_is_unchanged(tmp_path, monkeypatch):
    events = _events(monkeypatch)
    ahead = train(_recipe(tmp_path / "ahead"), show_progress=False)
    first_predict = events.index("predict")
    encoded = events.count("encode")
    # Every image the run reads is encoded before the UNet first runs, each once, and none during the steps.
    assert 1 <= encoded <= 2 * STEPS and events[:first_predict] == ["encode"] * encoded
    assert events.count("predict") == STEPS

    events.clear()
    monkeypatch.setattr(warm_start, "encode_latents_ahead", lambda *args: None)  # as before: encoded when first met
    when_met = train(_recipe(tmp_path / "when_met"), show_progress=False)
    assert events.count("encode") == encoded and events.count("predict") == STEPS

    a, b = load_file(ahead.artifacts[0]), load_file(when_met.artifacts[0])
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_disk_cache_encodes_nothing_the_second_time(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    train(_recipe(tmp_path / "first", **{"data.cache_latents": "disk", "data.cache_dir": str(cache_dir)}), show_progress=False)
    events = _events(monkeypatch)
    train(_recipe(tmp_path / "second", **{"data.cache_latents": "disk", "data.cache_dir": str(cache_dir)}), show_progress=False)
    assert "encode" not in events and events.count("predict") == STEPS


def test_adamw_is_fused(tmp_path):
    from trainer.optim import build_optimizer

    recipe = _recipe(tmp_path)
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], recipe.train)
    assert recipe.train.optimizer == "adamw" and optimizer.defaults["fused"] is True


@pytest.mark.parametrize("fused", [None, True])
def test_a_checkpoint_resumes_with_the_adamw_it_was_written_with(fused):
    # A run begun before AdamW was fused continues with the same arithmetic, so it stays exact.
    param = torch.nn.Parameter(torch.ones(3))
    written = torch.optim.AdamW([param], fused=fused)
    param.grad = torch.ones(3)
    written.step()
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], fused=True)
    resumed.load_state_dict(written.state_dict())
    assert resumed.param_groups[0]["fused"] is fused


def _paged_out(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s bytes lie in a mapped file page_out wrote (Linux: /proc/self/maps), not in memory."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(value, 16) for value in line.split(maxsplit=1)[0].split("-"))
        if start <= address < end:
            return ".paged-" in line
    return False


@pytest.fixture
def loaded_models(monkeypatch):
    models = []
    load = loop.load_recipe_model

    def keep(*args, **kwargs):
        models.append(load(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(loop, "load_recipe_model", keep)
    return models


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_vae_halves_training_never_runs_leave_memory_with_their_values_kept(tmp_path, loaded_models):
    from trainer.models.loading import load_recipe_model

    original = load_recipe_model(_recipe(tmp_path / "x").model).vae.state_dict()
    train(_recipe(tmp_path / "no_samples"), show_progress=False)
    vae = loaded_models[-1].vae
    # No samples and every latent cached: neither half runs again, and both are paged out unchanged.
    assert _paged_out(vae.decoder.conv_in.weight) and _paged_out(vae.encoder.conv_in.weight)
    assert all(torch.equal(original[key], value) for key, value in vae.state_dict().items())
    assert not list(tmp_path.glob("no_samples/.paged-*"))  # the file is unlinked once mapped

    with_samples = _recipe(tmp_path / "samples", **{"sample.prompts": '["sls frog"]', "sample.steps": 2, "validation.split": 0.2})
    result = train(with_samples, show_progress=False)
    vae = loaded_models[-1].vae
    # Samples decode and validation encodes: both halves stay in memory, and the sample is drawn.
    assert not _paged_out(vae.decoder.conv_in.weight) and not _paged_out(vae.encoder.conv_in.weight)
    assert len(result.samples) == 1 and result.samples[0].is_file()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_cached_captions_are_encoded_before_step_one_and_the_text_encoder_leaves_memory(tmp_path, monkeypatch, loaded_models):
    events = _events(monkeypatch)
    encode_text = BaseModel.encode_text
    monkeypatch.setattr(BaseModel, "encode_text", lambda self, *args: events.append("text") or encode_text(self, *args))
    train(_recipe(tmp_path / "run", **{"data.cache_text_encoder_outputs": "memory"}), show_progress=False)
    # Every caption is encoded (once) before the UNet first runs; the steps read them all from the cache.
    first_predict = events.index("predict")
    assert "text" in events[:first_predict] and "text" not in events[first_predict:]
    (text_encoder,) = loaded_models[-1].text_encoder_modules().values()
    assert all(_paged_out(param) for param in text_encoder.parameters())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_paging_out_is_only_a_saving(tmp_path):
    from trainer.models.base_model import page_out

    layer = torch.nn.Linear(64, 64)
    weight = layer.weight.detach().clone()
    (tmp_path / "a file").write_text("")
    page_out([layer], tmp_path / "a file" / "no folder here")  # cannot be written: stays in memory
    assert not _paged_out(layer.weight) and torch.equal(layer.weight, weight)
    page_out([layer], tmp_path)
    assert _paged_out(layer.weight) and torch.equal(layer.weight, weight) and not list(tmp_path.glob(".paged-*"))
