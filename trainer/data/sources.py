"""Finding the images and their raw captions: kohya folders, recipe subsets, metadata.jsonl folders.

Nothing here raises on bad data: every mistake becomes a ``Problem`` so ``sdtrain data inspect`` can
list them all at once, and ``TrainingData`` turns the fatal ones into a single ``UserError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data.captions import CaptionEncodingError, first_line, read_caption_file

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.data.hf_datasets import DatasetRow
    from trainer.recipe import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
# kohya: "<repeats>_<class words>"; a bare "10" means 10 repeats and no words.
_KOHYA_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One finding about the data. Fatal ones stop training; the rest are warnings.

    ``files`` lets one finding cover many files (e.g. all non-image files of a folder) without
    flooding the training log, while inspect prints every name.
    """

    message: str
    fatal: bool = True
    files: tuple[str, ...] = ()

    def text(self, max_files: int | None = 5) -> str:
        if not self.files:
            return self.message
        shown = self.files if max_files is None else self.files[:max_files]
        more = len(self.files) - len(shown)
        listing = ", ".join(shown) + (f" and {more} more" if more else "")
        return f"{self.message}: {listing}"


@dataclass(frozen=True)
class Subset:
    """One folder of images with its settings, resolved from data.dir or data.subsets."""

    name: str  # the folder name: the key of tag_frequency / dataset_dirs, like kohya's ss_* metadata
    dir: Path
    origin: str  # the recipe key it came from, for messages
    repeats: int
    fallback_caption: str | None
    fallback_source: str  # "folder words" or "subset caption"
    caption_extension: str
    is_reg: bool
    metadata_file: Path | None


@dataclass(frozen=True)
class ImageSource:
    origin: Path | DatasetRow  # where the image's bytes are: a file, or a row of a Hugging Face dataset
    relative: str  # posix path inside the subset folder ("row 12" in a dataset): stable across machines, used in fingerprints
    subset: Subset
    caption: str
    # "file", "metadata", "dataset", "folder words", "subset caption", or "none" (empty caption).
    caption_source: str


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """``"10_sls frog"`` -> ``(10, "sls frog")``; None when the name does not start with ``<int>_``."""
    match = _KOHYA_FOLDER.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2) or ""


def _extension(value: str) -> str:
    return value if value.startswith(".") else f".{value}"


def _folder_problem(directory: Path, origin: str) -> Problem | None:
    if not directory.exists():
        return Problem(f"{origin} '{directory}' does not exist. Check the path (relative paths are read from the folder you run sdtrain in, {Path.cwd()}).")
    if not directory.is_dir():
        return Problem(f"{origin} '{directory}' is a file, not a folder. Point {origin} at the folder that holds the images.")
    return None


