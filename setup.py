"""Build hook: a wheel carries the example recipes and datasets (see ``trainer/examples.py``).

Everything else about the package is declared in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

EXAMPLE_FOLDERS = ("recipes", "datasets")


class BuildPyWithExamples(build_py):
    """Copies ``recipes/`` and ``datasets/`` into the built package as ``trainer/_examples/``.

    An editable install builds nothing here: it runs from the checkout, where the folders already are.
    """

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "trainer" / "_examples"
        shutil.rmtree(target, ignore_errors=True)  # a folder left by an earlier build may hold removed files
        for folder in EXAMPLE_FOLDERS:
            shutil.copytree(folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithExamples})
