"""Randomness that is a pure function of its seed, on every machine and Python version.

Resume must replay exactly the batches, flips and captions of the interrupted run. numpy's Generator
and torch's generators may change their streams between releases, and ``random.shuffle``/``randrange``
are not covered by Python's stability promise either; only ``random.Random(int).random()`` is. So every
draw here goes through ``random()``, and the seed is derived by hashing its parts.
"""

from __future__ import annotations

import hashlib
import random
from typing import MutableSequence, TypeVar

T = TypeVar("T")


def seed_of(*parts: object) -> int:
    """A 64-bit seed for e.g. ``(seed, epoch, sample_index, "caption")``: independent streams per purpose."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def seeded_rng(*parts: object) -> random.Random:
    return random.Random(seed_of(*parts))


def stable_shuffle(values: MutableSequence[T], rng: random.Random) -> None:
    """Fisher-Yates shuffle in place, drawing only from ``rng.random()`` (see the module docstring)."""
    for i in range(len(values) - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        values[i], values[j] = values[j], values[i]
