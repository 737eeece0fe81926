"""The Data page: a dataset folder as training sees it, and caption edits written back atomically.

The view is ``sdtrain data inspect``'s: the same scan (trainer.data.scan), the same folder reading,
the same problem texts. Edits touch only sidecar caption files of images inside the opened folder.
"""

from __future__ import annotations

from pathlib import Path

from trainer.atomic import write_text
from trainer.data.captions import read_caption_file, split_tags, tag_frequency
from trainer.data.inspect import DEFAULT_RESOLUTION, _folder_config
from trainer.data.scan import scan
from trainer.data.sources import Subset, is_image, list_images, resolve_subsets
from trainer.errors import UserError
from trainer.ui.confine import OutsideRoot, inside, relative

TAG_OPERATIONS = ("add", "remove", "replace", "trigger_first")


def open_dataset(root: Path, folder: str, resolution: int | None = None) -> dict:
    """Subsets, buckets, tag frequencies, problems and every usable image of ``folder`` (root-relative)."""
    directory = inside(root, folder)
    if not directory.is_dir():
        raise UserError(f"'{folder}' is not a folder under {root}. Pick the dataset folder (e.g. datasets/sls_frog).")
    cfg, how = _folder_config(directory, resolution or DEFAULT_RESOLUTION)
    result = scan(cfg)
    buckets: dict[str, dict] = {}
    for item in result.items:
        row = buckets.setdefault(f"{item.bucket[0]}x{item.bucket[1]}", {"images": 0, "samples": 0})
        row["images"] += 1
        row["samples"] += item.repeats
    subset_of = {subset.name: subset for subset in result.subsets}
    return {
        "folder": relative(root, directory),
        "how": how,
        "resolution": cfg.resolution,
        "separator": cfg.tag_separator,
        "buckets_described": result.plan.describe(),
        "subsets": [
            {
                "name": subset.name, "repeats": subset.repeats, "reg": subset.is_reg,
                "images": result.image_counts.get(subset.name, 0),
                "usable": sum(1 for item in result.items if item.subset == subset.name),
                "fallback_caption": subset.fallback_caption or "",
                "tags": tag_frequency((item.caption for item in result.items if item.subset == subset.name), cfg.tag_separator),
            }
            for subset in result.subsets
        ],
        "buckets": buckets,
        "problems": [{"fatal": problem.fatal, "text": problem.text(max_files=None)} for problem in result.problems],
        "items": [
            {
                "image": relative(root, item.origin),
                "name": item.relative_path,
                "subset": item.subset,
                "caption": item.caption,
                "caption_source": item.caption_source,
                "editable": subset_of[item.subset].metadata_file is None,
                "size": list(item.original_size),
                "bucket": list(item.bucket),
                "repeats": item.repeats,
            }
            for item in result.items
        ],
    }


def _subset_of(directory: Path, image: Path) -> Subset:
    """The subset (as training reads ``directory``) whose folder holds ``image``."""
    cfg, _ = _folder_config(directory, DEFAULT_RESOLUTION)
    subsets, _ = resolve_subsets(cfg)
    for subset in subsets:
        if subset.dir.resolve() == image.parent:
            return subset
    raise UserError(f"'{image.name}' is not in a subset folder of '{directory.name}' that training reads.")


def _caption_path(root: Path, folder: str, image_path: str) -> tuple[Path, Path]:
    """(dataset folder, the image's sidecar caption file), both checked to lie inside the dataset folder."""
    directory = inside(root, folder)
    image = inside(root, image_path)
    if not image.is_relative_to(directory) or not image.is_file() or not is_image(image):
        raise OutsideRoot(f"'{image_path}' is not an image in the dataset folder '{folder}'")
    subset = _subset_of(directory, image)
    if subset.metadata_file is not None:
        raise UserError(f"'{image.name}' takes its caption from {subset.metadata_file.name}; edit that file, the UI edits sidecar caption files only.")
    caption = image.parent / f"{image.stem}{subset.caption_extension}"
    # A caption file that is a symlink is written where it points, which must be inside the dataset too.
    target = caption.resolve()
    if not target.is_relative_to(directory):
        raise OutsideRoot(f"the caption file of '{image.name}' leads outside the dataset folder")
    return directory, target


def _split_first_line(path: Path) -> tuple[str, str]:
    """A caption file's first line (what training reads) and the rest of it, kept as it is."""
    if not path.exists():
        return "", ""
    first = read_caption_file(path)
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.splitlines(keepends=True)
    return first, "".join(lines[1:])


def write_caption(root: Path, folder: str, image_path: str, caption: str, expected: str | None) -> str:
    """Replace the first line of the image's caption file (creating it if there is none) with ``caption``.

    ``expected`` is the caption the browser showed; if the file changed on disk since, nothing is
    written. Lines after the first (which training ignores) are kept.
    """
    caption = caption.strip()
    if "\n" in caption or "\r" in caption:
        raise UserError("A caption is one line (training reads only the first line of a caption file); remove the line breaks.")
    _, path = _caption_path(root, folder, image_path)
    try:
        current, rest = _split_first_line(path)
    except UnicodeDecodeError:
        raise UserError(f"'{path.name}' is not UTF-8 text, so the UI does not rewrite it; fix its encoding in an editor.") from None
    if expected is not None and path.exists() and current != expected:
        raise UserError(f"'{path.name}' changed on disk since the page showed it (now: \"{current}\"). Reload the dataset and edit again.")
    write_text(path, caption + ("\n" + rest if rest else "\n"))
    return caption


def edited_caption(caption: str, separator: str, operation: str, tag: str, new_tag: str = "", first: bool = False) -> str:
    """``caption`` after one tag operation; tags compare without regard to case, and are re-joined as kohya writes them."""
    tags = split_tags(caption, separator)
    wanted = tag.strip().lower()
    matches = [t for t in tags if t.lower() == wanted]
    if operation == "add":
        if matches:
            return caption
        tags = [tag.strip(), *tags] if first else [*tags, tag.strip()]
    elif operation == "remove":
        tags = [t for t in tags if t.lower() != wanted]
    elif operation == "replace":
        tags = [new_tag.strip() if t.lower() == wanted else t for t in tags]
    elif operation == "trigger_first":
        if not matches:
            return caption
        tags = [matches[0]] + [t for t in tags if t is not matches[0]]
    else:
        raise UserError(f"Unknown tag operation '{operation}'; use one of {', '.join(TAG_OPERATIONS)}.")
    joined = f"{separator} ".join(t for t in tags if t)
    return caption if split_tags(joined, separator) == split_tags(caption, separator) else joined


def bulk_edit(root: Path, folder: str, operation: str, tag: str, new_tag: str = "", first: bool = False) -> dict:
    """Apply a tag operation to every caption file of the dataset (usable at any resolution or not);
    images without one are left alone: a new file would replace their fallback caption."""
    if not tag.strip() or (operation == "replace" and not new_tag.strip()):
        raise UserError("Name the tag (and for replace, the new tag).")
    directory = inside(root, folder)
    cfg, _ = _folder_config(directory, DEFAULT_RESOLUTION)
    changed = []
    for subset in resolve_subsets(cfg)[0]:
        if subset.metadata_file is not None:
            continue
        for source in list_images(subset)[0]:
            if source.caption_source != "file":
                continue
            new = edited_caption(source.caption, cfg.tag_separator, operation, tag, new_tag, first)
            if new != source.caption:
                write_caption(root, folder, relative(root, source.origin), new, source.caption)
                changed.append(relative(directory, source.origin))
    return {"changed": changed}
