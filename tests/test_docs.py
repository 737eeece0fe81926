"""The documentation lists every recipe key a user can set."""

from __future__ import annotations

import dataclasses
import typing

from tests.conftest import REPO
from trainer.recipe import Recipe


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from _keys(kind, f"{prefix}{field.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            yield f"{prefix}{field.name}"
            yield from _keys(args[0], f"{prefix}{field.name}[].")
        else:
            yield f"{prefix}{field.name}"


def test_every_recipe_key_is_documented():
    text = (REPO / "docs" / "recipes.md").read_text()
    missing = [key for key in _keys(Recipe) if f"`{key}`" not in text and f"`{key}`," not in text]
    assert not missing, f"docs/recipes.md does not describe: {missing}"
