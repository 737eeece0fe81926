"""The registry of training methods: ``method:`` in a recipe names one of these."""

from __future__ import annotations

import difflib
import importlib

from trainer.errors import UserError

# Imported on demand so a run only pays for the method it uses.
METHODS = {
    "lora": "trainer.methods.lora.method:LoraMethod",
    "hypernetwork": "trainer.methods.hypernetwork.method:HypernetworkMethod",
    "dreambooth": "trainer.methods.dreambooth.method:DreamBoothMethod",
    "textual_inversion": "trainer.methods.textual_inversion.method:TextualInversionMethod",
    "lycoris": "trainer.methods.lycoris.method:LycorisMethod",
}


def check_method_name(name: str) -> None:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Recipe key 'method' is '{name}', which is not a known method.{hint} Known methods: {', '.join(METHODS)}.")


def section_problems(name: str, section: object) -> list[str]:
    """The value problems of method ``name``'s recipe section (``problems`` in the config module beside its class)."""
    check_method_name(name)
    package = METHODS[name].partition(":")[0].rpartition(".")[0]
    return importlib.import_module(f"{package}.config").problems(section)


def method_class(name: str):
    check_method_name(name)
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
