"""The validation loss: a held-out split chosen by content, never class images; numbers that depend only
on the weights (training is untouched, a resumed run logs what an uninterrupted one does);
validation.keep_best keeps the best checkpoint through rotation; bad settings name their key."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer.checkpoint import _rotate, complete_checkpoints, resolve_checkpoint
from trainer.data import TrainingData
from trainer.errors import UserError
from trainer.loop import train
from trainer.recipe import load_recipe
from trainer.validation import CSV_NAME, IMAGES_NAME, timestep_grid

RECIPE = REPO / "recipes" / "sls_frog_lora.yaml"
FROG = REPO / "datasets" / "sls_frog"


def _recipe(out, **overrides):
    return load_recipe(RECIPE, fast_overrides(out, **overrides))


def _table(out) -> list[dict[str, str]]:
    with (out / CSV_NAME).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_holds_out_images_by_content_never_class_images(tmp_path):
    recipe = _recipe(tmp_path)
    data = TrainingData(recipe.data, seed=1, batch_size=1, validation_split=0.3, validation_seed=5)
    everything = TrainingData(recipe.data, seed=1, batch_size=1)
    held = {item.content_hash for item in data.validation_items}
    assert len(held) == 3 and held.isdisjoint(item.content_hash for item in data.items)
    assert len(data.items) + len(held) == len(everything.items)
    # The same images whatever the files are called or where they lie: the choice hashes the content.
    renamed = tmp_path / "renamed" / "10_sls frog"
    renamed.mkdir(parents=True)
    for index, image in enumerate(sorted((FROG / "10_sls frog").glob("*.png"))):
        shutil.copy(image, renamed / f"z{20 - index}.png")
        if image.with_suffix(".txt").exists():  # one image has no caption file (its folder words caption it)
            shutil.copy(image.with_suffix(".txt"), renamed / f"z{20 - index}.txt")
    moved = TrainingData(_recipe(tmp_path, **{"data.dir": str(renamed.parent)}).data, seed=1, batch_size=1, validation_split=0.3, validation_seed=5)
    assert {item.content_hash for item in moved.validation_items} == held
    # Another seed, another choice (3 of 11: 165 possible sets).
    other = TrainingData(recipe.data, seed=1, batch_size=1, validation_split=0.3, validation_seed=6)
    assert {item.content_hash for item in other.validation_items} != held
    # Class (regularisation) images stay in training.
    with_reg = _recipe(tmp_path, **{"data.dir": "null", "data.subsets": f"[{{dir: '{FROG / '10_sls frog'}'}}, {{dir: '{FROG / '10_sls frog'}', is_reg: true, caption: frog}}]"})
    reg_data = TrainingData(with_reg.data, seed=1, batch_size=1, validation_split=0.5, validation_seed=5)
    assert reg_data.validation_items and not any(item.is_reg for item in reg_data.validation_items)


def test_timestep_grid_is_evenly_spaced_in_the_trained_range():
    assert timestep_grid(8, 0, 1000) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert timestep_grid(2, 200, 400) == [250, 350]


def test_validation_leaves_training_untouched_and_logs_every_measure(tmp_path):
    settings = {"train.max_steps": 4}
    plain = train(_recipe(tmp_path / "plain", **settings), show_progress=False)
    validated = train(
        _recipe(tmp_path / "validated", **settings, **{"validation.dir": str(FROG), "validation.every_steps": 3, "validation.timesteps": 4}),
        show_progress=False,
    )
    a, b = (load_file(resolve_checkpoint(run.output_dir, "latest") / "trainable.safetensors") for run in (plain, validated))
    # No gradients, no training RNG, the trained modules back in train mode: the same training to the bit.
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = _table(validated.output_dir)
    assert [row["step"] for row in rows] == ["3", "4"]  # every_steps, and the end
    assert list(rows[0]) == ["step", "loss", "loss_t125", "loss_t375", "loss_t625", "loss_t875"]
    for row in rows:
        per_timestep = [float(row[key]) for key in row if key.startswith("loss_t")]
        assert float(row["loss"]) == pytest.approx(sum(per_timestep) / 4, rel=1e-12)
    assert rows[0] != rows[1]  # training moved the weights between the two measures
    assert len((validated.output_dir / IMAGES_NAME).read_text(encoding="utf-8").splitlines()) == len(list(FROG.glob("*/*.png")))


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    settings = {
        "train.max_steps": 6, "train.save_every_steps": 2, "train.keep_checkpoints": 0, "lora.dropout": 0.5,
        "validation.split": 0.2, "validation.every_steps": 2, "validation.timesteps": 3,
    }
    full = train(_recipe(tmp_path / "full", **settings), show_progress=False)
    resumed = tmp_path / "resumed"
    # The run as a kill after the step-2 checkpoint leaves it: the later checkpoints and the artifact not yet written.
    shutil.copytree(full.output_dir, resumed, ignore=shutil.ignore_patterns("step-00000004", "step-00000006"))
    (resumed / "sls_frog.safetensors").unlink()
    train(_recipe(resumed, **settings), resume="latest", show_progress=False)
    # The rows after the checkpoint were measured again, by the resumed run: the same numbers to the bit.
    assert (resumed / CSV_NAME).read_text(encoding="utf-8") == (full.output_dir / CSV_NAME).read_text(encoding="utf-8")
    assert [row["step"] for row in _table(resumed)] == ["2", "4", "6"]


def test_keep_best_protects_the_best_checkpoint_from_rotation(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"format": 2}))
    _rotate(root, keep=1, step=8, protect=4)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4, 8]


def test_keep_best_run_keeps_its_lowest_validation_checkpoint(tmp_path):
    settings = {
        "train.max_steps": 6, "train.save_every_steps": 2, "train.keep_checkpoints": 1,
        "validation.split": 0.2, "validation.keep_best": True, "validation.timesteps": 2,
    }
    result = train(_recipe(tmp_path, **settings), show_progress=False)
    rows = _table(result.output_dir)
    assert [row["step"] for row in rows] == ["2", "4", "6"]  # measured before each checkpoint
    best = min(rows, key=lambda row: float(row["loss"]))["step"]
    kept = {step for step, _ in complete_checkpoints(result.output_dir)}
    assert kept == {int(best), 6}


@pytest.mark.parametrize("overrides, key", [
    ({"validation.split": 0.2, "validation.dir": str(FROG)}, "validation.split"),
    ({"validation.keep_best": True}, "validation.keep_best"),
    ({"validation.split": 1.0}, "validation.split"),
    ({"validation.timesteps": 0}, "validation.timesteps"),
])
def test_bad_validation_settings_name_their_key(tmp_path, overrides, key):
    with pytest.raises(UserError, match=key):
        _recipe(tmp_path, **overrides)


def test_split_of_a_single_image_is_refused(tmp_path):
    single = tmp_path / "data" / "1_frog"
    single.mkdir(parents=True)
    shutil.copy(FROG / "10_sls frog" / "01.png", single / "01.png")
    with pytest.raises(UserError, match="validation.split"):
        TrainingData(_recipe(tmp_path, **{"data.dir": str(single.parent)}).data, seed=1, batch_size=1, validation_split=0.5)
