"""``sdtrain data inspect PATH_OR_RECIPE``: what training would make of the data, before training.

It runs the same scan as ``TrainingData`` but never stops at a problem: every corrupt or too-small
image, missing caption and stray file is listed at once, so the user fixes them in one go. Its exit
status says whether training would start (0) or refuse this data (2), so it can gate a training run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer.data.captions import tag_frequency
from trainer.data.hf_datasets import DATASET_ORIGIN, is_saved_or_file
from trainer.data.scan import Item, ScanResult, scan
from trainer.data.sources import METADATA_NAME, Problem, is_image, parse_kohya_folder
from trainer.errors import UserError
from trainer.recipe import DataConfig, SubsetConfig, load_recipe

DEFAULT_RESOLUTION = 512
_CAPTION_WIDTH = 90


def _folder_config(folder: Path, resolution: int) -> tuple[DataConfig, str]:
    """A kohya parent folder becomes data.dir; a folder of images becomes one subset, taking repeats and
    fallback words from its own name when it is a kohya '10_sls frog' folder."""
    children = [child for child in folder.iterdir() if not child.name.startswith(".")]
    has_kohya_folders = any(child.is_dir() and (parse_kohya_folder(child.name) or (0,))[0] >= 1 for child in children)
    holds_images = any(child.is_file() and is_image(child) for child in children) or (folder / METADATA_NAME).is_file()
    if has_kohya_folders or not holds_images:
        return DataConfig(dir=str(folder), resolution=resolution), "as data.dir (kohya parent folder)"
    repeats, words = parse_kohya_folder(folder.name) or (1, "")
    subset = SubsetConfig(dir=str(folder), repeats=max(repeats, 1), caption=words or None)
    how = "as a single subset" + (f', repeats {subset.repeats} and caption "{words}" from its name' if words else "")
    return DataConfig(subsets=[subset], resolution=resolution), how


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _caption_text(item: Item) -> str:
    caption = item.caption if len(item.caption) <= _CAPTION_WIDTH else item.caption[: _CAPTION_WIDTH - 3] + "..."
    if item.caption_source == "none":
        return "(no caption)"
    if item.caption_source in ("folder words", "subset caption"):
        return f'(no caption: using {item.caption_source}) "{caption}"'
    return f'"{caption}"'


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _render(title: str, cfg: DataConfig, result: ScanResult, top_tags: int) -> str:
    items = result.items
    lines = [title, f"  resolution {cfg.resolution}; buckets: {result.plan.describe()}"]
    settings = [f"caption extension {cfg.caption_extension}", f"flip {'on' if cfg.flip else 'off'}"]
    if cfg.trigger_word:
        settings.append(f'trigger word "{cfg.trigger_word}"')
    if cfg.shuffle_tags:
        settings.append(f"shuffle tags keeping the first {cfg.keep_tokens}")
    if cfg.caption_dropout or cfg.tag_dropout:
        settings.append(f"caption dropout {cfg.caption_dropout}, tag dropout {cfg.tag_dropout}")
    lines.append("  " + "; ".join(settings))

    lines += ["", f"Subsets ({len(result.subsets)})"]
    if result.subsets:
        rows = [["name", "kind", "repeats", "images", "usable", "samples/epoch", "dir"]]
        for subset in result.subsets:
            mine = [item for item in items if item.subset == subset.name]
            rows.append([subset.name, "reg" if subset.is_reg else "train", str(subset.repeats),
                         str(result.image_counts.get(subset.name, 0)), str(len(mine)),
                         str(sum(item.repeats for item in mine)), str(subset.dir)])
        lines += _table(rows)
        for subset in result.subsets:
            if subset.origin == DATASET_ORIGIN:
                source = f"column '{cfg.caption_column}' of the dataset" if cfg.caption_column else "nowhere (data.caption_column is null)"
            elif subset.metadata_file:
                source = f"metadata {subset.metadata_file}"
            else:
                source = f"'<image>{subset.caption_extension}' files"
            fallback = f', else {subset.fallback_source} "{subset.fallback_caption}"' if subset.fallback_caption else ""
            lines.append(f"  {subset.name}: captions from {source}{fallback}")
        train = sum(item.repeats for item in items if not item.is_reg)
        reg = sum(item.repeats for item in items if item.is_reg)
        lines.append(f"  samples per epoch: {train} train" + (f" + {reg} reg (kohya balances reg to train)" if reg else ""))
    else:
        lines.append("  (none)")

    lines += ["", f"Images ({len(items)} usable)"]
    for subset in result.subsets:
        mine = [item for item in items if item.subset == subset.name]
        if not mine:
            continue
        lines.append(f"  {subset.name}/")
        rows = [[item.relative_path, f"{item.original_size[0]}x{item.original_size[1]}",
                 f"-> {item.bucket[0]}x{item.bucket[1]}", f"x{item.repeats}", _caption_text(item)] for item in mine]
        lines += _table(rows, indent="    ")

    lines += ["", "Buckets (samples counted with repeats)"]
    used = [item for item in items if item.repeats > 0]
    if used:
        images = Counter(item.bucket for item in used)
        samples = Counter()
        for item in used:
            samples[item.bucket] += item.repeats
        rows = [["bucket", "aspect", "images", "samples"]]
        rows += [[f"{w}x{h}", f"{w / h:.2f}", str(images[(w, h)]), str(samples[(w, h)])] for w, h in sorted(images)]
        lines += _table(rows)
        mean_error = sum(abs(item.ar_error) for item in used) / len(used)
        lines.append(f"  mean aspect-ratio error: {mean_error:.4f}")
    else:
        lines.append("  (no usable images)")

    lines += ["", f"Tag frequency (top {top_tags} per subset)"]
    for subset in result.subsets:
        counts = tag_frequency((item.caption for item in items if item.subset == subset.name), cfg.tag_separator)
        top = list(counts.items())[:top_tags]
        listing = ", ".join(f"{tag} ({count})" for tag, count in top) if top else "(no tags)"
        lines.append(f"  {subset.name}: {listing}")

    errors = [p for p in result.problems if p.fatal]
    warnings = [p for p in result.problems if not p.fatal]
    stop = "stops" if len(errors) == 1 else "stop"
    lines += ["", f"Problems ({_count(len(errors), 'error')} that {stop} training, {_count(len(warnings), 'warning')})"]
    for label, group in (("ERROR", errors), ("WARNING", warnings)):
        lines += [f"  {label}: {problem.text(max_files=None)}" for problem in group]
    if not result.problems:
        lines.append("  none")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Inspection:
    """The report, and why training would refuse this data (None: it would start, warnings or not)."""

    report: str
    refusal: str | None


def _refusal(fatal: list[Problem]) -> str | None:
    """One line: training's verdict on the data, with the first problem that stops it."""
    if not fatal:
        return None
    errors = _count(len(fatal), "error")
    return f"Training would refuse this data ({errors}, listed under Problems above). The first: {fatal[0].text(max_files=3)}"


