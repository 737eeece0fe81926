"""sdtrain installed from a wheel works away from the source checkout.

The source distribution is built from this checkout and the wheel from it (the way `python -m build`
does), the wheel is installed without dependencies into a temporary folder, and sdtrain runs from
another folder with that install first on the path: the code that reads the example recipes and
datasets must find the copies the wheel carries (``trainer/examples.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.packaging


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    process = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return process.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the wheel was installed into (built once per test session)."""
    work = tmp_path_factory.mktemp("packaging")
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = work / "sdist" / _run([sys.executable, "-c", build_sdist, str(work / "sdist")], cwd=REPO).strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "source", filter="data")
    (source,) = (work / "source").iterdir()
    pip = [sys.executable, "-m", "pip", "--no-cache-dir", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"), str(source)], cwd=work)
    (wheel,) = (work / "wheel").glob("sdtrain-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(work / "site"), str(wheel)], cwd=work)
    return work / "site"


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts}


def test_wheel_carries_the_example_recipes_and_datasets(installed):
    for folder in ("recipes", "datasets"):
        assert _files(installed / "trainer" / "_examples" / folder) == _files(REPO / folder), folder


def test_installed_sdtrain_finds_its_examples_from_anywhere(installed, tmp_path):
    script = textwrap.dedent(
        f"""
        from pathlib import Path

        import trainer
        from trainer.bench import run_bench
        from trainer.dreambooth_drift import main as dreambooth_drift
        from trainer.loop import train
        from trainer.toyworld.bench import _load, bench_runs

        assert Path(trainer.__file__).is_relative_to({str(installed)!r}), trainer.__file__
        out = Path.cwd() / "out"

        # sdtrain bench: its recipe and picture, and a child process that imports the installed package.
        table = run_bench(["tiny"], steps=1, resolution=64, cache=(True,), gradient_checkpointing=(False,), log=lambda _: None)
        assert "failed" not in table, table

        # The toy recipes train on `model.base: toy` with the shipped pictures.
        runs = {{run.name: run for run in bench_runs(out / "toy", overrides=("train.max_steps=1",), seeds=(42,))}}
        assert {{"sls_frog_lora (no prior)", "sls_frog_ti", "vex_triangle_ti", "sls_frog_hypernetwork + prior"}} <= set(runs), sorted(runs)
        for name in ("sls_frog_lora (no prior)", "vex_triangle_ti"):
            assert train(_load(runs[name].recipe, runs[name].overrides), show_progress=False).artifacts

        # The DreamBooth drift measurement: its recipe on the sls frog, and the tagged example's frogs and cats.
        dreambooth_drift([
            "--frog-base", "1", "--out", str(out / "drift"), "train.max_steps=1", "dreambooth.num_class_images=1",
            "dreambooth.class_sample_steps=1", "dreambooth.class_resolution=64", "data.resolution=64",
            "data.buckets.min_side=64", "data.buckets.max_side=128",
        ])
        print("ok")
        """
    )
    # Only the install on the path for `trainer`: not the checkout this test runs from.
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    assert _run([sys.executable, "-c", script], cwd=tmp_path, env=env).strip().endswith("ok")