def _metadata_path(directory: Path, configured: str | None, origin: str) -> tuple[Path | None, Problem | None]:
    """An explicit metadata_file (relative to the subset folder, else to the working folder), or a
    ``metadata.jsonl`` found in the folder, as the HF ``imagefolder`` layout has it."""
    if configured is None:
        found = directory / METADATA_NAME
        return (found if found.is_file() else None), None
    candidates = [Path(configured)] if Path(configured).is_absolute() else [directory / configured, Path(configured)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, None
    looked = " and ".join(f"'{c}'" for c in candidates)
    return None, Problem(f"{origin.removesuffix('.dir')}.metadata_file '{configured}' does not exist (looked for {looked}). Fix the path or remove the key to use sidecar caption files.")


def resolve_subsets(cfg: DataConfig) -> tuple[list[Subset], list[Problem]]:
    """The subsets named by data.dir (kohya parent folder) and data.subsets, in that order."""
    subsets: list[Subset] = []
    problems: list[Problem] = []
    default_ext = _extension(cfg.caption_extension)
    if not cfg.dir and not cfg.subsets:
        problems.append(Problem(
            "The recipe names no images: set data.dir to a kohya parent folder (subfolders named like '10_sls frog', "
            "10 = repeats, the words = caption for images without a caption file) or list data.subsets, each with a dir."
        ))
        return subsets, problems

    if cfg.dir:
        parent = Path(cfg.dir)
        problem = _folder_problem(parent, "data.dir")
        if problem:
            problems.append(problem)
        else:
            skipped, loose_images = [], []
            for child in sorted(parent.iterdir(), key=lambda path: path.name):
                if child.name.startswith("."):
                    continue
                if child.is_file():
                    if is_image(child):
                        loose_images.append(child.name)
                    continue
                parsed = parse_kohya_folder(child.name)
                if parsed is None or parsed[0] < 1:
                    skipped.append(child.name)
                    continue
                repeats, words = parsed
                metadata, _ = _metadata_path(child, None, "data.dir subfolder")
                subsets.append(Subset(child.name, child, "data.dir subfolder", repeats, words,
                                      "folder words", default_ext, False, metadata))
            if skipped:
                problems.append(Problem(
                    f"data.dir '{parent}': skipped subfolders whose name does not start with '<repeats>_' (kohya's "
                    f"layout, e.g. '10_sls frog'; repeats must be at least 1)", fatal=False, files=tuple(skipped)))
            if loose_images and (subsets or skipped):
                problems.append(Problem(
                    f"data.dir '{parent}': images directly in it are not used (kohya reads only its '<repeats>_<words>' "
                    f"subfolders); move them into one", fatal=False, files=tuple(loose_images)))
            if not subsets:
                hint = (f" It holds images directly: move them into a subfolder such as '{parent}/10_sls frog', or list "
                        f"'{parent}' under data.subsets instead of data.dir." if loose_images else "")
                problems.append(Problem(
                    f"data.dir '{parent}' has no subfolders named '<repeats>_<words>' (e.g. '10_sls frog'), so there is "
                    f"nothing to train on.{hint}"))

    for index, sub in enumerate(cfg.subsets):
        origin = f"data.subsets[{index}].dir"
        directory = Path(sub.dir)
        problem = _folder_problem(directory, origin)
        if problem:
            problems.append(problem)
            continue
        if sub.repeats < 1:
            problems.append(Problem(f"data.subsets[{index}].repeats is {sub.repeats}; it must be at least 1. Remove the subset instead of setting 0."))
            continue
        metadata, problem = _metadata_path(directory, sub.metadata_file, origin)
        if problem:
            problems.append(problem)
            continue
        ext = _extension(sub.caption_extension) if sub.caption_extension else default_ext
        subsets.append(Subset(directory.name or str(directory), directory, origin, sub.repeats, sub.caption,
                              "subset caption", ext, sub.is_reg, metadata))

    # Names key kohya's per-folder metadata, so two folders with one name (train/x, reg/x) must not merge.
    seen: dict[str, int] = {}
    unique = []
    for subset in subsets:
        count = seen.get(subset.name, 0) + 1
        seen[subset.name] = count
        unique.append(subset if count == 1 else replace(subset, name=f"{subset.name} #{count}"))
    return unique, problems


def _read_metadata(path: Path) -> tuple[dict[Path, str | None], list[Problem]]:
    """HF imagefolder ``metadata.jsonl``: one JSON object per line with ``file_name`` (relative to the
    file's folder) and the caption in ``text`` (the diffusers scripts' default column) or ``caption``.

    Read line by line rather than through ``datasets.load_dataset``: that would decode every image and
    write an Arrow cache under ~/.cache, and could not say which line is broken.
    """
    rows: dict[Path, str | None] = {}
    problems: list[Problem] = []
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return rows, [Problem(f"Metadata file '{path}' is not UTF-8. Re-save it as UTF-8.")]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(f"Metadata file {where} is not valid JSON ({err.msg}). Each line must be one object like {{\"file_name\": \"a.png\", \"text\": \"a caption\"}}."))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(Problem(f"Metadata file {where} has no \"file_name\" string. Each line must be one object like {{\"file_name\": \"a.png\", \"text\": \"a caption\"}}."))
            continue
        text = row.get("text", row.get("caption"))
        if text is not None and not isinstance(text, str):
            problems.append(Problem(f"Metadata file {where}: the caption for '{row['file_name']}' is a {type(text).__name__}, not a string. Quote it."))
            continue
        image = path.parent / row["file_name"]
        if not image.is_file():
            problems.append(Problem(f"Metadata file {where} names '{row['file_name']}', which does not exist in '{path.parent}'. Fix the file_name or remove the line."))
        elif not is_image(image):
            problems.append(Problem(f"Metadata file {where} names '{row['file_name']}', which is not a {'/'.join(IMAGE_EXTENSIONS)} image. Convert it or remove the line."))
        else:
            rows[image] = first_line(text) if text is not None else None
    return rows, problems


