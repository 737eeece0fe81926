"""trainer.data.inspect: the report lists every problem at once and never raises on bad data."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.data.inspect import inspect_report
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
    report = inspect_report(str(messy))
    assert "10_sls frog" in report and "train" in report
    assert "good.png" in report and "768x512" in report and '"sls frog, on a rock, green"' in report
    assert '(no caption: using folder words) "sls frog"' in report
    assert "Buckets" in report and "Tag frequency" in report and "on a rock (1)" in report
    problems = report.split("Problems")[1]
    assert "3 errors" in problems
    for name in ("tiny.png", "broken.jpg", "latin.txt", "notes.md", "empty.png", "misc"):
        assert name in problems, name


def test_inspect_a_single_kohya_folder_and_a_recipe(messy, tmp_path):
    report = inspect_report(str(messy / "10_sls frog"), resolution=256)
    assert "single subset" in report and "repeats 10" in report and "resolution 256" in report

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: lora\ndata:\n  dir: {messy}\n  resolution: 640\n", encoding="utf-8")
    report = inspect_report(str(recipe))
    assert "recipe" in report and "resolution 640" in report and "tiny.png" in report


def test_only_an_unreadable_target_raises():
    with pytest.raises(UserError, match="does not exist"):
        inspect_report("/nonexistent/place")


def test_inspect_recipe_with_no_data_section(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\n", encoding="utf-8")
    report = inspect_report(str(recipe))
    assert "ERROR" in report and "data.dir" in report
