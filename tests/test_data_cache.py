"""trainer.data.cache: latents are encoded once per (image bytes, bucket, crop, flip, VAE), never reused stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data import LatentCache, TrainingData, vae_fingerprint
from trainer.errors import UserError
from trainer.recipe import BucketConfig, DataConfig


def make_image(path: Path, size=(128, 128), color=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


class CountingEncoder:
    """Stands in for the VAE: 8x average pooling, counting how many images it was asked to encode."""

    def __init__(self):
        self.encoded = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)


def dataset(root: Path, resolution=128, flip=False) -> TrainingData:
    cfg = DataConfig(dir=str(root), resolution=resolution, flip=flip, buckets=BucketConfig(min_side=64, max_side=256, step=64))
    return TrainingData(cfg, seed=0, batch_size=2)


def one_epoch(data: TrainingData, cache: LatentCache, encoder: CountingEncoder, epoch=0) -> list[torch.Tensor]:
    return [cache.latents(data.load_batch(batch, epoch), encoder)[0] for batch in data.epoch_batches(epoch)]


@pytest.fixture
def images(tmp_path) -> Path:
    make_image(tmp_path / "data" / "1_x" / "a.png", color=(255, 0, 0))
    make_image(tmp_path / "data" / "1_x" / "b.png", color=(0, 255, 0))
    return tmp_path / "data"


def test_memory_cache_encodes_once_and_skips_pixel_loading_on_hits(images):
    data, encoder = dataset(images), CountingEncoder()
    cache = LatentCache("memory", None, vae_id="vae1")
    first = one_epoch(data, cache, encoder)
    assert encoder.encoded == 2 and first[0].shape == (2, 3, 16, 16)
    for path in (images / "1_x").iterdir():
        path.unlink()  # a full hit must not even open the image files
    assert all(torch.equal(a, b) for a, b in zip(first, one_epoch(data, cache, encoder)))
    assert encoder.encoded == 2 and (cache.hits, cache.misses) == (2, 2)


def test_mode_none_encodes_every_time(images):
    data, encoder = dataset(images), CountingEncoder()
    cache = LatentCache("none", None, vae_id="vae1")
    one_epoch(data, cache, encoder)
    one_epoch(data, cache, encoder)
    assert encoder.encoded == 4


def test_changed_bytes_bucket_or_vae_give_new_keys(images, tmp_path):
    encoder = CountingEncoder()
    directory = tmp_path / "cache"
    cache = LatentCache("disk", directory, vae_id="vae1")
    one_epoch(dataset(images), cache, encoder)
    assert encoder.encoded == 2

    make_image(images / "1_x" / "a.png", color=(0, 0, 255))  # new bytes for a.png only
    one_epoch(dataset(images), cache, encoder)
    assert encoder.encoded == 3

    one_epoch(dataset(images, resolution=192), cache, encoder)  # another bucket for both
    assert encoder.encoded == 5

    one_epoch(dataset(images), LatentCache("disk", directory, vae_id="vae2"), encoder)  # same folder, other VAE
    assert encoder.encoded == 7


def test_flipped_samples_are_cached_separately(tmp_path):
    make_image(tmp_path / "40_x" / "a.png")
    data, encoder = dataset(tmp_path, flip=True), CountingEncoder()
    cache = LatentCache("memory", None, vae_id="vae1")
    one_epoch(data, cache, encoder)
    assert encoder.encoded == 2  # 40 samples of one image: one unflipped and one flipped latent
    latents = {}
    for batch in data.epoch_batches(0):
        loaded = data.load_batch(batch, 0)
        for flipped, latent in zip(loaded.flipped, cache.latents(loaded, encoder)[0]):
            latents[flipped] = latent
    assert set(latents) == {False, True}


def test_disk_cache_survives_a_new_instance_and_writes_atomically(images, tmp_path):
    data, encoder = dataset(images), CountingEncoder()
    directory = tmp_path / "cache"
    first = one_epoch(data, LatentCache("disk", directory, vae_id="vae1"), encoder)
    files = sorted(directory.iterdir())
    assert len(files) == 2 and all(path.suffix == ".safetensors" for path in files)  # no temporary leftovers
    again = one_epoch(data, LatentCache("disk", directory, vae_id="vae1"), encoder)
    assert encoder.encoded == 2
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    one_epoch(data, LatentCache("disk", directory, vae_id="vae2"), encoder)
    assert encoder.encoded == 4


def test_a_damaged_disk_entry_is_a_miss(images, tmp_path):
    data, encoder = dataset(images), CountingEncoder()
    directory = tmp_path / "cache"
    one_epoch(data, LatentCache("disk", directory, vae_id="vae1"), encoder)
    next(directory.iterdir()).write_bytes(b"garbage")
    one_epoch(data, LatentCache("disk", directory, vae_id="vae1"), encoder)
    assert encoder.encoded == 3


def test_cache_settings_are_checked():
    with pytest.raises(UserError, match="data.cache_latents"):
        LatentCache("gpu", None, vae_id="x")
    with pytest.raises(UserError, match="data.cache_dir"):
        LatentCache("disk", None, vae_id="x")


def test_vae_fingerprint_covers_weights_and_dtype():
    torch.manual_seed(0)
    vae = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    same = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    same.load_state_dict(vae.state_dict())
    assert vae_fingerprint(vae) == vae_fingerprint(same)
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0] += 1e-3
    assert vae_fingerprint(vae) != vae_fingerprint(same)
    halves = {vae_fingerprint(vae.to(dtype)) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    assert len(halves) == 3