def list_images(subset: Subset) -> tuple[list[ImageSource], list[Problem]]:
    """The images of one subset (top level of its folder, like kohya, plus any metadata.jsonl names),
    sorted by path so the item order, and so every seeded choice, is the same on every machine."""
    problems: list[Problem] = []
    rows: dict[Path, str | None] = {}
    if subset.metadata_file is not None:
        rows, problems = _read_metadata(subset.metadata_file)

    images: set[Path] = set(rows)
    files, subfolders = [], []
    for child in subset.dir.iterdir():
        if child.name.startswith(".") or child == subset.metadata_file:
            continue  # hidden files (.DS_Store, editor backups) are nobody's business
        if child.is_dir():
            subfolders.append(child.name)
        elif is_image(child):
            images.add(child)
        else:
            files.append(child)
    sidecars = {image.parent / f"{image.stem}{subset.caption_extension}" for image in images}
    others = sorted(child.name for child in files if child not in sidecars)

    if others:
        problems.append(Problem(
            f"{subset.origin} '{subset.dir}': skipped non-image files (images are {', '.join(IMAGE_EXTENSIONS)}; captions "
            f"are read from '<image name>{subset.caption_extension}')", fatal=False, files=tuple(others)))
    nested = [name for name in sorted(subfolders) if not any(image.parent == subset.dir / name for image in images)]
    if nested:
        problems.append(Problem(
            f"{subset.origin} '{subset.dir}': subfolders are not searched (list them as their own subsets)",
            fatal=False, files=tuple(nested)))
    if not images:
        problems.append(Problem(
            f"{subset.origin} '{subset.dir}' holds no images ({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the "
            f"folder from the recipe."))
        return [], problems

    sources: list[ImageSource] = []
    uncaptioned: list[str] = []
    empty_files: list[str] = []
    # Plain string order, not Path order (which ignores case on Windows): the same on every machine.
    for path in sorted(images, key=lambda path: path.as_posix()):
        relative = path.relative_to(subset.dir).as_posix() if path.is_relative_to(subset.dir) else path.as_posix()
        sidecar = path.parent / f"{path.stem}{subset.caption_extension}"
        if rows.get(path) is not None:
            caption, source = rows[path], "metadata"
        elif sidecar.is_file():
            try:
                caption, source = read_caption_file(sidecar), "file"
            except CaptionEncodingError as err:
                problems.append(Problem(f"Caption file '{sidecar}' is not UTF-8 ({err}). Re-save it as UTF-8 (most editors offer this under 'Save as' / encoding)."))
                continue
        elif subset.fallback_caption:
            caption, source = subset.fallback_caption, subset.fallback_source
        else:
            caption, source = "", "none"
        if not caption:
            # An empty caption file (or metadata text) is taken at its word, not replaced by the fallback.
            (empty_files if source in ("file", "metadata") else uncaptioned).append(relative)
            source = "none"
        sources.append(ImageSource(path, relative, subset, caption, source))
    if empty_files:
        problems.append(Problem(
            f"{subset.origin} '{subset.dir}': no caption (the caption is empty), so these train with an empty "
            f"caption", fatal=False, files=tuple(empty_files)))
    if uncaptioned:
        problems.append(Problem(
            f"{subset.origin} '{subset.dir}': no caption (no '{subset.caption_extension}' file, and no folder words or "
            f"subset caption to fall back on), so these train with an empty caption", fatal=False, files=tuple(uncaptioned)))
    return sources, problems
