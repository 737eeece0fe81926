"""Caption text: reading sidecar files and the per-sample processing kohya users expect.

Processing order (kohya's ``process_caption``, without wildcards): trigger word prefix -> caption
dropout (whole caption, trigger included, so the model also learns the unconditional case) -> split
into tags, keep the first ``keep_tokens`` fixed, shuffle the rest -> drop flexible tags -> re-join
with ", ". Every random choice comes from the ``rng`` passed in, seeded per (seed, epoch, sample).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data.seeding import stable_shuffle

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.recipe import DataConfig


class CaptionEncodingError(Exception):
    """A caption file that is not UTF-8; the scanner turns it into a problem naming the file."""


def read_caption_file(path: Path) -> str:
    """The first line of a caption file, stripped. kohya (without wildcards) ignores further lines.

    ``utf-8-sig`` also accepts the byte-order mark Windows editors like to add.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionEncodingError(f"byte 0x{data[err.start]:02x} at position {err.start} is not valid UTF-8") from None
    return first_line(text)


def first_line(text: str) -> str:
    """A caption as kohya reads one: its first line, stripped."""
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def split_tags(caption: str, separator: str) -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def _starts_with_trigger(caption: str, trigger: str) -> bool:
    # "sls frog, x" starts with the trigger "sls frog"; "sls frogger" does not.
    if not caption.startswith(trigger):
        return False
    rest = caption[len(trigger):]
    return not rest or not rest[0].isalnum()


def add_trigger_word(caption: str, trigger: str, separator: str) -> str:
    trigger = trigger.strip()
    if not trigger or _starts_with_trigger(caption, trigger):
        return caption
    if not caption:
        return trigger
    return f"{trigger}{separator} {caption}"


def process_caption(raw: str, cfg: DataConfig, rng: random.Random, is_reg: bool = False) -> str:
    # Regularisation images show the plain class: the trigger word on them would defeat prior preservation.
    caption = raw if is_reg else add_trigger_word(raw, cfg.trigger_word, cfg.tag_separator)
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    # Prose captions stay untouched unless a tag operation asks for the split.
    if not cfg.shuffle_tags and cfg.tag_dropout <= 0:
        return caption
    tags = split_tags(caption, cfg.tag_separator)
    fixed, flexible = tags[: cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_tags:
        stable_shuffle(flexible, rng)
    if cfg.tag_dropout > 0:
        # Like kohya, the fixed head (usually the trigger) is never dropped.
        flexible = [tag for tag in flexible if rng.random() >= cfg.tag_dropout]
    return ", ".join(fixed + flexible)


def tag_frequency(captions: Iterable[str], separator: str) -> dict[str, int]:
    """kohya's ``ss_tag_frequency`` for one folder: lower-cased tags of the raw captions, one count per image."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.lower() for tag in split_tags(caption, separator))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
