"""The shared loop's options: optimizers resume exactly, checkpointing, v-prediction, loss weighting, samples, logs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides, train_and_resume, trains_in_bf16
from tests.tolerances import FP32, Rounding, assert_close_elementwise
from trainer import diffusion
from trainer.checkpoint import resolve_checkpoint
from trainer.errors import UserError
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
    train_and_resume(RECIPE, tmp_path, settings)


@trains_in_bf16
@pytest.mark.parametrize("recipe", ["sls_frog_lora", "lycoris_loha", "sls_frog_dreambooth", "sls_frog_ti", "sls_frog_hypernetwork"])
def test_bf16_on_a_cpu_trains_every_method_and_resumes_exactly(tmp_path, recipe):
    """train.mixed_precision=bf16 on a CPU (torch's CPU autocast, frozen weights in bf16): every method's
    trained weights move, stay finite, and a run resumed from its step-2 checkpoint ends where the
    uninterrupted run does."""
    settings = {"train.mixed_precision": "bf16", "train.max_steps": 4, "train.save_every_steps": 2, "train.keep_checkpoints": 0}
    train_and_resume(REPO / "recipes" / f"{recipe}.yaml", tmp_path, settings)  # asserts the resumed run ends equal
    full = _weights(tmp_path / "full")
    start = load_file(tmp_path / "full" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in full.values())
    assert any(not torch.equal(full[name], start[name]) for name in full)


def test_8bit_adamw_names_what_it_needs_on_a_cpu_and_without_bitsandbytes(monkeypatch):
    """adamw8bit is the one optimizer with a machine and an optional package behind it: each missing one
    gets its own message with the fix, not an ImportError from deep in the loop."""
    from trainer.optim import optimizer_type

    cfg = load_recipe(RECIPE, ["train.optimizer=adamw8bit"]).train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"'adamw8bit' \(bitsandbytes\) needs a CUDA GPU\. On CPU use train\.optimizer=adamw"):
        optimizer_type(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when it is not installed
    with pytest.raises(UserError, match=r"needs bitsandbytes, which is not installed: run pip install -e \"\.\[cuda\]\""):
        optimizer_type(cfg)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = _train(tmp_path / "plain", **{"train.max_steps": 3})
    checkpointed = _train(tmp_path / "ckpt", **{"train.max_steps": 3, "train.gradient_checkpointing": True})
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    # Checkpointing recomputes the same operations on the same inputs in the same order: the same
    # training to the bit (AdamW's step divides by sqrt(v), which no rounding argument bounds, so any
    # tolerance here would be a guess).
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.final_loss == checkpointed.final_loss


def test_v_prediction_trains_against_velocity_and_is_recorded(tmp_path):
    result = _train(tmp_path, **{"train.max_steps": 2, "model.prediction_type": "v_prediction"})
    meta = read_metadata(result.artifacts[0])
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["modelspec.prediction_type"] == "v"
    scheduler = sd_noise_scheduler("v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    # Four roundings (sqrt, two products, the difference) relative to the two terms' sizes, which the
    # difference may cancel: bound 1e-6. Swapped or mis-signed terms miss by their whole size.
    expected, magnitude = alpha * noise - sigma * latents, (alpha * noise).abs() + (sigma * latents).abs()
    assert_close_elementwise(diffusion.target_for(scheduler, latents, noise, t), expected, Rounding(FP32, terms=1, depth=4), scale=magnitude)


def test_min_snr_gamma_weights_each_sample():
    scheduler = sd_noise_scheduler()
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    t = torch.tensor([1, 300, 999])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    # 1 - a, a / (1 - a), min(., 5) / snr and the product with the loss (exactly 1): four roundings, bound
    # 1e-6 of each weight. The v-prediction weight min(snr, 5) / (snr + 1) in its place misses by 2e-3 of
    # it at t = 1, by all of it at t = 999.
    assert_close_elementwise(diffusion.per_sample_loss(prediction, target, t, scheduler, diffusion.ObjectiveSettings(min_snr_gamma=5.0)), expected, Rounding(FP32, terms=1, depth=4))
    # The mean of 16 squared differences of exactly 1 is exactly 1, in any order of summation.
    assert torch.equal(diffusion.per_sample_loss(prediction, target, t, scheduler, diffusion.ObjectiveSettings()), torch.ones(3))


def test_noise_offset_shifts_whole_channels():
    latents = torch.zeros(64, 4, 8, 8)
    plain, _ = diffusion.sample_noise(latents, torch.Generator().manual_seed(1), 0.0, 1000)
    offset, _ = diffusion.sample_noise(latents, torch.Generator().manual_seed(1), 1.0, 1000)
    channel_means = (offset - plain).mean(dim=(2, 3))
    # offset - plain is the channel's offset up to the rounding of noise + offset, relative to |noise + offset|,
    # and its mean sums 64 of those: bound 7e-6 of the largest |noise + offset|. Noise drawn per pixel
    # instead of per channel would leave differences of order 1.
    same_in_channel = Rounding(FP32, terms=64, depth=3)
    assert_close_elementwise(offset - plain, channel_means[:, :, None, None].expand_as(offset), same_in_channel, scale=offset.abs().max())
    assert channel_means.std() > 0.5


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_encodes_prompts_as_diffusers_does(clip_skip, monkeypatch):
    # The oracle is diffusers' own prompt encoding. It counts layers skipped after the last one, so sdtrain's
    # (and A1111's and kohya's) model.clip_skip = n is diffusers' clip_skip = n - 1, and 1 is diffusers' None.
    from diffusers import StableDiffusionPipeline

    from trainer.models.loading import load_base_model

    model = load_base_model("tiny")
    (text_encoder,) = model.text_encoders
    if not hasattr(text_encoder.model, "text_model"):
        # diffusers 0.42 reaches the final norm through `.text_model`, a level transformers 5 removed from CLIPTextModel.
        monkeypatch.setattr(type(text_encoder.model), "text_model", property(lambda encoder: encoder), raising=False)
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer, unet=model.unet, scheduler=model.noise_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    assert clip_skip <= text_encoder.model.config.num_hidden_layers  # each case picks a layer's output, not the embeddings
    with torch.no_grad():
        expected, _ = pipe.encode_prompt("sls frog", torch.device("cpu"), 1, False, clip_skip=clip_skip - 1 or None)
        got = model.encode_text(["sls frog"], clip_skip).hidden_states
    # The same modules run on the same token ids in the same order: bit-identical, not merely close.
    assert torch.equal(got, expected)



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


def test_mixed_precision_keeps_trained_weights_exact_and_frozen_parts_in_the_compute_dtype():
    """Under bf16 (run here on the CPU: the dtypes, not the device, are what is checked) a full fine-tune's
    master weights are the fp32 originals, not values rounded to bf16 and widened again; frozen parts
    take the compute dtype (the VAE its fp32 when model.vae_fp32)."""
    from trainer.loop import _prepare_model
    from trainer.methods.dreambooth.method import DreamBoothMethod
    from trainer.models.loading import load_base_model

    recipe = load_recipe(REPO / "recipes" / "sls_frog_dreambooth.yaml", ["dreambooth.prior_preservation=false", "dreambooth.ema=false"])
    original = dict(load_base_model("tiny").unet.named_parameters())
    # Loaded as the loop loads it for a bf16 run: frozen parts straight in bf16, the method's own in fp32.
    model = load_base_model("tiny", frozen_dtype=torch.bfloat16, full_precision_parts=DreamBoothMethod.full_precision_parts(recipe))
    method = DreamBoothMethod(recipe, model)
    method.setup()
    trainable = _prepare_model(model, method, torch.device("cpu"), torch.bfloat16, gradient_checkpointing=False)
    assert trainable and all(param.dtype == torch.float32 for param in trainable)
    assert all(torch.equal(param, original[name]) for name, param in model.unet.named_parameters())
    assert model.vae.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("prior_preservation", "train_text_encoder", "fp32_parts"),
    [(True, False, {"unet", "text_encoder", "vae"}), (False, True, {"unet", "text_encoder"}), (False, False, {"unet"})],
)
def test_dreambooth_loads_in_fp32_only_what_it_trains_or_draws_class_images_with(prior_preservation, train_text_encoder, fp32_parts):
    # Prior preservation draws class images with the whole base model before training (fp32, as ever); without
    # it a frozen text encoder and the VAE load straight in the compute dtype.
    from trainer.methods.dreambooth.method import DreamBoothMethod
    from trainer.models.loading import load_base_model

    recipe = load_recipe(
        REPO / "recipes" / "sls_frog_dreambooth.yaml",
        [f"dreambooth.prior_preservation={str(prior_preservation).lower()}", f"dreambooth.train_text_encoder={str(train_text_encoder).lower()}"],
    )
    model = load_base_model("tiny", frozen_dtype=torch.bfloat16, full_precision_parts=DreamBoothMethod.full_precision_parts(recipe))
    dtypes = {name: {p.dtype for p in part.parameters()} for name, part in model.parts().items()}
    assert dtypes == {name: {torch.float32 if name in fp32_parts else torch.bfloat16} for name in dtypes}
