"""Nothing the user did not ask to replace is replaced, and unsafe resumes are refused in one paragraph.

Destinations named on the command line must be new or empty; a run's own folders are swapped, never
left missing; a new run does not land on an earlier one; a resume refuses recipe changes a checkpoint
cannot continue with and says what the others do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer import atomic
from trainer.cli import main

RECIPE = str(REPO / "recipes" / "sls_frog_lora.yaml")
ARTIFACT = "sls_frog.safetensors"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(capsys, out: Path, *flags: str, **overrides) -> tuple[int, str, str]:
    return _run(capsys, "train", RECIPE, *fast_overrides(out, **overrides), "--quiet", *flags)


def _one_paragraph_error(code: int, err: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --- destinations the user names -------------------------------------------------------------------


def test_base_tiny_refuses_a_folder_that_holds_files(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    code, _, err = _run(capsys, "base", "tiny", target)
    _one_paragraph_error(code, err)
    assert str(target) in err and "Choose another folder" in err
    assert _tree(target) == {"notes.txt": b"my notes"}
    assert [p.name for p in tmp_path.iterdir()] == ["mine"], "no temporary folder is left beside it"


def test_base_tiny_writes_into_an_empty_folder(tmp_path, capsys):
    target = tmp_path / "empty"
    target.mkdir()
    code, _, err = _run(capsys, "base", "tiny", target)
    assert code == 0, err
    assert (target / "model_index.json").is_file() and (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_toyworld_build_refuses_a_folder_that_holds_files_before_it_trains(tmp_path, capsys, monkeypatch):
    from trainer.toyworld import world

    def no_drawing(*args, **kwargs):
        raise AssertionError("the build started before it checked its destination")

    monkeypatch.setattr(world, "pictures", no_drawing)
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "toyworld", "build", tmp_path / "world")
    _one_paragraph_error(code, err)
    assert str(tmp_path / "world") in err
    assert _tree(tmp_path / "world") == {"keep.txt": b"mine"}


def test_a_file_destination_that_is_an_empty_folder_is_refused(tmp_path, capsys):
    # Only a destination that is itself a folder may be an empty one; a file's name must be free.
    (tmp_path / "converted.safetensors").mkdir()
    source = tmp_path / "model"  # refused before the source is read
    source.mkdir()
    code, _, err = _run(capsys, "convert", source, tmp_path / "converted.safetensors")
    _one_paragraph_error(code, err)
    assert "already exists" in err and "empty folder" in err
    assert not any((tmp_path / "converted.safetensors").iterdir())


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all"], ids=["empty", "bad-header"])
def test_a_broken_safetensors_source_is_named_in_one_paragraph(tmp_path, capsys, content):
    source = tmp_path / "model.safetensors"
    source.write_bytes(content)
    code, _, err = _run(capsys, "convert", source, tmp_path / "converted.safetensors")
    _one_paragraph_error(code, err)
    assert str(source) in err and "truncated" in err


def test_a_file_put_into_the_destination_meanwhile_is_kept(tmp_path):
    from trainer.errors import UserError

    target = tmp_path / "model"
    target.mkdir()
    with pytest.raises(UserError, match="not empty"):
        with atomic.new_directory(target) as tmp:
            (tmp / "model_index.json").write_text("{}")
            (target / "theirs.txt").write_text("written while sdtrain worked")
    assert _tree(target) == {"theirs.txt": b"written while sdtrain worked"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- a run's own folders are swapped in ---------------------------------------------------------


def _folder(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "version.txt").write_text(version)
    (path / "weights.bin").write_bytes(version.encode() * 1000)
    return path


def _complete_version(path: Path) -> str | None:
    """'old' or 'new' when ``path`` holds that version complete, else None."""
    try:
        version = (path / "version.txt").read_text()
        return version if (path / "weights.bin").read_bytes() == version.encode() * 1000 else None
    except OSError:
        return None


class Interrupted(BaseException):
    """Stands for a crash: raised in the middle of the swap, by nothing the code expects."""


def _replace_with_crash(target: Path, crash_at: int | None, monkeypatch) -> list[tuple[str | None, str | None]]:
    """Replace ``target`` ('old') by a 'new' version, raising Interrupted at the ``crash_at``-th filesystem
    step; return what a reader would find before each step: (under the name, under a hidden aside name)."""
    seen = []

    def spied(function):
        def step(*args, **kwargs):
            aside = [_complete_version(p) for p in target.parent.glob(f".{target.name}.*.replaced")]
            seen.append((_complete_version(target), next((v for v in aside if v), None)))
            if len(seen) == crash_at:
                raise Interrupted
            return function(*args, **kwargs)

        return step

    with monkeypatch.context() as patch:
        for module, name in ((atomic, "_exchange"), (atomic, "_remove"), (os, "rename")):
            patch.setattr(module, name, spied(getattr(module, name)))
        try:
            with atomic.replaced_directory(target) as tmp:
                (tmp / "version.txt").write_text("new")
                (tmp / "weights.bin").write_bytes(b"new" * 1000)
        except Interrupted:
            pass
    return seen


def _exchange_works(tmp_path: Path) -> bool:
    a, b = _folder(tmp_path / "probe_a", "old"), _folder(tmp_path / "probe_b", "new")
    works = atomic._exchange(a, b)
    shutil.rmtree(a)
    shutil.rmtree(b)
    return works


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_replacing_a_run_folder_leaves_old_or_new_at_every_step(tmp_path, monkeypatch, exchange):
    if exchange and not _exchange_works(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "checkpoints" / "step-00000004"
    _folder(target, "old")
    steps = len(_replace_with_crash(target, None, monkeypatch))
    assert _complete_version(target) == "new"
    assert [p.name for p in target.parent.iterdir()] == ["step-00000004"], "nothing is left over"
    for crash_at in range(1, steps + 1):
        shutil.rmtree(target.parent)
        _folder(target, "old")
        seen = _replace_with_crash(target, crash_at, monkeypatch)
        assert _complete_version(target) in ("old", "new"), f"interrupted at step {crash_at} of {steps}"
        if exchange:
            # One step swaps them: the name itself always holds a complete version.
            assert all(name for name, _ in seen), seen
        else:
            # Between its two renames the old version waits under a hidden name beside it.
            assert all(name or aside for name, aside in seen), seen


# --- a new run does not land on an earlier one ----------------------------------------------------

FINISHED = {"train.max_steps": 2}


def test_rerun_into_a_finished_run_refuses_and_leaves_it_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(capsys, out, **FINISHED)[0] == 0
    before = _tree(out)
    code, _, err = _train(capsys, out, **{**FINISHED, "train.seed": 7})
    _one_paragraph_error(code, err)
    assert str(out) in err and "--resume latest" in err and "output.dir=" in err and "--overwrite" in err
    assert _tree(out) == before


def test_overwrite_moves_the_earlier_run_aside_and_keeps_the_caches(tmp_path, capsys):
    out = tmp_path / "run"
    cached = {**FINISHED, "data.cache_latents": "disk", "validation.split": 0.2, "validation.timesteps": 2}
    assert _train(capsys, out, **cached)[0] == 0
    before = _tree(out)
    assert "validation.csv" in before  # the earlier run's validation table moves with it too
    code, stdout, err = _train(capsys, out, "--overwrite", **{**cached, "train.seed": 7})
    assert code == 0, err
    (aside,) = tmp_path.glob("run.replaced-*")
    assert str(aside) in stdout
    moved = _tree(aside)
    # The earlier run's files are all there, byte for byte; the latent cache stayed for the new run.
    assert moved == {name: data for name, data in before.items() if not name.startswith("latent_cache/")}
    cache = {name: data for name, data in before.items() if name.startswith("latent_cache/")}
    assert cache and cache.items() <= _tree(out).items()
    assert (out / ARTIFACT).read_bytes() != moved[ARTIFACT], "the new run (another seed) wrote its own artifact"


def test_a_folder_holding_only_caches_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "class_images").mkdir(parents=True)
    (out / "class_images" / "0000.png").write_bytes(b"a class image")
    (out / "latent_cache").mkdir()
    (out / "recipe.yaml").write_text("method: lora\n")  # a run that stopped before its first checkpoint
    code, _, err = _train(capsys, out, **FINISHED)
    assert code == 0, err
    assert (out / ARTIFACT).is_file() and (out / "class_images" / "0000.png").read_bytes() == b"a class image"


def test_output_name_cannot_leave_output_dir(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path / "run", **{**FINISHED, "output.name": "../escaped"})
    _one_paragraph_error(code, err)
    assert "output.name" in err
    assert not list(tmp_path.glob("escaped*"))


# --- resuming with a changed recipe ----------------------------------------------------------------

SAVED = {"train.max_steps": 4, "train.save_every_steps": 2, "train.keep_checkpoints": 0}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that writes)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(["train", RECIPE, *fast_overrides(out, **SAVED), "--quiet"]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "trainable.safetensors")


def test_resume_with_a_changed_shape_refuses_listing_every_key(saved_run, tmp_path, capsys):
    out = _copy(saved_run, tmp_path)
    before = _tree(out)
    code, _, err = _train(capsys, out, "--resume", "latest", **{**SAVED, "lora.rank": 16, "train.batch_size": 1, "train.optimizer": "adafactor"})
    _one_paragraph_error(code, err)
    for change in ("lora.rank: 8 -> 16", "train.batch_size: 2 -> 1", 'train.optimizer: "adamw" -> "adafactor"'):
        assert change in err
    assert _tree(out) == before


def test_resume_with_more_steps_warns_and_ends_as_the_longer_run_would(saved_run, tmp_path, capsys):
    out = _copy(saved_run, tmp_path)
    longer = {**SAVED, "train.max_steps": 6}
    code, stdout, err = _train(capsys, out, "--resume", "latest", **longer)
    assert code == 0, err
    # fast_overrides' schedule is constant_with_warmup without warmup: max_steps does not change it.
    assert "train.max_steps: 4 -> 6 (steps 1-4 had the same learning rate" in stdout
    assert "what an uninterrupted run with the new recipe gives" in stdout
    assert _train(capsys, tmp_path / "uninterrupted", **longer)[0] == 0
    resumed, uninterrupted = (_weights(folder / "checkpoints" / "step-00000006") for folder in (out, tmp_path / "uninterrupted"))
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


def test_resume_with_a_new_learning_rate_uses_it(saved_run, tmp_path, capsys):
    out = _copy(saved_run, tmp_path)
    code, stdout, err = _train(capsys, out, "--resume", "latest", **{**SAVED, "train.max_steps": 5, "train.lr": 0.01})
    assert code == 0, err
    assert "train.lr: 0.001 -> 0.01 (used from step 5 on)" in stdout and "will differ" in stdout
    state = json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["lr_scheduler"]["base_lrs"] == [0.01] and state["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_resume_on_changed_data_needs_allow_data_change(saved_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(REPO / "datasets" / "sls_frog", data)
    out = _copy(saved_run, tmp_path)
    moved = {**SAVED, "train.max_steps": 5, "data.dir": data}
    # The same images and captions in another folder: the same data.
    code, stdout, err = _train(capsys, out, "--resume", "latest", **moved)
    assert code == 0, err
    assert "the images and captions read are the same" in stdout
    shutil.rmtree(out)
    out = _copy(saved_run, tmp_path)
    caption = next(data.rglob("*.txt"))
    caption.write_text("sls frog, wearing a hat")
    code, _, err = _train(capsys, out, "--resume", "latest", **moved)
    _one_paragraph_error(code, err)
    assert "training data" in err and "--allow-data-change" in err
    code, stdout, err = _train(capsys, out, "--resume", "latest", "--allow-data-change", **moved)
    assert code == 0, err
    assert "the training data changed" in stdout and (out / "checkpoints" / "step-00000005").is_dir()


def test_resume_from_an_earlier_checkpoint_replaces_the_later_ones_as_it_reaches_them(saved_run, tmp_path, capsys):
    out = _copy(saved_run, tmp_path)
    # Continue step 2 on to step 3 only, keeping one checkpoint: step 4 of the first run stays.
    code, stdout, err = _train(capsys, out, "--resume", out / "checkpoints" / "step-00000002", **{**SAVED, "train.max_steps": 3, "train.keep_checkpoints": 1})
    assert code == 0, err
    assert "later checkpoints exist (step-00000004)" in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    # On to step 4: this run's step 4 replaces the first run's, and equals it (same recipe, same steps).
    code, stdout, err = _train(capsys, out, "--resume", out / "checkpoints" / "step-00000003", **{**SAVED, "train.keep_checkpoints": 1})
    assert code == 0, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["recipe"]["train"]["keep_checkpoints"] == 1, "written by the resumed run"
    replaced, original = _weights(out / "checkpoints" / "step-00000004"), _weights(saved_run / "checkpoints" / "step-00000004")
    assert all(torch.equal(replaced[key], original[key]) for key in original)
