"""data.source: datasets - the sls frog pictures as Hugging Face datasets of every kind sdtrain reads
(save_to_disk, parquet, arrow, imagefolder with metadata.jsonl or metadata.csv, a hub id in the local
cache) train like the folder they came from, without decoding a picture before a batch needs it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from trainer.cli import main
from trainer.data import TrainingData
from trainer.data.captions import read_caption_file
from trainer.data.dataset import load_pixels
from trainer.data.inspect import inspect_data
from trainer.data.scan import scan
from trainer.errors import UserError
from trainer.loop import train
from trainer.recipe import DataConfig, SubsetConfig, load_recipe

FROG_FOLDER = REPO / "datasets" / "sls_frog" / "10_sls frog"
RECIPE = REPO / "recipes" / "hf_dataset_lora.yaml"
FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
# The tiny model's sizes (as tests/conftest.py's fast_overrides): 64 px, buckets 64 to 128.
SMALL = {"resolution": 64}


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory):
    """load_dataset (imagefolder, hub ids) keeps its tables in this module's own datasets cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))
        yield


def frog_rows() -> list[tuple[Path, str]]:
    """The folder's pictures with the captions the folder source gives them (10.png: the folder words)."""
    rows = []
    for image in sorted(FROG_FOLDER.glob("*.png")):
        sidecar = image.with_suffix(".txt")
        rows.append((image, read_caption_file(sidecar) if sidecar.is_file() else "sls frog"))
    return rows


def frog_dataset(captions: dict[int, str] | None = None) -> datasets.Dataset:
    rows = frog_rows()
    texts = [(captions or {}).get(index, caption) for index, (_, caption) in enumerate(rows)]
    images = [{"bytes": image.read_bytes(), "path": image.name} for image, _ in rows]
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=FEATURES)


def imagefolder(root: Path, metadata: str) -> Path:
    root.mkdir()
    rows = frog_rows()
    for image, _ in rows:
        shutil.copy(image, root / image.name)
    if metadata == "metadata.jsonl":
        (root / metadata).write_text("".join(json.dumps({"file_name": image.name, "text": caption}) + "\n" for image, caption in rows))
    else:
        with open(root / metadata, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "text"])
            writer.writerows([image.name, caption] for image, caption in rows)
    return root


def make(kind: str, root: Path) -> Path:
    """The frog dataset in one of the layouts data.dataset may name."""
    if kind == "save_to_disk":
        frog_dataset().save_to_disk(str(root / "saved"))
        return root / "saved"
    if kind == "save_to_disk splits":
        datasets.DatasetDict({"train": frog_dataset(), "test": frog_dataset().select([0])}).save_to_disk(str(root / "splits"))
        return root / "splits"
    if kind == "parquet":
        frog_dataset().to_parquet(str(root / "frogs.parquet"))
        return root / "frogs.parquet"
    if kind == "parquet shards":
        (root / "shards").mkdir()
        frog_dataset().select(range(5)).to_parquet(str(root / "shards" / "a.parquet"))
        frog_dataset().select(range(5, 11)).to_parquet(str(root / "shards" / "b.parquet"))
        return root / "shards" / "*.parquet"
    if kind == "hub layout":  # a downloaded hub repository: one file per split, found by its name
        (root / "repo" / "data").mkdir(parents=True)
        frog_dataset().to_parquet(str(root / "repo" / "data" / "train-00000-of-00001.parquet"))
        frog_dataset().select([0]).to_parquet(str(root / "repo" / "data" / "test-00000-of-00001.parquet"))
        return root / "repo"
    if kind == "arrow":
        frog_dataset().save_to_disk(str(root / "saved"))
        (arrow,) = (root / "saved").glob("*.arrow")
        return arrow
    return imagefolder(root / "folder", kind)


def dataset_config(dataset: Path | str, **extra) -> DataConfig:
    return DataConfig(source="datasets", dataset=str(dataset), repeats=10, **{**SMALL, **extra})


