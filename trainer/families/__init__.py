"""The registry of model families: ``model.family`` in a recipe names one of these (or ``auto``).

A family is everything about a kind of base model that a training method must not need to know
(see ``trainer/families/base.py`` and docs/architecture.md#model-families): how it is detected and
loaded, how it encodes prompts, what it is conditioned on, its defaults and the foreign names of
its files. Methods and the training loop only talk to the family of the model they are given.
"""

from __future__ import annotations

import difflib
import importlib

from trainer.errors import UserError

# Imported on demand, like the methods.
FAMILIES = {
    "sd1": "trainer.families.sd:SD1",
    "sd2": "trainer.families.sd:SD2",
    "sdxl": "trainer.families.sdxl:SDXL",
}
AUTO = "auto"


def check_family_name(name: str) -> None:
    if name != AUTO and name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Recipe key 'model.family' is '{name}', which is not a known model family.{hint} Use auto, {', '.join(FAMILIES)}.")


def family_named(name: str):
    """The family instance registered as ``name``."""
    check_family_name(name)
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def all_families() -> list:
    return [family_named(name) for name in FAMILIES]
