"""Images and captions from a Hugging Face ``datasets`` dataset (``data.source: datasets``).

``data.dataset`` names a ``save_to_disk`` folder, parquet or arrow files (one file, a folder of them or
a glob), an ``imagefolder`` folder (images with ``metadata.jsonl`` or ``metadata.csv``), or a hub id
already in the local cache (sdtrain never downloads: the CLI sets ``HF_DATASETS_OFFLINE=1``).

Nothing is decoded up front and the images are not copied: arrow files and ``save_to_disk`` folders stay
memory-mapped, parquet files are read into memory as they are (the encoded image bytes), an imagefolder's
images stay files (``datasets`` keeps a table of their names and captions in its cache), and each row's
encoded bytes are read when the scan hashes them and when a batch needs the row's pixels
(``dataset.load_pixels``). Mistakes become ``Problem``s, as in ``sources``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.captions import first_line
from trainer.data.sources import ImageSource, Problem, Subset

if TYPE_CHECKING:  # the recipe schema imports this module's checks; annotations only here
    from trainer.recipe import DataConfig

DATASET_ORIGIN = "data.dataset"  # the origin of the dataset's subset
FILE_FORMATS = (".parquet", ".arrow")
# What save_to_disk writes next to the arrow files (a Dataset, or a DatasetDict of splits).
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_GLOB_CHARACTERS = set("*?[")


class _Refused(Exception):
    """A dataset that cannot be read; its message becomes the Problem."""


@dataclass(frozen=True)
class DatasetRow:
    """Where one image's encoded bytes are: row ``index`` of a dataset. Read on demand, like a file."""

    dataset: str  # data.dataset, for messages
    index: int
    rows: ImageRows = field(compare=False, repr=False)

    def read_bytes(self) -> bytes:
        return self.rows.image_bytes(self.index)

    def __str__(self) -> str:
        return f"row {self.index} of dataset '{self.dataset}'"


class ImageRows:
    """A dataset's image and caption columns, as Arrow holds them (memory-mapped or in memory).

    The image column is what ``datasets.Image`` stores (a struct of the encoded ``bytes`` and a ``path``,
    where only a path is kept for images that are files, as ``imagefolder`` does) or plain binary bytes.
    """

    def __init__(self, table: pa.Table, name: str, image_column: str, caption_column: str | None, base: Path | None):
        self.name = name
        self._images = table.column(image_column)
        self._is_struct = pa.types.is_struct(self._images.type)
        self._captions = table.column(caption_column) if caption_column is not None else None
        self._base = base  # relative image paths are read from here

    def __len__(self) -> int:
        return len(self._images)

    def image_bytes(self, index: int) -> bytes:
        value = self._images[index]
        if not self._is_struct:
            data = value.as_py()
            if data is None:
                raise FileNotFoundError("the image column is empty in this row")
            return data
        data = value["bytes"].as_py()
        if data is not None:
            return data
        path = value["path"].as_py()
        if path is None:
            raise FileNotFoundError("the image column is empty in this row")
        file = Path(path)
        if not file.is_absolute() and self._base is not None:
            file = self._base / file
        return file.read_bytes()

    def caption(self, index: int) -> str | None:
        if self._captions is None:
            return None
        text = self._captions[index].as_py()
        return first_line(text) if text is not None else None


def is_saved_or_file(path: Path) -> bool:
    """A .parquet/.arrow file or a save_to_disk folder: a dataset by its look alone (an imagefolder
    looks like an image folder, which the folder source reads too)."""
    if path.is_file():
        return path.suffix in FILE_FORMATS
    return any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _is_glob(spec: str) -> bool:
    return any(char in _GLOB_CHARACTERS for char in spec)


def _pick_split(splits: dict[str, Any], wanted: str | None, name: str) -> Any:
    """The split data.split names; unset: "train", or the only split there is."""
    if wanted is not None:
        if wanted in splits:
            return splits[wanted]
        raise _Refused(f"data.split '{wanted}' is not a split of dataset '{name}'; its splits are: {', '.join(splits)}. Fix data.split.")
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise _Refused(f"Dataset '{name}' has the splits {', '.join(splits)} and none is called 'train'. Set data.split to the one to train on.")


