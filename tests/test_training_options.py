"""The shared loop's options: optimizers resume exactly, checkpointing, v-prediction, loss weighting, samples, logs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer import diffusion
from trainer.checkpoint import resolve_checkpoint
from trainer.formats.safetensors_file import read_metadata
from trainer.loop import train
from trainer.models.tiny import sd_noise_scheduler
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "sls_frog_lora.yaml"


def _train(out, resume=None, **overrides):
    return train(load_recipe(RECIPE, fast_overrides(out, **overrides)), resume=resume, show_progress=False)


def _weights(out):
    return load_file(resolve_checkpoint(out, "latest") / "trainable.safetensors")


@pytest.mark.parametrize("optimizer, lr", [("prodigy", 1.0), ("adafactor", 1e-3)])
def test_adaptive_optimizers_resume_exactly(tmp_path, optimizer, lr):
    settings = {"train.optimizer": optimizer, "train.lr": lr, "train.max_steps": 4, "train.save_every_steps": 2, "train.keep_checkpoints": 0}
    _train(tmp_path / "full", **settings)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    _train(resumed, resume="latest", **settings)
    full, again = _weights(tmp_path / "full"), _weights(resumed)
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = _train(tmp_path / "plain", **{"train.max_steps": 3})
    checkpointed = _train(tmp_path / "ckpt", **{"train.max_steps": 3, "train.gradient_checkpointing": True})
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert plain.final_loss == pytest.approx(checkpointed.final_loss, rel=1e-5)


def test_v_prediction_trains_against_velocity_and_is_recorded(tmp_path):
    result = _train(tmp_path, **{"train.max_steps": 2, "model.prediction_type": "v_prediction"})
    meta = read_metadata(result.artifacts[0])
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["modelspec.prediction_type"] == "v"
    scheduler = sd_noise_scheduler("v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.target_for(scheduler, latents, noise, t), alpha * noise - sigma * latents)


def test_min_snr_gamma_weights_each_sample():
    scheduler = sd_noise_scheduler()
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    t = torch.tensor([1, 300, 999])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(diffusion.per_sample_loss(prediction, target, t, scheduler, 5.0), expected)
    torch.testing.assert_close(diffusion.per_sample_loss(prediction, target, t, scheduler, None), torch.ones(3))


def test_noise_offset_shifts_whole_channels():
    latents = torch.zeros(64, 4, 8, 8)
    plain, _ = diffusion.sample_noise(latents, diffusion.step_generator(1, 0), 0.0, 1000)
    offset, _ = diffusion.sample_noise(latents, diffusion.step_generator(1, 0), 1.0, 1000)
    channel_means = (offset - plain).mean(dim=(2, 3))
    assert torch.allclose((offset - plain), channel_means[:, :, None, None].expand_as(offset), atol=1e-6)
    assert channel_means.std() > 0.5


def test_clip_skip_takes_the_penultimate_layer_through_the_final_norm():
    from trainer.models.loading import load_base_model

    model = load_base_model("tiny")
    ids = model.tokenizer(["sls frog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = diffusion.final_layer_norm(model.text_encoder)(hidden[-2])
        got = diffusion.encode_prompts(model.tokenizer, model.text_encoder, ["sls frog"], 2, torch.device("cpu"))
    torch.testing.assert_close(got, expected)



def test_samples_follow_clip_skip(tmp_path):
    from trainer.models.loading import load_base_model
    from trainer.sampling import write_samples

    pixels = {}
    for clip_skip in (1, 2):
        recipe = load_recipe(RECIPE, fast_overrides(tmp_path, **{"model.clip_skip": clip_skip, "sample.prompts": "[sls frog]", "sample.steps": 2}))
        (path,) = write_samples(load_base_model("tiny"), recipe, 0, tmp_path / f"clip_skip_{clip_skip}", torch.device("cpu"))
        pixels[clip_skip] = np.asarray(Image.open(path))
    assert not np.array_equal(pixels[1], pixels[2])

def test_samples_carry_prompt_and_seed_and_logs_are_written(tmp_path):
    result = _train(tmp_path, **{"train.max_steps": 2, "sample.every_steps": 2, "sample.prompts": "[sls frog in a pond]", "sample.steps": 2, "output.tensorboard": True})
    assert len(result.samples) == 1
    info = Image.open(result.samples[0]).info
    assert info["prompt"] == "sls frog in a pond" and info["seed"] == "1234" and info["training_step"] == "2"
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_text_encoder_gets_its_own_learning_rate():
    from trainer.methods.lora.method import LoraMethod
    from trainer.models.loading import load_base_model

    recipe = load_recipe(RECIPE, ["lora.text_encoder=true", "lora.text_encoder_lr=0.5", "train.lr=0.01"])
    method = LoraMethod(recipe, load_base_model("tiny"))
    method.setup()
    lrs = {group["lr"]: len(group["params"]) for group in method.param_groups()}
    assert set(lrs) == {0.01, 0.5} and all(lrs.values())
