"""Recipe validation: every mistake is named by its dotted key, with the fix."""

from __future__ import annotations

import pytest

from trainer.cli import main
from trainer.errors import UserError
from trainer.recipe import load_recipe


def test_overrides_apply(lora_recipe_path):
    recipe = load_recipe(lora_recipe_path, ["train.max_steps=7", "lora.rank=4", "output.dir=/tmp/x"])
    assert (recipe.train.max_steps, recipe.lora.rank, recipe.output.dir) == (7, 4, "/tmp/x")


def test_unknown_key_names_path_and_closest_key(lora_recipe_path):
    with pytest.raises(UserError, match=r"unknown recipe key 'train\.max_step'.*Did you mean 'train\.max_steps'"):
        load_recipe(lora_recipe_path, ["train.max_step=5"])


def test_unknown_key_in_file_names_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlora:\n  rnak: 4\n")
    with pytest.raises(UserError, match=r"r\.yaml: unknown recipe key 'lora\.rnak'.*'lora\.rank'"):
        load_recipe(recipe)


def test_wrong_type_names_key_and_type(lora_recipe_path):
    with pytest.raises(UserError, match=r"'train\.max_steps' has the wrong type.*int"):
        load_recipe(lora_recipe_path, ["train.max_steps=many"])


def test_invalid_yaml_names_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("method: lora\ntrain:\n  lr: [1e-4\n")
    with pytest.raises(UserError, match=r"broken\.yaml' is not valid YAML at line"):
        load_recipe(recipe)


def test_unknown_method_suggests_known(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lorra\n")
    with pytest.raises(UserError, match=r"'method' is 'lorra'.*Did you mean 'lora'"):
        load_recipe(recipe)


def test_missing_method(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(UserError, match="no 'method' key"):
        load_recipe(recipe)


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml' does not exist" in err and "Traceback" not in err


def test_cli_print_config_shows_resolved_recipe(lora_recipe_path, capsys):
    assert main(["train", str(lora_recipe_path), "lora.rank=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "rank: 3" in out and "method: lora" in out


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        load_recipe(path)