def described(items) -> list[tuple]:
    """What training makes of an image, whatever its origin."""
    return sorted((item.content_hash, item.caption, item.repeats, item.original_size, item.bucket, item.resized, item.crop_ltrb) for item in items)


@pytest.mark.parametrize("kind", ["save_to_disk", "save_to_disk splits", "parquet", "parquet shards", "hub layout", "arrow", "metadata.jsonl", "metadata.csv"])
def test_rows_are_the_folders_images_captions_and_buckets(kind, tmp_path):
    folder = scan(DataConfig(dir=str(FROG_FOLDER.parent), **SMALL))
    rows = scan(dataset_config(make(kind, tmp_path)))
    assert not rows.problems
    assert len(rows.items) == 11 and [item.relative_path for item in rows.items] == [f"row {i}" for i in range(11)]
    assert described(rows.items) == described(folder.items)
    # One pixel pipeline: a row and the file it came from give the same tensor, and share latent cache entries.
    by_hash = {item.content_hash: item for item in folder.items}
    for item in rows.items[:3]:
        assert torch.equal(load_pixels(item, flipped=True), load_pixels(by_hash[item.content_hash], flipped=True))
        assert TrainingData.cache_key(item, True) == TrainingData.cache_key(by_hash[item.content_hash], True)


def test_rows_are_decoded_only_when_a_batch_needs_them(tmp_path, monkeypatch):
    decoders = []
    real = Image._getdecoder
    monkeypatch.setattr(Image, "_getdecoder", lambda *args: decoders.append(args) or real(*args))
    data = TrainingData(dataset_config(make("parquet", tmp_path)), seed=1, batch_size=3)
    assert len(data.items) == 11 and decoders == []  # sizes and hashes of every row, no pixel decoded
    batch = data.load_batch(data.epoch_batches(0)[0], 0)
    batch.pixel_values()
    assert len(decoders) == len(batch) == 3

    # The folder source, by contrast, decodes every image up front (to find truncated files early).
    TrainingData(DataConfig(dir=str(FROG_FOLDER.parent), **SMALL), seed=1, batch_size=3)
    assert len(decoders) == 3 + 11


def test_caption_options_and_fingerprint_cover_the_rows(tmp_path):
    make("parquet", tmp_path)
    cfg = dataset_config(tmp_path / "frogs.parquet", trigger_word="froggy", shuffle_tags=True, keep_tokens=1, caption_dropout=0.5)
    data = TrainingData(cfg, seed=3, batch_size=1)
    captions = [data.load_batch(batch, 0).captions[0] for batch in data.epoch_batches(0)]
    assert "" in captions and any(caption.startswith("froggy, sls frog") for caption in captions)
    frog_dataset({4: "sls frog, another caption"}).to_parquet(str(tmp_path / "frogs.parquet"))
    assert TrainingData(cfg, seed=3, batch_size=1).fingerprint != data.fingerprint


def test_a_hub_id_in_the_local_cache_is_read_and_a_missing_one_is_refused(tmp_path):
    # What load_dataset('me/frogs') leaves in the datasets cache: the prepared table under me___frogs/default/...
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "me___frogs"
    frog_dataset().to_parquet(str(tmp_path / "frogs.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "frogs.parquet")}, cache_dir=str(tmp_path / "prepared"))
    (prepared,) = [path for path in (tmp_path / "prepared" / "parquet").glob("*/*/*") if path.is_dir()]
    shutil.copytree(prepared, cache / "default" / "0.0.0" / prepared.name)
    (table,) = (cache / "default" / "0.0.0" / prepared.name).glob("*.arrow")
    table.rename(table.with_name("frogs-train.arrow"))

    assert len(scan(dataset_config("me/frogs")).items) == 11
    with pytest.raises(UserError, match=r"data.dataset 'nobody/no-frogs'.*not in the local Hugging Face datasets cache.*never downloads"):
        TrainingData(dataset_config("nobody/no-frogs"), seed=1, batch_size=1)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"image_column": "picture"}, r"data.image_column 'picture' is not a column .*its columns are: image, text"),
    ({"caption_column": "caption"}, r"data.caption_column 'caption' is not a column .*its columns are: image, text"),
    ({"image_column": "text"}, r"data.image_column 'text' .* holds string, not images"),
    ({"split": "validation"}, r"data.split 'validation' is not a split .*its splits are: train, test"),
])
def test_wrong_columns_and_splits_are_refused_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        TrainingData(dataset_config(make("save_to_disk splits", tmp_path), **overrides), seed=1, batch_size=1)


