"""The Recipe page: a form generated from the recipe schema (trainer/recipe.py), checked by load_recipe.

Each key's help is its row in docs/recipes.md's key tables where the checkout has that file, else the
comment above its field in the schema's source, so a new key appears in the form without touching
the UI. The form's values
reach the toolkit as ``key=value`` overrides of the recipe it started from, exactly as on the command
line, so the messages are the CLI's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import typing
from pathlib import Path

import yaml

from trainer.atomic import refuse_to_replace, write_text
from trainer.errors import UserError
from trainer.examples import SOURCE_CHECKOUT, example_path
from trainer.methods import METHODS
from trainer.recipe import Recipe, is_plain_file_name, load_recipe, recipe_to_dict, recipe_to_yaml
from trainer.ui.confine import inside, relative
from trainer.resume import flatten

SAVED_RECIPES = "recipes"
_FIELD = re.compile(r"^(\w+)\s*:")
# A row of docs/recipes.md's key tables: | `train.max_steps` | `1000` | optimizer steps (≥ 1) |
_DOC_ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|[^|]*\|\s*(.+?)\s*\|\s*$")


@functools.cache
def _documented() -> dict[str, str]:
    """Key -> its description in docs/recipes.md (empty outside a source checkout: wheels carry no docs)."""
    path = SOURCE_CHECKOUT / "docs" / "recipes.md"
    if not path.is_file():
        return {}
    rows = (_DOC_ROW.match(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {row.group(1): row.group(2).replace("`", "") for row in rows if row}


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above it in the dataclass's source."""
    helps: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(stripped)
        if match:
            helps[match.group(1)] = " ".join(pending)
        pending = []
    return helps


def _kind(annotation) -> tuple[str, bool]:
    """(the form's kind of input, whether null is allowed) for a field's type."""
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation, optional = args[0], True
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return ("list_of_sections" if dataclasses.is_dataclass(item) else "list"), optional
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation], optional


def schema_fields(cls: type = Recipe, prefix: str = "") -> list[dict]:
    """Every leaf key of the schema: dotted key, kind, whether null is allowed, help, and its section."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            fields += schema_fields(annotation, f"{key}.")
            continue
        kind, optional = _kind(annotation)
        fields.append({"key": key, "kind": kind, "optional": optional, "help": _documented().get(key) or _comments(cls).get(field.name, ""), "section": key.split(".")[0]})
    return fields


def _type_name(field: dict) -> str:
    name = {"list_of_sections": "list of sections (YAML)", "list": "list, one per line"}.get(field["kind"], field["kind"])
    return f"{name} or null" if field["optional"] else name


def shipped_recipes() -> dict[str, Path]:
    """The example recipes (recipes/ of the checkout or the wheel), by their path under recipes/."""
    folder = example_path("recipes")
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*.yaml"))}


def recipe_choices(root: Path) -> list[dict]:
    saved = sorted((root / SAVED_RECIPES).rglob("*.yaml")) if (root / SAVED_RECIPES).is_dir() else []
    return [{"id": f"root:{relative(root, path)}", "label": relative(root, path)} for path in saved] + [
        {"id": f"shipped:{name}", "label": f"shipped: {name}"} for name in shipped_recipes()
    ]


def recipe_path(root: Path, recipe_id: str) -> Path:
    """A recipe the browser names as ``root:<path under root>`` or ``shipped:<path under recipes/>``."""
    where, _, name = recipe_id.partition(":")
    if where == "shipped":
        return inside(example_path("recipes"), name)
    if where == "root":
        return inside(root, name)
    raise UserError(f"'{recipe_id}' names no recipe; pick one from the list.")


def _as_text(field: dict, value) -> str:
    """How the form shows a value: what the user types for it."""
    if value is None:
        return ""
    if field["kind"] == "bool":
        return "true" if value else "false"
    if field["kind"] == "list":
        return "\n".join(str(item) for item in value)
    if field["kind"] == "list_of_sections":
        return yaml.safe_dump(value, sort_keys=False) if value else ""
    return str(value)


def _override(field: dict, text: str) -> str:
    """The ``key=value`` the CLI would take for what the user typed; numbers go as typed, so a wrong
    type gets the CLI's message."""
    key, kind = field["key"], field["kind"]
    text = text.strip() if kind != "str" else text
    if text == "" and (field["optional"] or kind in ("list", "list_of_sections")):
        return f"{key}=null" if field["optional"] else f"{key}=[]"
    if kind == "str":
        return f"{key}={json.dumps(text)}"
    if kind == "list":
        return f"{key}={json.dumps([line.strip() for line in text.splitlines() if line.strip()])}"
    if kind == "list_of_sections":
        try:
            sections = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{key}: not valid YAML ({str(err).splitlines()[0]}). Write one '- dir: ...' entry per subset.") from None
        return f"{key}={json.dumps(sections)}"
    return f"{key}={text}"


def form(root: Path, recipe_id: str) -> dict:
    """The form for a recipe: its sections (the shared ones and its method's), each key with its value."""
    recipe = load_recipe(recipe_path(root, recipe_id))
    values = flatten(recipe_to_dict(recipe))
    unused = {name for name in METHODS if name != recipe.method}
    fields = [
        {**field, "type": _type_name(field), "value": _as_text(field, values.get(field["key"]))}
        for field in schema_fields() if field["section"] not in unused
    ]
    return {"recipe": recipe_id, "method": recipe.method, "fields": fields, "yaml": recipe_to_yaml(recipe)}


def overrides_for(root: Path, recipe_id: str, values: dict[str, str]) -> list[str]:
    """The overrides that turn the recipe into the form's values: one per key the user changed."""
    base = form(root, recipe_id)
    shown = {field["key"]: field for field in base["fields"]}
    overrides = []
    for key, text in values.items():
        field = shown.get(key)
        if field is None:
            raise UserError(f"'{key}' is not a key of a {base['method']} recipe.")
        if text != field["value"]:
            overrides.append(_override(field, text))
    return overrides


def check(root: Path, recipe_id: str, values: dict[str, str]) -> dict:
    """Validate the form as ``sdtrain train RECIPE key=value...`` would: the CLI's message, or the resolved YAML."""
    overrides = overrides_for(root, recipe_id, values)
    recipe = load_recipe(recipe_path(root, recipe_id), overrides)
    return {"overrides": overrides, "yaml": recipe_to_yaml(recipe)}


def save(root: Path, recipe_id: str, values: dict[str, str], name: str) -> str:
    """Write the resolved recipe to ``<root>/recipes/<name>.yaml``; an existing file is never replaced."""
    name = name.strip().removesuffix(".yaml")
    if not is_plain_file_name(name):
        raise UserError(f"'{name}' cannot be a file name; use letters, digits, '-' and '_' (e.g. my_frog).")
    resolved = check(root, recipe_id, values)["yaml"]
    path = inside(root, f"{SAVED_RECIPES}/{name}.yaml")
    refuse_to_replace([path], "Choose another name, or delete that file yourself.")
    write_text(path, resolved)
    return relative(root, path)
