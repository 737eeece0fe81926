"""Every path the browser names is resolved inside the UI's root folder, or refused."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class OutsideRoot(Exception):
    """The browser asked for a path outside the root: answered with 403, never followed."""


def inside(base: Path, requested: str) -> Path:
    """``requested`` (relative, '/'-separated) under ``base``, with every symlink resolved.

    Refused: an empty or absolute path, a ``..`` part, a NUL byte, and a path that leaves ``base``
    once its symlinks are followed (a link inside the folder that points elsewhere).
    """
    base = base.resolve()
    if not requested or "\x00" in requested:
        raise OutsideRoot("an empty path")
    parts = PurePosixPath(requested.replace("\\", "/"))
    if parts.is_absolute() or Path(requested).is_absolute() or ".." in parts.parts:
        raise OutsideRoot(f"'{requested}' is not a relative path inside the folder")
    resolved = (base / parts).resolve()
    if not resolved.is_relative_to(base):
        raise OutsideRoot(f"'{requested}' leads outside the folder")
    return resolved


def relative(base: Path, path: Path) -> str:
    """How the browser names ``path``: relative to ``base``, '/'-separated."""
    return Path(path).resolve().relative_to(base.resolve()).as_posix() or "."
