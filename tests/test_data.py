"""trainer.data: discovery, captions, buckets, batches and the errors a user sees.

Every image is drawn here in tmp_path, so the tests do not depend on the example datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import TrainingData
from trainer.data.buckets import BucketPlan, bucket_resolutions
from trainer.data.captions import process_caption
from trainer.data.seeding import seeded_rng
from trainer.errors import UserError
from trainer.recipe import BucketConfig, DataConfig, SubsetConfig

# Small images keep the tests fast: 128 px training resolution, 64 px bucket steps.
SMALL_BUCKETS = BucketConfig(min_side=64, max_side=256, step=64)


def make_image(path: Path, size=(128, 128), color=(200, 40, 40), mode="RGB", caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def small_cfg(**kwargs) -> DataConfig:
    kwargs.setdefault("resolution", 128)
    kwargs.setdefault("buckets", BucketConfig(min_side=64, max_side=256, step=64))
    return DataConfig(**kwargs)


def by_name(data: TrainingData) -> dict:
    return {item.origin.name: item for item in data.items}


# ---------------------------------------------------------------- discovery and captions from files


def test_kohya_folders_give_repeats_and_fallback_words(tmp_path):
    root = tmp_path / "img"
    make_image(root / "10_sls frog" / "a.png", caption="sls frog, on a rock\nsecond line is ignored")
    make_image(root / "10_sls frog" / "b.png")
    make_image(root / "3_frog" / "c.png")
    make_image(root / "notes" / "d.png")  # no "<int>_" prefix: skipped with a warning

    data = TrainingData(small_cfg(dir=str(root)), seed=1, batch_size=1)
    items = by_name(data)

    assert set(items) == {"a.png", "b.png", "c.png"}
    assert (items["a.png"].repeats, items["a.png"].subset) == (10, "10_sls frog")
    assert items["a.png"].caption == "sls frog, on a rock"
    assert (items["b.png"].caption, items["b.png"].caption_source) == ("sls frog", "folder words")
    assert (items["c.png"].caption, items["c.png"].repeats) == ("frog", 3)
    assert any("notes" in warning for warning in data.warnings)
    assert data.dataset_dirs == {"10_sls frog": {"n_repeats": 10, "img_count": 2}, "3_frog": {"n_repeats": 3, "img_count": 1}}
    assert data.num_train_images == 10 * 2 + 3  # kohya counts repeats
    assert data.tag_frequency["10_sls frog"] == {"sls frog": 2, "on a rock": 1}


def test_recipe_subsets_with_their_own_repeats_caption_and_extension(tmp_path):
    make_image(tmp_path / "a" / "one.png")
    make_image(tmp_path / "b" / "two.png")
    (tmp_path / "b" / "two.caption").write_text("from the caption file", encoding="utf-8")
    (tmp_path / "b" / "two.txt").write_text("not this one", encoding="utf-8")
    cfg = small_cfg(subsets=[
        SubsetConfig(dir=str(tmp_path / "a"), repeats=4, caption="subset words"),
        SubsetConfig(dir=str(tmp_path / "b"), repeats=2, caption_extension=".caption"),
    ])
    items = by_name(TrainingData(cfg, seed=1, batch_size=1))
    assert (items["one.png"].repeats, items["one.png"].caption, items["one.png"].caption_source) == (4, "subset words", "subset caption")
    assert (items["two.png"].repeats, items["two.png"].caption) == (2, "from the caption file")


def test_formats_are_case_insensitive_and_other_files_are_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "1_x"
    for name in ("a.PNG", "b.jpg", "c.JPEG", "d.webp", "e.bmp"):
        make_image(folder / name)
    (folder / "readme.md").write_text("hello")
    data = TrainingData(small_cfg(dir=str(tmp_path)), seed=1, batch_size=1)
    assert sorted(by_name(data)) == ["a.PNG", "b.jpg", "c.JPEG", "d.webp", "e.bmp"]
    assert any("readme.md" in warning for warning in data.warnings)


def test_an_empty_caption_file_means_an_empty_caption_not_the_folder_words(tmp_path):
    make_image(tmp_path / "5_sls frog" / "a.png", caption="")
    data = TrainingData(small_cfg(dir=str(tmp_path)), seed=1, batch_size=1)
    assert (data.items[0].caption, data.items[0].caption_source) == ("", "none")
    assert any("no caption" in warning and "a.png" in warning for warning in data.warnings)


def test_metadata_jsonl_folder(tmp_path):
    folder = tmp_path / "hf"
    make_image(folder / "a.png")
    make_image(folder / "images" / "b.png")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "images/b.png", "text": "another"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    data = TrainingData(small_cfg(subsets=[SubsetConfig(dir=str(folder))]), seed=1, batch_size=1)
    captions = {item.relative_path: (item.caption, item.caption_source) for item in data.items}
    assert captions == {"a.png": ("a red square", "metadata"), "images/b.png": ("another", "metadata")}


# ---------------------------------------------------------------- caption processing


TAGS = "a, b, c, d, e, f, g, h"


def captions_for(data: TrainingData, epoch: int) -> list[str]:
    return [data.load_batch([sample], epoch).captions[0] for sample in range(data.num_samples)]


def tagged_dataset(tmp_path, seed=7, **cfg) -> TrainingData:
    make_image(tmp_path / "20_x" / "a.png", caption=TAGS)
    return TrainingData(small_cfg(dir=str(tmp_path), shuffle_tags=True, keep_tokens=2, **cfg), seed=seed, batch_size=1)


def test_tag_shuffle_is_seeded_by_seed_epoch_and_sample(tmp_path):
    data = tagged_dataset(tmp_path)
    epoch0 = captions_for(data, 0)
    assert epoch0 == captions_for(data, 0)  # same (seed, epoch, index) -> same caption
    assert epoch0 == captions_for(TrainingData(data.cfg, seed=7, batch_size=1), 0)  # ... in a new run too
    assert epoch0 != captions_for(data, 1)
    assert epoch0 != captions_for(TrainingData(data.cfg, seed=8, batch_size=1), 0)
    assert len(set(epoch0)) > 1  # samples of one image are shuffled differently
    for caption in epoch0 + captions_for(data, 1):
        tags = caption.split(", ")
        assert tags[:2] == ["a", "b"]  # keep_tokens stay in place
        assert sorted(tags) == sorted(TAGS.split(", "))


def test_caption_dropout_and_tag_dropout_rates():
    n = 4000
    cfg = DataConfig(caption_dropout=0.3)
    dropped = sum(process_caption(TAGS, cfg, seeded_rng(1, 0, i, "caption")) == "" for i in range(n))
    assert abs(dropped / n - 0.3) < 0.03

    cfg = DataConfig(tag_dropout=0.25, keep_tokens=2)
    kept_flexible = 0
    for i in range(n):
        tags = process_caption(TAGS, cfg, seeded_rng(1, 0, i, "caption")).split(", ")
        assert tags[:2] == ["a", "b"]  # the fixed head is never dropped
        kept_flexible += len(tags) - 2
    assert abs(1 - kept_flexible / (6 * n) - 0.25) < 0.02


def test_trigger_word_is_prepended_once_and_dropped_with_the_caption():
    rng = seeded_rng(0)
    cfg = DataConfig(trigger_word="sls frog")
    assert process_caption("on a rock", cfg, rng) == "sls frog, on a rock"
    assert process_caption("sls frog, on a rock", cfg, rng) == "sls frog, on a rock"
    assert process_caption("sls froggy pond", cfg, rng) == "sls frog, sls froggy pond"
    assert process_caption("", cfg, rng) == "sls frog"
    assert process_caption("on a rock", DataConfig(trigger_word="sls frog", caption_dropout=1.0), rng) == ""
    # Without tag operations a prose caption is passed through untouched.
    assert process_caption("a frog,  sitting", DataConfig(), rng) == "a frog,  sitting"
    # Regularisation images keep their plain class caption.
    assert process_caption("a photo of a frog", cfg, rng, is_reg=True) == "a photo of a frog"


# ---------------------------------------------------------------- buckets


def test_kohya_bucket_list_for_512():
    # By hand from the rule: area 512*512 = 262144; for width w, height = min(1024, floor(262144/w/64)*64).
    widths_to_heights = {256: 1024, 320: 768, 384: 640, 448: 576, 512: 512, 576: 448, 640: 384, 704: 320,
                         768: 320, 832: 256, 896: 256, 960: 256, 1024: 256}
    expected = {(512, 512)}
    for w, h in widths_to_heights.items():
        expected |= {(w, h), (h, w)}
    assert bucket_resolutions(512, 256, 1024, 64) == sorted(expected)


def test_bucket_assignment_cover_and_centre_crop(tmp_path):
    plan = BucketPlan(DataConfig(resolution=512, buckets=BucketConfig(min_side=256, max_side=1024, step=64)))
    # 1024x512 has aspect 2.0: candidates 704x320 (2.2, error 0.2), 640x384 (1.67, 0.33), 768x320 (2.4, 0.4).
    placement = plan.place((1024, 512))
    assert placement.bucket == (704, 320)
    # Cover: scale = max(704/1024, 320/512) = 0.6875 -> 704x352, crop 16 px off top and bottom.
    assert placement.resized == (704, 352)
    assert placement.crop_ltrb == (0, 16, 704, 336)
    assert plan.place((512, 1024)).bucket == (320, 704)
    assert plan.place((800, 800)).bucket == (512, 512)
    exact = plan.place((640, 384))  # a bucket size itself: no resize, no crop
    assert (exact.bucket, exact.resized, exact.crop_ltrb) == ((640, 384), (640, 384), (0, 0, 640, 384))

    # The same through TrainingData, from a real file.
    make_image(tmp_path / "1_x" / "wide.png", size=(1024, 512))
    cfg = DataConfig(dir=str(tmp_path), resolution=512, buckets=BucketConfig(min_side=256, max_side=1024, step=64))
    data = TrainingData(cfg, seed=0, batch_size=1)
    assert data.items[0].bucket == (704, 320)
    assert data.load_batch([0], 0).pixel_values().shape == (1, 3, 320, 704)
    assert data.bucket_info["buckets"] == {
        bucket_resolutions(512, 256, 1024, 64).index((704, 320)): {"resolution": [704, 320], "count": 1}
    }
    assert data.bucket_info["mean_img_ar_error"] == pytest.approx(0.2)


def test_no_upscale_shrinks_to_the_area_and_floors_to_the_step():
    plan = BucketPlan(DataConfig(resolution=512, buckets=BucketConfig(min_side=64, step=64, no_upscale=True)))
    # 2000x1000: shrink by sqrt(262144/2e6) = 0.362 -> 724.1 x 362.0 -> floored to 704x320.
    assert plan.place((2000, 1000)).bucket == (704, 320)
    # 300x200 is under the area: never enlarged, just floored to 256x192; cover scale 0.96 <= 1.
    small = plan.place((300, 200))
    assert small.bucket == (256, 192)
    assert small.resized[0] <= 300 and small.resized[1] <= 200


def test_buckets_off_gives_one_square_bucket():
    plan = BucketPlan(DataConfig(resolution=256, buckets=BucketConfig(enabled=False)))
    placement = plan.place((300, 600))
    # scale max(256/300, 256/600) = 0.853 -> 256x512, centre crop rows 128..384.
    assert (placement.bucket, placement.resized, placement.crop_ltrb) == ((256, 256), (256, 512), (0, 128, 256, 384))


# ---------------------------------------------------------------- batches


def mixed_dataset(tmp_path, batch_size=2, seed=3, **cfg) -> TrainingData:
    for i in range(3):
        make_image(tmp_path / "4_x" / f"square{i}.png", size=(128, 128))
    for i in range(2):
        make_image(tmp_path / "4_x" / f"wide{i}.png", size=(256, 128))
    return TrainingData(small_cfg(dir=str(tmp_path), **cfg), seed=seed, batch_size=batch_size)


def test_epoch_batches_are_deterministic_and_within_one_bucket(tmp_path):
    data = mixed_dataset(tmp_path)
    batches = data.epoch_batches(0)
    assert batches == data.epoch_batches(0)
    assert batches == TrainingData(data.cfg, seed=3, batch_size=2).epoch_batches(0)
    assert batches != data.epoch_batches(1)
    assert len(batches) == data.batches_per_epoch == 6 + 4  # 12 square samples / 2, 8 wide samples / 2
    assert sorted(sample for batch in batches for sample in batch) == list(range(data.num_samples))
    for batch in batches:
        assert len({data.load_batch([s], 0).size for s in batch}) == 1
        assert data.load_batch(batch, 0).pixel_values().shape[0] == len(batch)


def test_regularisation_is_balanced_like_kohya_and_weighted(tmp_path):
    make_image(tmp_path / "train" / "5_sks dog" / "a.png")
    make_image(tmp_path / "train" / "5_sks dog" / "b.png")
    for i in range(3):
        make_image(tmp_path / "reg" / f"r{i}.png")
    cfg = small_cfg(dir=str(tmp_path / "train"), subsets=[SubsetConfig(dir=str(tmp_path / "reg"), is_reg=True, caption="dog")])
    data = TrainingData(cfg, seed=0, batch_size=1, reg_loss_weight=0.5)
    items = by_name(data)
    # 10 train samples; reg: first pass 1+1+1, then one more each in order until 10 -> 4, 3, 3.
    assert [items[f"r{i}.png"].repeats for i in range(3)] == [4, 3, 3]
    assert (data.num_train_images, data.num_reg_images) == (10, 3)
    assert data.reg_dataset_dirs == {"reg": {"n_repeats": 1, "img_count": 3}}
    weights = {data.load_batch([s], 0).items[0].is_reg: data.load_batch([s], 0).loss_weights.item() for s in range(data.num_samples)}
    assert weights == {False: 1.0, True: 0.5}


def test_surplus_regularisation_images_are_unused_with_a_warning(tmp_path):
    make_image(tmp_path / "train" / "a.png")
    for i in range(5):
        make_image(tmp_path / "reg" / f"r{i}.png")
    cfg = small_cfg(subsets=[SubsetConfig(dir=str(tmp_path / "train"), repeats=5),
                             SubsetConfig(dir=str(tmp_path / "reg"), repeats=3, is_reg=True)])
    data = TrainingData(cfg, seed=0, batch_size=1)
    # 5 train samples: r0 gives 3, r1 gives 3 (6 >= 5) and the other three are never reached.
    assert [by_name(data)[f"r{i}.png"].repeats for i in range(5)] == [3, 3, 0, 0, 0]
    assert any("unused" in warning and "r4.png" in warning for warning in data.warnings)


def test_pixels_rgb_on_white_flip_and_exif_rotation(tmp_path):
    folder = tmp_path / "50_x"
    make_image(folder / "clear.png", mode="RGBA", color=(255, 0, 0, 0))
    halves = Image.new("RGB", (128, 128), (0, 0, 0))
    halves.paste((255, 255, 255), (64, 0, 128, 128))
    halves.save(folder / "halves.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the picture is 128 wide, 256 tall as displayed
    Image.new("RGB", (256, 128), (10, 10, 10)).save(folder / "rotated.jpg", exif=exif)

    data = TrainingData(small_cfg(dir=str(tmp_path), flip=True), seed=0, batch_size=1)
    items = by_name(data)
    assert items["rotated.jpg"].original_size == (128, 256)
    # Aspect 0.5; the 128-px buckets are 64x192 (0.33), 64x256 (0.25), 128x128 (1.0): 64x192 is closest.
    assert items["rotated.jpg"].bucket == (64, 192)

    def samples_of(name):
        index = [item.origin.name for item in data.items].index(name)
        start = sum(item.repeats for item in data.items[:index])
        return range(start, start + 50)

    assert data.load_batch([samples_of("rotated.jpg")[0]], 0).pixel_values().shape == (1, 3, 192, 64)
    clear = data.load_batch([samples_of("clear.png")[0]], 0).pixel_values()
    assert clear.shape == (1, 3, 128, 128) and clear.dtype == torch.float32
    assert torch.allclose(clear, torch.ones_like(clear))  # transparent -> white, not black or red

    flips = [data.load_batch([s], 0) for s in samples_of("halves.png")]
    assert 10 < sum(batch.flipped[0] for batch in flips) < 40  # about half
    for batch in flips:
        left = batch.pixel_values()[0, :, :, 0].mean().item()
        assert left == pytest.approx(1.0 if batch.flipped[0] else -1.0)
    assert len({batch.cache_keys[0] for batch in flips}) == 2  # flip is part of the cache key


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the process's threads in /proc (Linux)")
def test_loading_images_starts_no_openmp_threads(tmp_path, monkeypatch):
    # A torch op in a loader thread would start an OpenMP team living as long as the thread, and libgomp,
    # seeing more threads than cores, then stops spinning between the training step's parallel regions
    # (docs/benchmarks.md, "Threads that load images"). Every thread the loading starts is a loader thread.
    import threading

    from trainer.data import dataset

    for index in range(4):
        make_image(tmp_path / "1_x" / f"{index}.png", size=(256, 256))  # 3x256x256 values: torch would split the copy
    data = TrainingData(small_cfg(dir=str(tmp_path), resolution=256, buckets=BucketConfig(min_side=64, max_side=512, step=64)), seed=0, batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # new threads take this count: each would start a team of 2
    torch.zeros(1 << 20).add_(1)  # the main thread's own team of 2 (absent under OMP_NUM_THREADS=1), before counting
    monkeypatch.setattr(dataset, "_loader", None)  # fresh loader threads, started under 2 torch threads

    def os_threads() -> set[int]:
        return {int(tid) for tid in os.listdir("/proc/self/task")}

    def python_threads() -> set[int]:
        return {thread.native_id for thread in threading.enumerate()}

    try:
        # Thread ids, not counts: a thread of an earlier test may end meanwhile.
        os_before, python_before = os_threads(), python_threads()
        pixels = data.load_batch(list(range(4)), 0).pixel_values()
        started, loaders = os_threads() - os_before, python_threads() - python_before
    finally:
        if dataset._loader is not None:
            dataset._loader.shutdown()
        torch.set_num_threads(threads)
    assert pixels.shape == (4, 3, 256, 256) and pixels.is_contiguous()
    assert loaders  # the loader threads started
    assert started <= loaders, f"threads started besides the loader's: {sorted(started - loaders)}"


def test_odd_but_valid_images_become_the_rgb_they_show(tmp_path):
    folder = tmp_path / "1_x"
    make_image(folder / "grey.png", mode="L", color=64)
    make_image(folder / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))  # red, in ink
    # 16-bit grey at half its range: PIL alone would clip it to white.
    Image.fromarray(np.full((128, 128), 0x8000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (128, 128), (0, 0, 200)).save(folder / "blue.webp", lossless=True)
    assert Image.open(folder / "deep.png").mode == "I;16" and Image.open(folder / "cmyk.jpg").mode == "CMYK"

    data = TrainingData(small_cfg(dir=str(tmp_path)), seed=0, batch_size=1)
    # One repeat each: sample i is item i.
    pixels = {item.origin.name: data.load_batch([index], 0).pixel_values()[0] for index, item in enumerate(data.items)}

    def level(value: int) -> float:
        return value / 127.5 - 1.0

    def channel_means(name: str) -> list[float]:
        return [pixels[name][channel].mean().item() for channel in range(3)]

    # float32 rounding of one division and one subtraction is ~1e-7; 1e-6 leaves room without hiding a level (0.008).
    assert channel_means("grey.png") == pytest.approx([level(64)] * 3, abs=1e-6)
    assert channel_means("blue.webp") == pytest.approx([level(0), level(0), level(200)], abs=1e-6)
    # The high byte of 0x8000 is 128.
    assert channel_means("deep.png") == pytest.approx([level(128)] * 3, abs=1e-6)
    # JPEG may move a flat colour by a few of its 256 levels (2/255 each here); 0.05 is about six.
    assert channel_means("cmyk.jpg") == pytest.approx([1.0, -1.0, -1.0], abs=0.05)


def test_fingerprint_follows_the_data_not_its_location(tmp_path):
    data = mixed_dataset(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert TrainingData(small_cfg(dir=str(tmp_path / "two")), seed=3, batch_size=2).fingerprint == data.fingerprint
    (tmp_path / "two" / "4_x" / "wide0.txt").write_text("a new caption", encoding="utf-8")
    assert TrainingData(small_cfg(dir=str(tmp_path / "two")), seed=3, batch_size=2).fingerprint != data.fingerprint
    assert TrainingData(small_cfg(dir=str(tmp_path / "one"), shuffle_tags=True), seed=3, batch_size=2).fingerprint != data.fingerprint


def test_an_image_edited_during_training_is_refused(tmp_path):
    data = mixed_dataset(tmp_path)
    make_image(tmp_path / "4_x" / "square0.png", color=(0, 0, 255))
    with pytest.raises(UserError, match="square0.png.*changed on disk"):
        data.load_batch([0], 0).pixel_values()


# ---------------------------------------------------------------- errors


def error_of(cfg: DataConfig) -> str:
    with pytest.raises(UserError) as caught:
        TrainingData(cfg, seed=0, batch_size=1)
    return str(caught.value)


def test_no_data_configured():
    assert "data.dir" in error_of(DataConfig()) and "data.subsets" in error_of(DataConfig())


def test_missing_and_empty_folders_are_named(tmp_path):
    assert "does not exist" in error_of(small_cfg(dir=str(tmp_path / "nope"))) and "nope" in error_of(small_cfg(dir=str(tmp_path / "nope")))
    (tmp_path / "parent").mkdir()
    assert "no subfolders named" in error_of(small_cfg(dir=str(tmp_path / "parent")))
    make_image(tmp_path / "loose" / "a.png")
    assert "under data.subsets" in error_of(small_cfg(dir=str(tmp_path / "loose")))
    (tmp_path / "parent" / "3_empty").mkdir()
    message = error_of(small_cfg(dir=str(tmp_path / "parent")))
    assert "3_empty" in message and "holds no images" in message
    message = error_of(small_cfg(subsets=[SubsetConfig(dir=str(tmp_path / "missing"))]))
    assert "data.subsets[0].dir" in message and "missing" in message


def test_corrupt_and_truncated_images_are_named(tmp_path):
    folder = tmp_path / "1_x"
    make_image(folder / "good.png")
    (folder / "garbage.png").write_bytes(b"this is not a png")
    Image.effect_noise((128, 128), 50).convert("RGB").save(folder / "cut.png")  # noise: no tiny compressed stream
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    message = error_of(small_cfg(dir=str(tmp_path)))
    assert "2 problems" in message and "garbage.png" in message and "cut.png" in message
    assert "good.png" not in message


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_by_name_without_decoding_it(tmp_path):
    make_image(tmp_path / "1_x" / "good.png")
    # 40000 x 40000 RGB would take 4.8 GB to decode; PIL refuses images over twice its 89.5 Mpx limit.
    (tmp_path / "1_x" / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    message = error_of(small_cfg(dir=str(tmp_path)))
    assert "bomb.png" in message and "DecompressionBombError" in message and "good.png" not in message


def test_too_small_image_names_the_minimum_and_the_fix(tmp_path):
    make_image(tmp_path / "1_x" / "tiny.png", size=(40, 300))
    message = error_of(small_cfg(dir=str(tmp_path)))
    assert "tiny.png" in message and "40x300" in message and "64 px" in message and "data.buckets.min_side" in message
    message = error_of(DataConfig(dir=str(tmp_path), resolution=128, buckets=BucketConfig(enabled=False)))
    assert "tiny.png" in message and "128x128" in message and "data.resolution" in message
    no_upscale = BucketConfig(min_side=128, max_side=256, step=64, no_upscale=True)
    make_image(tmp_path / "1_x" / "tiny.png", size=(100, 100))
    message = error_of(DataConfig(dir=str(tmp_path), resolution=128, buckets=no_upscale))
    assert "tiny.png" in message and "64x64" in message and "128 px" in message


def test_caption_file_that_is_not_utf8_is_named(tmp_path):
    make_image(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    message = error_of(small_cfg(dir=str(tmp_path)))
    assert "a.txt" in message and "UTF-8" in message


def test_only_regularisation_images_is_an_error(tmp_path):
    make_image(tmp_path / "reg" / "a.png")
    assert "is_reg" in error_of(small_cfg(subsets=[SubsetConfig(dir=str(tmp_path / "reg"), is_reg=True)]))


def test_bad_settings_name_their_key(tmp_path):
    make_image(tmp_path / "1_x" / "a.png")
    assert "data.caption_dropout" in error_of(small_cfg(dir=str(tmp_path), caption_dropout=1.5))
    assert "data.buckets.min_side" in error_of(DataConfig(dir=str(tmp_path), resolution=128, buckets=BucketConfig(min_side=256)))
    with pytest.raises(UserError, match="train.batch_size"):
        TrainingData(small_cfg(dir=str(tmp_path)), seed=0, batch_size=0)


def test_unset_bucket_sides_follow_the_resolution_like_kohyas_defaults():
    from trainer.data.buckets import BucketPlan

    at_512 = BucketPlan(DataConfig(resolution=512))
    assert (at_512.min_side, at_512.max_side) == (256, 1024)
    at_128 = BucketPlan(DataConfig(resolution=128))
    assert (at_128.min_side, at_128.max_side) == (64, 256) and not at_128.problems