def test_recipe_mistakes_exit_2_naming_the_key(tmp_path, capsys):
    cases = [
        (["data.dataset=null"], "data.source is 'datasets' but data.dataset is not set"),
        (["data.source=hub"], "data.source is 'hub'"),
        ([f"data.dataset={tmp_path / 'missing.parquet'}"], "missing.parquet' does not exist"),
        (["data.source=folder", f"data.dir={FROG_FOLDER.parent}"], "data.dataset is set, but data.source is 'folder'"),
    ]
    for overrides, message in cases:
        assert main(["train", str(RECIPE), f"output.dir={tmp_path / 'out'}", *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def _recipe(out: Path, **extra):
    values = {"data.resolution": 64, "data.buckets.min_side": 64, "data.buckets.max_side": 128, "data.flip": True,
              "data.shuffle_tags": True, "sample.every_steps": 0, "sample.prompts": "[]", "output.tensorboard": False,
              "output.dir": str(out), "train.lr_warmup_steps": 0, "train.max_steps": 4, "train.save_every_steps": 2,
              "train.keep_checkpoints": 5, "lora.rank": 4, **extra}
    return load_recipe(RECIPE, [f"{key}={value}" for key, value in values.items()])


def test_the_recipe_trains_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)  # the recipe names datasets/sls_frog.parquet relative to the repository
    train(_recipe(tmp_path / "whole"), show_progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    train(_recipe(resumed), resume="latest", show_progress=False)
    whole = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    again = load_file(resumed / "checkpoints" / "step-00000004" / "trainable.safetensors")
    start = load_file(resumed / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[key], again[key]) for key in whole)
    assert any(not torch.equal(start[key], whole[key]) for key in whole)  # the last two steps moved the weights


def test_data_inspect_lists_the_rows_of_a_datasets_recipe(monkeypatch):
    monkeypatch.chdir(REPO)
    inspection = inspect_data(str(RECIPE))
    assert inspection.refusal is None
    report = inspection.report
    assert "captions from column 'text' of the dataset" in report
    assert 'row 9   128x128  -> 128x128  x10  "sls frog"' in report
    assert "samples per epoch: 110 train" in report


def test_data_inspect_reads_a_parquet_file_and_refuses_what_training_would(tmp_path, capsys):
    assert main(["data", "inspect", str(make("parquet", tmp_path)), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "as data.source: datasets" in out and "row 10" in out and "Images (11 usable)" in out
    frog_dataset().rename_column("text", "caption").to_parquet(str(tmp_path / "frogs.parquet"))
    assert main(["data", "inspect", str(tmp_path / "frogs.parquet"), "--resolution", "64"]) == 2
    assert "data.caption_column 'text' is not a column" in capsys.readouterr().err


def test_folders_of_regularisation_images_join_a_dataset(tmp_path):
    reg = SubsetConfig(dir=str(REPO / "datasets" / "tagged_example" / "5_tagged"), caption="a frog", is_reg=True)
    data = TrainingData(dataset_config(make("parquet", tmp_path), subsets=[reg]), seed=1, batch_size=2)
    assert [subset.name for subset in data.subsets] == ["frogs.parquet", "5_tagged"]
    assert data.num_train_images == 110 and sum(item.repeats for item in data.items if item.is_reg) == 110  # balanced, as kohya does


def test_kohya_export_refuses_a_datasets_recipe_by_name(tmp_path, capsys):
    assert main(["export", "kohya", str(RECIPE), "-o", str(tmp_path / "kohya")]) == 2
    assert "sd-scripts reads folders, not the Hugging Face dataset 'datasets/sls_frog.parquet'" in capsys.readouterr().err
