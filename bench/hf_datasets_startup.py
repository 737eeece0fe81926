"""Start-up of training on a Hugging Face dataset: scan to first batch, peak memory, images decoded.

Writes N small generated PNGs (default 10,000 at 64 px, each a different seeded 8x8 pattern) as a
``save_to_disk`` folder, a parquet file and (with ``--folder``) a kohya folder, then measures, each in a
fresh process, what ``TrainingData`` does before the first batch: the seconds to scan the data, the
seconds to the first batch's pixels, the peak resident memory of the process, and how many images PIL
decoded. docs/data.md#hugging-face-datasets quotes its output.

    python bench/hf_datasets_startup.py                 # 10,000 rows, datasets only
    python bench/hf_datasets_startup.py --folder        # also the same images as a kohya folder
    python bench/hf_datasets_startup.py --rows 1000 --dir /tmp/bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDE = 64
KINDS = ("save_to_disk", "parquet", "folder")


def _png(index: int) -> bytes:
    import io

    from PIL import Image

    pattern = np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pattern).resize((SIDE, SIDE), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def write_data(root: Path, rows: int, folder: bool) -> dict[str, Path]:
    import datasets

    images = [_png(index) for index in range(rows)]
    captions = [f"pattern {index}, tiles" for index in range(rows)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in images], "text": captions}, features=features)
    table.save_to_disk(str(root / "saved"))
    table.to_parquet(str(root / "rows.parquet"))
    paths = {"save_to_disk": root / "saved", "parquet": root / "rows.parquet"}
    if folder:
        subfolder = root / "kohya" / "1_pattern"
        subfolder.mkdir(parents=True)
        for index, (data, caption) in enumerate(zip(images, captions)):
            (subfolder / f"{index:05d}.png").write_bytes(data)
            (subfolder / f"{index:05d}.txt").write_text(caption)
        paths["folder"] = root / "kohya"
    return paths


def measure(kind: str, path: str) -> dict:
    """In this (fresh) process: scan, first batch, peak memory, decodes."""
    import datasets  # noqa: F401  (imported before the baseline for every kind: it alone adds ~65 MiB)
    from PIL import Image

    from trainer.data import TrainingData
    from trainer.recipe import DataConfig

    decodes = []
    real = Image._getdecoder
    Image._getdecoder = lambda *args: decodes.append(1) or real(*args)
    source = {"dir": path} if kind == "folder" else {"source": "datasets", "dataset": path}
    cfg = DataConfig(**source, resolution=SIDE)
    cfg.buckets.min_side, cfg.buckets.max_side = SIDE, 2 * SIDE
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    data = TrainingData(cfg, seed=1, batch_size=4)
    scanned = time.perf_counter()
    scan_decodes = len(decodes)
    data.load_batch(data.epoch_batches(0)[0], 0).pixel_values()
    first = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": kind, "rows": len(data.items), "scan_s": scanned - start, "first_batch_s": first - start,
            "decoded_at_scan": scan_decodes, "decoded_by_first_batch": len(decodes),
            "peak_rss_mib": peak / 1024, "rss_before_mib": before / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--folder", action="store_true", help="also measure the same images as a kohya folder")
    parser.add_argument("--dir", type=Path, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        paths = write_data(root, args.rows, args.folder)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf-cache")}
        encoded = (paths["parquet"].stat().st_size) / 2**20
        print(f"{args.rows} generated {SIDE} px PNG rows ({encoded:.1f} MiB of parquet); batch 4; {os.cpu_count()} CPUs")
        print("| source | scan (s) | to first batch (s) | decoded at scan | decoded by first batch | peak RSS (MiB) | RSS after imports (MiB) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind, path in paths.items():
            out = subprocess.run([sys.executable, __file__, "--measure", kind, str(path)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"| {kind} | {result['scan_s']:.2f} | {result['first_batch_s']:.2f} | {result['decoded_at_scan']} | "
                  f"{result['decoded_by_first_batch']} | {result['peak_rss_mib']:.0f} | {result['rss_before_mib']:.0f} |")


if __name__ == "__main__":
    main()
