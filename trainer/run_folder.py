"""One run per output folder: a new run is not started on top of an earlier one by accident.

An output folder holds an earlier run when it has a complete checkpoint, or an artifact named after
this recipe's ``output.name`` or after the one in the folder's ``recipe.yaml`` (a finished run whose
checkpoints were deleted). Caches (``latent_cache/``, DreamBooth's ``class_images/``) do not count: they
are keyed by what they were made from and are reused safely. A run that stopped before its first
checkpoint left nothing to resume or keep; a new run starts over there.

``sdtrain train --overwrite`` moves the earlier run's files (its ``recipe.yaml``, ``checkpoints/``,
``logs/``, ``samples/``, ``concept_eval/``, validation table and list, and artifacts) into a new sibling folder
``<output.dir>.replaced-YYYYmmdd-HHMMSS``; nothing is deleted, and everything else in the folder
(caches, the user's own files) stays. docs/recipes.md describes it for users.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from trainer.checkpoint import complete_checkpoints
from trainer.errors import UserError
from trainer.recipe import is_plain_file_name
from trainer.validation import CSV_NAME as VALIDATION_TABLE
from trainer.validation import IMAGES_NAME as VALIDATION_IMAGES

RUN_ENTRIES = ("recipe.yaml", "checkpoints", "logs", "samples", "concept_eval", VALIDATION_TABLE, VALIDATION_IMAGES)
ARTIFACT_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _artifact_stems(recipe: dict) -> set[str]:
    """The names a run's artifacts start with: output.name, and for textual inversion the placeholder
    (the UIs take the prompt word from the file name)."""
    stems = {recipe.get("output", {}).get("name")}
    if recipe.get("method") == "textual_inversion":
        stems.add(recipe.get("textual_inversion", {}).get("placeholder"))
    # Only plain names: a path-like name must not let a check or a move reach outside the folder.
    return {stem for stem in stems if isinstance(stem, str) and is_plain_file_name(stem)}


def _recorded_recipe(output_dir: Path) -> dict:
    try:
        recorded = yaml.safe_load((output_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _artifacts(output_dir: Path, stems: set[str]) -> list[Path]:
    names = {f"{stem}{suffix}" for stem in stems for suffix in ARTIFACT_SUFFIXES} | {f"{stem}_diffusers" for stem in stems}
    return sorted(output_dir / name for name in names if (output_dir / name).exists())


def earlier_run(output_dir: Path, recipe: dict) -> list[Path]:
    """The files of an earlier run in ``output_dir`` that a new run would replace or mix with; empty
    when the folder holds no earlier run (see the module docstring)."""
    output_dir = Path(output_dir)
    artifacts = _artifacts(output_dir, _artifact_stems(recipe) | _artifact_stems(_recorded_recipe(output_dir)))
    if not artifacts and not complete_checkpoints(output_dir):
        return []
    return [output_dir / entry for entry in RUN_ENTRIES if os.path.lexists(output_dir / entry)] + artifacts


def refuse_earlier_run(output_dir: Path, files: list[Path]) -> UserError:
    """The one-paragraph refusal, offering what the user can do instead."""
    found = ", ".join(path.name for path in files if path.name not in ("recipe.yaml", "logs"))
    resume = "Continue it with --resume latest, start" if complete_checkpoints(output_dir) else "Start"
    return UserError(
        f"'{output_dir}' already holds a run ({found}); a new run there would replace its files and mix its checkpoints "
        f"with the new ones. {resume} a new run elsewhere with output.dir=<another folder>, or pass --overwrite to move "
        f"the earlier run's files into '{Path(output_dir).name}.replaced-<date>-<time>' beside it (nothing is deleted) and train here."
    )


def move_aside(output_dir: Path, files: list[Path]) -> Path:
    """Move ``files`` (entries of ``output_dir``) into a new ``<output_dir>.replaced-<date>-<time>``."""
    output_dir = Path(output_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 100):
        aside = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}" + (f"-{attempt}" if attempt > 1 else ""))
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise UserError(f"Could not find a free name beside '{output_dir}' to move the earlier run to; tidy up the '{output_dir.name}.replaced-*' folders.")
    for path in files:
        os.rename(path, aside / path.name)
    return aside
