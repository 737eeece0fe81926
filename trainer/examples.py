"""The example recipes and datasets: the repository's ``recipes/`` and ``datasets/`` folders.

They are the only copy. A source checkout (and an editable install) reads them where they are; a wheel
cannot reach outside its package, so building one copies both folders into it as
``trainer/_examples/`` (``setup.py``). ``sdtrain bench``, ``sdtrain toyworld bench`` and the
DreamBooth drift measurement find their default recipes and pictures through ``example_path``.
"""

from __future__ import annotations

from pathlib import Path

# Inside an installed wheel only; the source tree never has it.
PACKAGED_EXAMPLES = Path(__file__).resolve().parent / "_examples"
SOURCE_CHECKOUT = Path(__file__).resolve().parents[1]


def example_path(*parts: str) -> Path:
    """``example_path("recipes", "toy")``: the wheel's copy if this is an installed wheel, else the checkout's."""
    root = PACKAGED_EXAMPLES if PACKAGED_EXAMPLES.is_dir() else SOURCE_CHECKOUT
    return root.joinpath(*parts)