def _arrow_table(dataset: Any, wanted_split: str | None, name: str) -> pa.Table:
    """The Arrow table under a ``datasets`` Dataset (or the chosen split of a DatasetDict), without a copy:
    a slice of the memory-mapped table (rows gathered only when the dataset holds an index mapping)."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        dataset = _pick_split(dict(dataset), wanted_split, name)
    return dataset.with_format("arrow")[:]


def _read_arrow_file(path: Path) -> pa.Table:
    """An arrow file, memory-mapped: the IPC stream format ``datasets`` writes, or the IPC file format."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _read_files(files: list[Path], columns: list[str]) -> pa.Table:
    """Parquet files read into memory (the columns asked for only), arrow files memory-mapped."""
    tables = []
    for file in files:
        if file.suffix == ".parquet":
            tables.append(pq.read_table(file, columns=columns))
        else:
            tables.append(_read_arrow_file(file).select(columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _file_schema(file: Path) -> pa.Schema:
    if file.suffix == ".parquet":
        return pq.read_schema(file)
    return _read_arrow_file(file).schema


def _data_files(folder: Path, wanted_split: str | None) -> list[Path]:
    """The parquet/arrow files of a folder (searched recursively), of one split when their names say
    which (``datasets``' own rules: ``train-00000-of-00001.parquet``, ``data/test/...``)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = sorted(path for path in folder.rglob("*") if path.suffix in FILE_FORMATS and path.is_file())
    if not found:
        return []
    splits = DataFilesDict.from_patterns(get_data_patterns(str(folder)), str(folder))
    by_split = {str(split): [Path(file) for file in files if Path(file).suffix in FILE_FORMATS] for split, files in splits.items()}
    by_split = {split: sorted(files) for split, files in by_split.items() if files}
    return _pick_split(by_split, wanted_split, str(folder)) if by_split else found


def _load_hub_id(spec: str, wanted_split: str | None) -> pa.Table:
    import datasets

    try:
        loaded = datasets.load_dataset(spec)
    except Exception as err:  # offline, datasets raises ConnectionError, FileNotFoundError or ValueError here
        raise _Refused(
            f"data.dataset '{spec}' is neither a file nor a folder, and the hub dataset '{spec}' is not in the local "
            f"Hugging Face datasets cache ({type(err).__name__}). sdtrain never downloads: on a machine with network "
            f"access run `python -c \"import datasets; datasets.load_dataset('{spec}')\"` (or copy its cache folder, "
            f"~/.cache/huggingface/datasets by default), or save it with save_to_disk and set data.dataset to that folder."
        ) from None
    return _arrow_table(loaded, wanted_split, spec)


def _load_folder(folder: Path, wanted_split: str | None) -> tuple[pa.Table | list[Path], Path]:
    """A save_to_disk folder or an imagefolder as its table; a folder of parquet/arrow files as its files."""
    import datasets

    if is_saved_or_file(folder):
        return _arrow_table(datasets.load_from_disk(str(folder)), wanted_split, str(folder)), folder
    files = _data_files(folder, wanted_split)
    if files:
        return files, folder
    # imagefolder keeps each image's path, not its bytes: its table is small, and nothing is decoded.
    return _arrow_table(datasets.load_dataset("imagefolder", data_dir=str(folder)), wanted_split, str(folder)), folder


def _locate(cfg: DataConfig) -> tuple[pa.Table | list[Path], Path | None]:
    """The dataset's table, or the parquet/arrow files to read it from (their columns are checked first),
    and the folder that relative image paths start from."""
    spec = cfg.dataset
    assert spec is not None  # setting_problems refuses data.source: datasets without data.dataset
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path, cfg.split)
    if path.is_file():
        if path.suffix not in FILE_FORMATS:
            raise _Refused(f"data.dataset '{spec}' is a {path.suffix or 'extensionless'} file; name a .parquet or .arrow file, a folder of them, a save_to_disk or imagefolder folder, or a hub id.")
        return [path], path.parent
    if _is_glob(spec):
        files = sorted(Path(match) for match in glob.glob(spec, recursive=True) if Path(match).suffix in FILE_FORMATS)
        if not files:
            raise _Refused(f"data.dataset '{spec}' matches no .parquet or .arrow file (relative paths are read from {Path.cwd()}). Fix the pattern.")
        return files, None
    from trainer.models.loading import _looks_like_hub_id  # model.base tells hub ids the same way

    if _looks_like_hub_id(spec):
        return _load_hub_id(spec, cfg.split), None
    raise _Refused(
        f"data.dataset '{spec}' does not exist (relative paths are read from {Path.cwd()}). Name a save_to_disk folder, "
        f".parquet/.arrow files, an imagefolder folder, or a hub id like 'owner/name' that is in the local cache."
    )


def _column_problem(schema: pa.Schema, cfg: DataConfig) -> str | None:
    columns = ", ".join(schema.names)
    wanted = [("image_column", cfg.image_column), ("caption_column", cfg.caption_column)]
    for key, column in wanted:
        if column is not None and column not in schema.names:
            null = " (or null for no captions)" if key == "caption_column" else ""
            return f"data.{key} '{column}' is not a column of dataset '{cfg.dataset}'; its columns are: {columns}. Set data.{key} to one of them{null}."
    image_type = schema.field(cfg.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        return (f"data.image_column '{cfg.image_column}' of dataset '{cfg.dataset}' holds {image_type}, not images "
                f"(a datasets Image column, or the encoded bytes); its columns are: {columns}. Set data.image_column.")
    if cfg.caption_column is not None:
        caption_type = schema.field(cfg.caption_column).type
        if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type) or pa.types.is_null(caption_type)):
            return (f"data.caption_column '{cfg.caption_column}' of dataset '{cfg.dataset}' holds {caption_type}, not text; "
                    f"its columns are: {columns}. Set data.caption_column to a text column, or null for no captions.")
    return None


def open_rows(cfg: DataConfig) -> ImageRows:
    """The dataset's image and caption columns; raises ``_Refused`` with what is wrong."""
    located, base = _locate(cfg)
    schema = located.schema if isinstance(located, pa.Table) else _file_schema(located[0])
    problem = _column_problem(schema, cfg)
    if problem:
        raise _Refused(problem)
    columns = [column for column in (cfg.image_column, cfg.caption_column) if column is not None]
    table = located if isinstance(located, pa.Table) else _read_files(located, list(dict.fromkeys(columns)))
    return ImageRows(table, str(cfg.dataset), cfg.image_column, cfg.caption_column, base)


def dataset_sources(cfg: DataConfig) -> tuple[list[Subset], list[ImageSource], list[Problem]]:
    """The dataset as one subset (named like its folder or hub id, repeats ``data.repeats``) and its rows."""
    try:
        rows = open_rows(cfg)
    except _Refused as refused:
        return [], [], [Problem(str(refused))]
    except Exception as err:  # a damaged file: pyarrow and datasets raise many types
        return [], [], [Problem(f"data.dataset '{cfg.dataset}' cannot be read ({type(err).__name__}: {err}). Check that it is a dataset sdtrain reads (see docs/data.md#hugging-face-datasets).")]
    name = Path(str(cfg.dataset).rstrip("/")).name or str(cfg.dataset)
    subset = Subset(name, Path(str(cfg.dataset)), DATASET_ORIGIN, cfg.repeats, None, "none", cfg.caption_extension, False, None)
    sources: list[ImageSource] = []
    uncaptioned: list[str] = []
    for index in range(len(rows)):
        caption = rows.caption(index) or ""
        relative = f"row {index}"
        if not caption:
            uncaptioned.append(relative)
        sources.append(ImageSource(DatasetRow(rows.name, index, rows), relative, subset, caption, "dataset" if caption else "none"))
    problems = []
    if not sources:
        problems.append(Problem(f"data.dataset '{cfg.dataset}' has no rows. Point it at a dataset with images."))
    if uncaptioned and cfg.caption_column is not None:
        problems.append(Problem(
            f"data.dataset '{cfg.dataset}': no caption (column '{cfg.caption_column}' is empty), so these train with an "
            f"empty caption", fatal=False, files=tuple(uncaptioned)))
    return [subset], sources, problems
