"""Loss masks (data.masks): a mask follows its image through resize, crop and flip; the loss ignores what it
hides and does not learn the rest at a lower rate; masks are cached with the latents; data inspect
reports missing, wrong-size and all-black masks; a masked run resumes exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, fast_overrides, train_and_resume
from tests.tolerances import FP32, Rounding, assert_close_elementwise
from trainer import diffusion
from trainer.data import LatentCache, TrainingData
from trainer.data.dataset import load_pixels
from trainer.data.inspect import inspect_data
from trainer.data.masks import load_mask
from trainer.loop import train
from trainer.models.tiny import sd_noise_scheduler
from trainer.recipe import BucketConfig, DataConfig, load_recipe

RECIPE = REPO / "recipes" / "sls_frog_lora.yaml"


def _gradient_image(size=(160, 96)) -> Image.Image:
    """Red rises left to right and green top to bottom: any misplaced resize, crop or flip shows."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))


def _masked_data(tmp_path, flip=True) -> tuple[TrainingData, DataConfig]:
    image = _gradient_image()
    (tmp_path / "data" / "2_x").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    image.save(tmp_path / "data" / "2_x" / "a.png")
    # The mask is the image's red channel: after the same resize, crop and flip it must equal it.
    image.getchannel("R").save(tmp_path / "masks" / "a.png")
    cfg = DataConfig(dir=str(tmp_path / "data"), resolution=64, flip=flip, masks="dir", mask_dir=str(tmp_path / "masks"),
                     buckets=BucketConfig(min_side=64, max_side=128, step=64))
    return TrainingData(cfg, seed=0, batch_size=1), cfg


@pytest.mark.parametrize("flipped", [False, True])
def test_mask_follows_its_image_through_resize_crop_and_flip(tmp_path, flipped):
    data, cfg = _masked_data(tmp_path)
    (item,) = data.items
    assert item.resized != item.original_size and item.crop_ltrb[:2] != (0, 0)  # the test exercises resize and crop
    red = (load_pixels(item, flipped)[0] + 1) / 2  # [-1, 1] -> [0, 1]: the red channel's 8-bit values / 255
    mask = load_mask(cfg, item, flipped)[0]
    # The same resampling of the same 8-bit values: equal up to the rounding of v / 127.5 - 1, then + 1 and / 2.
    assert_close_elementwise(mask, red, Rounding(FP32, terms=1, depth=4), scale=1.0)


def test_masked_loss_ignores_hidden_pixels_and_keeps_the_rate():
    scheduler = sd_noise_scheduler()
    prediction = torch.zeros(2, 4, 8, 8, requires_grad=True)
    target = torch.ones(2, 4, 8, 8)
    target[:, :, :, 4:] = 100.0  # huge errors where the mask hides
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    loss = diffusion.per_sample_loss(prediction, target, torch.tensor([10, 500]), scheduler, diffusion.ObjectiveSettings(), mask)
    # The mean over the learned half (error 1 everywhere there): 1, not the 0.5 a plain mean would give.
    assert torch.equal(loss, torch.ones(2))
    loss.sum().backward()
    assert torch.count_nonzero(prediction.grad[..., 4:]) == 0 and torch.count_nonzero(prediction.grad[..., :4]) == prediction.grad[..., :4].numel()
    # An all-black mask: the sample teaches nothing (0, not a division by zero).
    empty = diffusion.per_sample_loss(prediction, target, torch.tensor([10, 500]), scheduler, diffusion.ObjectiveSettings(), torch.zeros(2, 1, 8, 8))
    assert torch.equal(empty, torch.zeros(2))


def test_masks_are_cached_with_their_latents(tmp_path):
    data, _ = _masked_data(tmp_path)
    cache = LatentCache("memory", None, vae_id="vae")
    encoded = []

    def encode(pixels):
        encoded.append(len(pixels))
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :1].repeat(1, 4, 1, 1)

    for epoch in (0, 1):
        for samples in data.epoch_batches(epoch):
            batch = data.load_batch(samples, epoch)
            latents, masks = cache.latents(batch, encode)
            assert masks.shape == (len(batch), 1, *latents.shape[-2:])
            # Each latent pixel's mask is the mean of its 8x8 block of the pixel mask.
            expected = torch.nn.functional.avg_pool2d(batch.mask_values(), 8)
            assert_close_elementwise(masks, expected, Rounding(FP32, terms=64, depth=2), scale=1.0)
    assert sum(encoded) == 2  # one image, flipped and not: two entries, each with its mask


def test_inspect_reports_missing_wrong_size_and_black_masks(tmp_path):
    data_dir, mask_dir = tmp_path / "data" / "1_x", tmp_path / "masks"
    data_dir.mkdir(parents=True)
    mask_dir.mkdir()
    for name in ("a", "b", "c", "d"):
        _gradient_image().save(data_dir / f"{name}.png")
    Image.new("L", (160, 96), 0).save(mask_dir / "b.png")  # all black
    Image.new("L", (80, 48), 255).save(mask_dir / "c.png")  # half the size
    Image.new("L", (160, 96), 255).save(mask_dir / "d.jpg")  # another extension is fine
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: lora\ndata:\n  dir: {tmp_path / 'data'}\n  resolution: 64\n  masks: dir\n  mask_dir: {mask_dir}\n", encoding="utf-8")
    inspection = inspect_data(str(recipe))
    report = inspection.report
    assert "have no mask" in report and "a.png" in report
    assert "c.png (80x48, image 160x96)" in report
    assert "all black" in report and "b.png" in report
    assert "d.png" not in report.split("have no mask")[1].split("\n")[0]
    assert inspection.refusal  # missing and wrong-size masks stop training


def test_masked_run_resumes_exactly(tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(REPO / "datasets" / "sls_frog" / "10_sls frog", masks / "10_sls frog", ignore=shutil.ignore_patterns("*.txt"))
    for path in (masks / "10_sls frog").glob("*.png"):
        with Image.open(path) as image:
            half = Image.new("L", image.size, 0)
            half.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
        half.save(path)
    settings = {"data.masks": "dir", "data.mask_dir": str(masks), "train.max_steps": 4, "train.save_every_steps": 2, "train.keep_checkpoints": 0}

    full = train_and_resume(RECIPE, tmp_path, settings)
    unmasked = train(load_recipe(RECIPE, fast_overrides(tmp_path / "plain", **{"train.max_steps": 4})), show_progress=False)
    assert full.final_loss != unmasked.final_loss  # the masks are in effect
