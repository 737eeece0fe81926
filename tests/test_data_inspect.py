"""trainer.data.inspect: the report lists every problem at once and never raises on bad data; the exit
status of `sdtrain data inspect` says whether training would start."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.cli import main
from trainer.data.inspect import inspect_data
from trainer.errors import UserError


def make_image(path: Path, size=(512, 512)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 160, 60)).save(path)


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "img"
    folder = root / "10_sls frog"
    make_image(folder / "good.png", size=(768, 512))
    (folder / "good.txt").write_text("sls frog, on a rock, green", encoding="utf-8")
    make_image(folder / "words.png")
    make_image(folder / "empty.png")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    make_image(folder / "tiny.png", size=(20, 20))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    make_image(folder / "latin.png")
    (folder / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (folder / "notes.md").write_text("x")
    make_image(root / "misc" / "ignored.png")
    return root


def test_inspect_lists_every_problem_without_raising(messy):
    report = inspect_data(str(messy)).report
    assert "10_sls frog" in report and "train" in report
    assert "good.png" in report and "768x512" in report and '"sls frog, on a rock, green"' in report
    assert '(no caption: using folder words) "sls frog"' in report
    assert "Buckets" in report and "Tag frequency" in report and "on a rock (1)" in report
    problems = report.split("Problems")[1]
    assert "3 errors" in problems
    for name in ("tiny.png", "broken.jpg", "latin.txt", "notes.md", "empty.png", "misc"):
        assert name in problems, name


def test_inspect_a_single_kohya_folder_and_a_recipe(messy, tmp_path):
    report = inspect_data(str(messy / "10_sls frog"), resolution=256).report
    assert "single subset" in report and "repeats 10" in report and "resolution 256" in report

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: lora\ndata:\n  dir: {messy}\n  resolution: 640\n", encoding="utf-8")
    report = inspect_data(str(recipe)).report
    assert "recipe" in report and "resolution 640" in report and "tiny.png" in report
    assert "resolution 256" in inspect_data(str(recipe), resolution=256).report


def test_only_an_unreadable_target_raises():
    with pytest.raises(UserError, match="does not exist"):
        inspect_data("/nonexistent/place")


def test_inspect_recipe_with_no_data_section(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\n", encoding="utf-8")
    report = inspect_data(str(recipe)).report
    assert "ERROR" in report and "data.dir" in report


def _inspect(capsys, target) -> tuple[int, str, str]:
    code = main(["data", "inspect", str(target)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exit_2_when_training_would_refuse_after_the_full_report(messy, capsys):
    code, out, err = _inspect(capsys, messy)
    assert code == 2
    # The whole report still comes first (stdout), then one line with the verdict (stderr).
    assert "Tag frequency" in out and "Problems (3 errors" in out and "notes.md" in out
    assert err.count("\n") == 1 and err.startswith("error: Training would refuse this data (3 errors")


def test_exit_2_for_an_empty_subset_folder(tmp_path, capsys):
    (tmp_path / "img" / "10_empty").mkdir(parents=True)
    code, out, err = _inspect(capsys, tmp_path / "img")
    assert code == 2 and "Problems (1 error that stops training" in out
    assert "(1 error, listed under Problems above)" in err and "10_empty" in err and "holds no images" in err


def test_exit_2_when_every_image_is_unreadable(tmp_path, capsys):
    folder = tmp_path / "img" / "10_frog"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image")
    code, _, err = _inspect(capsys, folder)
    assert code == 2 and "(2 errors" in err and "cannot be read" in err


def test_warnings_alone_exit_0(tmp_path, capsys):
    folder = tmp_path / "img" / "10_sls frog"
    make_image(folder / "a.png")
    (folder / "notes.md").write_text("x")  # a skipped file: a warning, not an error
    code, out, err = _inspect(capsys, tmp_path / "img")
    assert code == 0 and err == ""
    assert "Problems (0 errors that stop training, 1 warning)" in out and "notes.md" in out


def test_a_recipe_with_a_value_that_cannot_train_exits_2(tmp_path, capsys):
    make_image(tmp_path / "img" / "10_sls frog" / "a.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: lora\ndata:\n  dir: {tmp_path / 'img'}\n  caption_dropout: 2.0\n", encoding="utf-8")
    code, _, err = _inspect(capsys, recipe)
    assert code == 2 and "data.caption_dropout is 2.0" in err
