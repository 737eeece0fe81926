"""DreamBooth end to end on the built-in model: class images, prior loss, full-model exports, resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, draw, fast_overrides
from tests.tolerances import assert_close_in_norm, layer_rounding, relative_error
from trainer.convert import convert_checkpoint
from trainer.errors import UserError
from trainer.formats.safetensors_file import read_metadata
from trainer.loop import train
from trainer.methods.dreambooth import class_images
from trainer.methods.dreambooth.method import DreamBoothMethod
from trainer.methods.base import TrainingBatch
from trainer.models.conditioning import ImageGeometry
from trainer.models.loading import load_base_model
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "sls_frog_dreambooth.yaml"
NUM_CLASS_IMAGES = 4


def _recipe(out, class_dir, **extra):
    values = {
        "train.max_steps": 6,
        "train.save_every_steps": 2,
        "train.keep_checkpoints": 10,
        "dreambooth.class_dir": str(class_dir),
        "dreambooth.num_class_images": NUM_CLASS_IMAGES,
        "dreambooth.class_sample_steps": 2,
        "dreambooth.class_batch_size": 3,  # 4 images: one full batch and one short one
        "dreambooth.text_encoder_steps": 3,
        "dreambooth.ema": True,
    }
    values.update(extra)
    return load_recipe(RECIPE, fast_overrides(out, **values))


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class_images") / "frog"


@pytest.fixture(scope="module")
def run(tmp_path_factory, class_dir):
    """The uninterrupted run: generates the class images, trains 6 steps, writes both formats (the recipe's fp16)."""
    out = tmp_path_factory.mktemp("dreambooth")
    result = train(_recipe(out, class_dir), show_progress=False)
    return out, result


def _mtimes(directory):
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


def _weights(out, step):
    return load_file(out / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")


# ------------------------------------------------------------------------------------------------
# Class images


def test_class_images_are_generated_with_prompt_and_seed(run, class_dir):
    names = sorted(path.name for path in class_dir.iterdir())
    assert names == [class_images.image_name(i) for i in range(NUM_CLASS_IMAGES)]
    for index, name in enumerate(names):
        with Image.open(class_dir / name) as image:
            assert image.size == (64, 64)
            assert image.info["prompt"] == "a photo of a frog"
            assert image.info["seed"] == str(index)  # class_seed 0 + index
            assert "Seed: " in image.info["parameters"]


def test_class_images_are_reused_and_only_missing_ones_drawn(run, class_dir, tmp_path):
    recipe = _recipe(tmp_path / "out", class_dir)
    model = load_base_model("tiny")
    request = DreamBoothMethod(recipe, model).class_image_request()
    before = _mtimes(class_dir)
    assert class_images.ensure_class_images(model, request, torch.device("cpu")) == []
    assert _mtimes(class_dir) == before
    # Images drawn for another prompt are pointed out (they would be captioned with the new one).
    assert class_images.images_of_other_prompts(replace(request, prompt="a photo of a cat")) == sorted(before)
    assert class_images.images_of_other_prompts(request) == []

    # A deleted image comes back from its own seed; the others stay untouched.
    copy = tmp_path / "copy"
    shutil.copytree(class_dir, copy)
    removed = copy / class_images.image_name(1)
    original = np.asarray(Image.open(removed).convert("RGB"), dtype=np.int16)
    removed.unlink()
    kept = _mtimes(copy)
    bigger = replace(request, directory=copy, count=NUM_CLASS_IMAGES + 1)
    drawn = class_images.ensure_class_images(model, bigger, torch.device("cpu"))
    assert [path.name for path in drawn] == [class_images.image_name(1), class_images.image_name(NUM_CLASS_IMAGES)]
    assert {name: t for name, t in _mtimes(copy).items() if name in kept} == kept
    redrawn = np.asarray(Image.open(removed).convert("RGB"), dtype=np.int16)
    # Same seed, same picture: drawn in another batch its floats differ by rounding only, far below the
    # 1/255 it takes to move a pixel by more than one level; a picture from another seed differs by far more.
    assert np.abs(redrawn - original).max() <= 1


# ------------------------------------------------------------------------------------------------
# The prior loss


def _unet_gradient(method, latents, captions, weights, noise, timesteps, denominator):
    method.model.unet.zero_grad(set_to_none=True)
    geometry = [ImageGeometry.square(latents.shape[-1] * method.model.vae_scale_factor)] * len(latents)
    method.loss(TrainingBatch(latents, captions, geometry, weights, noise, timesteps, denominator)).backward()
    return torch.cat([p.grad.flatten() for p in method.model.unet.parameters()])


def test_prior_loss_enters_the_gradient(run, class_dir, tmp_path):
    from trainer.data import TrainingData

    model = load_base_model("tiny")
    gradients = {}
    for weight in (0.0, 1.0):
        recipe = _recipe(tmp_path / "out", class_dir, **{"dreambooth.prior_loss_weight": weight, "train.batch_size": 4})
        method = DreamBoothMethod(recipe, model)
        data = TrainingData(recipe.data, seed=1, batch_size=4, reg_loss_weight=DreamBoothMethod.reg_loss_weight(recipe))
        data = method.prepare_data(data, torch.device("cpu"))
        method.setup()
        batches = (data.load_batch(samples, 0) for samples in data.epoch_batches(0))
        batch = next(b for b in batches if len({item.is_reg for item in b.items}) == 2)
        is_reg = torch.tensor([item.is_reg for item in batch.items])
        assert batch.loss_weights[is_reg].eq(weight).all() and batch.loss_weights[~is_reg].eq(1.0).all()
        with torch.no_grad():
            latents = model.encode_latents(batch.pixel_values())
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
        # The batch's mean divides by the samples that count (class samples of weight 0 do not).
        gradients[weight] = _unet_gradient(method, latents, batch.captions, batch.loss_weights, noise, timesteps, data.counted_samples(batch.sample_indices))
        if "instance only" not in gradients:  # the same batch for both weights: same data, same seed
            instance = ~is_reg
            captions = [caption for caption, reg in zip(batch.captions, is_reg) if not reg]
            gradients["instance only"] = _unet_gradient(
                method, latents[instance], captions, torch.ones(len(captions)), noise[instance], timesteps[instance], len(captions)
            )
    # Weight 0: the class samples change nothing; weight 1: they do, by a lot. Without the class samples
    # the instance gradient is the same sum in another order (oneDNN blocks a batch of 4 unlike one of
    # 2): rounding alone, forward and backward through every UNet layer, the longest sum 1152 terms (a 3x3
    # convolution over 128 channels). Bound 4.5e-4 of the gradient's norm, measured 1.3e-6; class
    # samples that count move it by 0.76 (weight 1), or by 0.5 (weight 0 but counted in the batch size).
    rounding = layer_rounding(model.unet, passes=2, sums=latents[:, 0].numel())
    assert_close_in_norm(gradients[0.0], gradients["instance only"], rounding, what="UNet gradient with class weight 0")
    assert relative_error(gradients[1.0], gradients["instance only"]) > 0.05


# ------------------------------------------------------------------------------------------------
# Exports


def test_single_file_loads_in_diffusers_and_draws_what_the_folder_draws(run):
    from diffusers import StableDiffusionPipeline

    out, result = run
    single, folder = out / "sls_frog.safetensors", out / "sls_frog_diffusers"
    assert result.artifacts == [single, folder]
    prefixes = {key.split(".")[0] for key in load_file(single)}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    meta = read_metadata(single)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "sls_frog"
    assert meta["modelspec.description"] == "sls frog DreamBooth on the sdtrain tiny model"

    # The folder's fp16 variant holds the weights the single file holds (both in output.save_dtype).
    from_folder = StableDiffusionPipeline.from_pretrained(folder, variant="fp16")
    from_file = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    from_file.scheduler = from_folder.scheduler
    np.testing.assert_array_equal(draw(from_folder), draw(from_file))


def test_diffusers_folder_loads_plainly_and_as_its_fp16_variant(run):
    """save_dtype fp16 once gave a folder whose plain load mixed a half text encoder with a float32 UNet."""
    from diffusers import StableDiffusionPipeline

    out, _ = run
    folder = out / "sls_frog_diffusers"
    plain = StableDiffusionPipeline.from_pretrained(folder)
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    assert np.isfinite(draw(plain)).all()
    half = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}
    assert np.isfinite(draw(half)).all()


def test_export_is_the_ema_of_the_trained_weights(run):
    out, _ = run
    final = _weights(out, 6)
    folder = out / "sls_frog_diffusers"
    exported = load_base_model(str(folder))
    for part in ("unet", "text_encoder"):
        for name, tensor in exported.parts()[part].state_dict().items():
            if f"{part}.{name}" in final:
                assert torch.equal(tensor, final[f"ema.{part}.{name}"]), name
    # The main files keep the float32 EMA; the fp16 variant is that, rounded once.
    variant = load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert variant.keys() == exported.unet.state_dict().keys()
    for name, tensor in exported.unet.state_dict().items():
        assert torch.equal(variant[name], tensor.half()), name
    assert any(not torch.equal(final[k], final[f"ema.{k}"]) for k in final if k.startswith("unet."))


def test_convert_original_to_diffusers_and_back_is_exact(run, tmp_path):
    out, _ = run
    original = out / "sls_frog.safetensors"  # fp16: fp16 -> float32 folder -> fp16 is exact
    folder = convert_checkpoint(original, tmp_path / "converted", "fp16", config=out / "sls_frog_diffusers")
    assert (folder / "model_index.json").is_file()
    back = convert_checkpoint(folder, tmp_path / "back.safetensors", "fp16")
    expected, actual = load_file(original), load_file(back)
    assert sorted(expected) == sorted(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key
    full = load_file(convert_checkpoint(folder, tmp_path / "full.safetensors", "fp32"))
    assert {t.dtype for t in full.values() if t.is_floating_point()} == {torch.float32}
    with pytest.raises(UserError, match="already exists"):
        convert_checkpoint(folder, back, "fp16")
    with pytest.raises(UserError, match="--config"):  # the tiny model is not SD1.5-shaped
        convert_checkpoint(original, tmp_path / "no_config", "fp32")


# ------------------------------------------------------------------------------------------------
# Resume and the text-encoder stop


def test_resume_equals_uninterrupted_run(run, class_dir, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    before = _mtimes(class_dir)
    train(_recipe(resumed, class_dir), resume="latest", show_progress=False)
    assert _mtimes(class_dir) == before  # the class images were reused, not drawn again
    expected, actual = _weights(out, 6), _weights(resumed, 6)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert any(not torch.equal(_weights(out, 4)[k], v) for k, v in expected.items() if k.startswith("unet."))


def test_text_encoder_stops_after_its_steps(run):
    out, _ = run
    steps = {step: _weights(out, step) for step in (2, 4, 6)}
    text = [key for key in steps[2] if key.startswith("text_encoder.")]
    assert text
    assert any(not torch.equal(steps[2][k], steps[4][k]) for k in text)  # step 3 still trained it
    assert all(torch.equal(steps[4][k], steps[6][k]) for k in text)  # steps 4-6 did not
    assert steps[6]["dreambooth.optimizer_steps"].item() == 6
    # The text encoder has its own learning rate (the recipe's 5e-5 next to the UNet's 1e-4).
    state = json.loads((out / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [1.0e-4, 5.0e-5]


# ------------------------------------------------------------------------------------------------
# The plain full fine-tune, and bad input


def test_plain_full_finetune_with_tag_captions(tmp_path):
    class_dir = tmp_path / "never"
    recipe = _recipe(
        tmp_path / "out", class_dir,
        **{"dreambooth.prior_preservation": False, "dreambooth.class_prompt": "null", "data.dir": str(REPO / "datasets" / "tagged_example"),
           "data.shuffle_tags": True, "data.keep_tokens": 1, "train.max_steps": 2, "output.formats": "[single_file]",
           "output.save_dtype": "fp32"},
    )
    result = train(recipe, show_progress=False)
    assert not class_dir.exists()
    trained = load_file(result.artifacts[0])
    checkpoint = load_file(tmp_path / "out" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(trained[key], checkpoint["ema.unet.conv_out.weight"])
    assert not torch.equal(trained[key], load_base_model("tiny").unet.conv_out.weight.detach())


@pytest.mark.parametrize(
    "case, fragment",
    [("no class prompt", "dreambooth.class_prompt"), ("class dir is a file", "dreambooth.class_dir"), ("disk full", "MiB free")],
)
def test_bad_input_stops_before_training(tmp_path, monkeypatch, case, fragment):
    class_dir = tmp_path / "class"
    extra = {}
    if case == "no class prompt":
        extra["dreambooth.class_prompt"] = "null"
    if case == "class dir is a file":
        class_dir.write_text("not a folder")
    if case == "disk full":
        monkeypatch.setattr(class_images.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=fragment):
        train(_recipe(out, class_dir, **extra), show_progress=False)
    assert not (out / "checkpoints").exists()


def test_ema_follows_diffusers_ema_model_step_by_step():
    # diffusers' EMAModel is the oracle: its warm-up decay (1 + n) / (10 + n), capped at the recipe's decay.
    from diffusers.training_utils import EMAModel

    max_decay, steps = 0.3, 6  # the warm-up passes 0.3 at the fourth update: both regimes are checked
    recipe = load_recipe(RECIPE, ["dreambooth.ema=true", f"dreambooth.ema_decay={max_decay}", "dreambooth.prior_preservation=false", "output.save_dtype=fp32"])
    model = load_base_model("tiny")
    method = DreamBoothMethod(recipe, model)
    method.setup()
    params = list(model.unet.parameters())
    oracle = EMAModel(params, decay=max_decay)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():  # an "optimizer step": every weight moves
            for param in params:
                param.add_(torch.randn(param.shape, generator=generator), alpha=0.1)
        method.after_optimizer_step()
        oracle.step(params)
    exported = list(method.exported_model().unet.parameters())
    for ours, expected in zip(exported, oracle.shadow_params, strict=True):
        # Each update is a convex combination in float32, ours by lerp, diffusers' by s - (1 - d)(s - p): a few
        # roundings of relative size eps per step, not amplified by later steps, so 4 * steps * eps of the largest value.
        atol = 4 * steps * torch.finfo(torch.float32).eps * float(expected.abs().max())
        torch.testing.assert_close(ours, expected, rtol=0, atol=atol)
    assert not torch.equal(exported[0], params[0])  # the export is the EMA, not the last weights
