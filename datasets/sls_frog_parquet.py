"""Writes ``sls_frog.parquet``: the ``sls_frog`` pictures and their captions as a Hugging Face dataset.

Two columns, as the diffusers training scripts expect them: ``image`` (a ``datasets.Image``, the PNG
bytes as they are in ``sls_frog/``) and ``text`` (the caption file's first line, or the folder words
"sls frog" for the picture without one, as the folder source reads them). ``recipes/hf_dataset_lora.yaml``
trains on it with ``data.source: datasets``.

    python datasets/sls_frog_parquet.py
"""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "sls_frog" / "10_sls frog"
FOLDER_WORDS = "sls frog"


def caption(image: Path) -> str:
    sidecar = image.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").splitlines()[0].strip() if sidecar.is_file() else FOLDER_WORDS


def main() -> None:
    images = sorted(FOLDER.glob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": image.read_bytes(), "path": image.name} for image in images], "text": [caption(image) for image in images]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(HERE / "sls_frog.parquet"))


if __name__ == "__main__":
    main()
