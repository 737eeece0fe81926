"""Value rules of recipe keys, checked when a recipe is loaded, before any model or image is.

A rule is ``(key, valid, fix)``; each broken one becomes one sentence that names the dotted key, its
value and the fix. ``trainer.recipe.validate_recipe`` holds the rules of the shared sections; each
method's ``trainer/methods/<name>/config.py`` has a ``problems`` function with its own section's.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

Rule = tuple[str, bool, str]


def shown(value: object) -> str:
    """A value as a recipe spells it: strings quoted, booleans and null in YAML's words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


def broken(section: str, cfg: object, rules: Iterable[Rule]) -> list[str]:
    """One message per rule whose value is not valid: ``Recipe key 'section.key' is value; fix``."""
    return [f"Recipe key '{section}.{key}' is {shown(getattr(cfg, key))}; {fix}" for key, valid, fix in rules if not valid]


def one_of(value: str, names: Iterable[str]) -> str:
    """The fix for a name that is not one of ``names``, with the closest one if a typo is likely."""
    names = list(names)
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"use one of {', '.join(names)}{hint}."


# accelerate's set_seed seeds numpy, which takes seeds in [0, 2**32); every seed of a run is held to it.
SEED_LIMIT = 2**32


def seed_rule(key: str, seed: int) -> Rule:
    return (key, 0 <= seed < SEED_LIMIT, f"use a seed from 0 to {SEED_LIMIT - 1}.")


def is_learning_rate(value: float) -> bool:
    """Positive and finite (NaN fails both comparisons)."""
    return 0 < value < math.inf


def text_encoder_lr_rule(value: float | None) -> Rule:
    """``<method>.text_encoder_lr``: null follows train.lr."""
    return ("text_encoder_lr", value is None or is_learning_rate(value), "use null (= train.lr) or a positive learning rate.")