def inspect_data(target: str, *, resolution: int | None = None, top_tags: int = 20) -> Inspection:
    """The report for a data folder, a parquet/arrow file or save_to_disk folder, or a recipe YAML. ``resolution`` overrides the recipe's, and
    defaults to 512 for a folder (and to the model family's for a recipe that leaves it unset). Raises UserError only when the target itself cannot be read (or
    the recipe has a value that cannot train); problems of the data are in the report."""
    path = Path(target)
    if is_saved_or_file(path):
        cfg = DataConfig(source="datasets", dataset=target, resolution=resolution or DEFAULT_RESOLUTION)
        title = f"Dataset {path} (as data.source: datasets, columns '{cfg.image_column}' and '{cfg.caption_column}')"
    elif path.is_dir():
        cfg, how = _folder_config(path, resolution or DEFAULT_RESOLUTION)
        title = f"Data folder {path} ({how})"
    elif path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        recipe = load_recipe(path, [f"data.resolution={resolution}"] if resolution else [])
        cfg = recipe.data
        title = f"Data of recipe {path}"
        if cfg.resolution is None:
            # As training does: the model family's default (the base is located, not loaded).
            from trainer.models.loading import locate_base

            family = locate_base(recipe.model.base, recipe.model.family, recipe.model.allow_unsafe_pickle).family
            cfg.resolution = family.default_resolution
            title += f" (resolution: the {family.title} default)"
    elif path.exists():
        raise UserError(f"'{target}' is neither a folder, a .parquet/.arrow dataset nor a .yaml recipe. Pass a data folder, a dataset or a recipe file to `sdtrain data inspect`.")
    else:
        raise UserError(f"'{target}' does not exist. Pass a data folder or a recipe file to `sdtrain data inspect`.")
    result = scan(cfg)
    return Inspection(_render(title, cfg, result, top_tags), _refusal(result.fatal))
