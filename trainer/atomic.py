"""Write files and folders so that a crash at any moment leaves either the old or the new version.

Everything the toolkit writes that a user could lose (artifacts, checkpoints, cached latents) goes
through here: write under a temporary name in the same folder, flush to disk, then rename.

Folders come in two kinds, and the caller says which by the function it uses: :func:`new_directory`
for a destination the user named (it refuses one that holds anything), :func:`replaced_directory`
for a folder a run owns and rewrites (it swaps the new version in for the old).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trainer.errors import UserError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete what an interrupted write or replacement of ``path`` left beside it (``.{name}.*.tmp`` files,
    ``.{name}.*.partial`` and ``.{name}.*.replaced`` folders).

    Only a killed write of this same target can have made them: one run writes an output folder, and
    it is about to write ``path`` again.
    """
    path = Path(path)
    if path.parent.is_dir():
        for suffix in (".tmp", ".partial", ".replaced"):
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
                _remove(stale)


def write_file(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``path`` once it is complete and synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def _staged(path: Path, put_in_place: Callable[[Path, Path], None]) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; once filled and synced, ``put_in_place(tmp, path)``.

    Temporary folders start with ``.`` and end with ``.partial`` so readers can skip them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        put_in_place(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- new folders: the user named the destination -------------------------------------------------


def refuse_to_replace(paths: Iterable[Path | str], instead: str, *, empty_folder_is_free: bool = False) -> None:
    """One UserError naming every path of ``paths`` that exists: sdtrain never replaces what the user did
    not ask it to. ``instead`` says what to do. With ``empty_folder_is_free`` (the destination may be a
    folder the writer fills) an empty folder is not counted as taken."""
    def empty_folder(path: Path) -> bool:
        return path.is_dir() and not any(path.iterdir())

    taken = [Path(p) for p in paths if os.path.lexists(p) and not (empty_folder_is_free and empty_folder(Path(p)))]
    if taken:
        names = ", ".join(f"'{p}'" + ((" (an empty folder)" if empty_folder(p) else " (a folder that is not empty)") if p.is_dir() else "") for p in taken)
        verb = "exists" if len(taken) == 1 else "exist"
        raise UserError(f"{names} already {verb}, and sdtrain does not replace what you did not ask it to. {instead}")


def check_new_directory(path: Path) -> None:
    """Refuse a destination that exists and is not an empty folder: it holds something of the user's."""
    refuse_to_replace([path], "Choose another folder, or empty or remove that one yourself and run again.", empty_folder_is_free=True)


def _rename_into_empty(tmp: Path, path: Path) -> None:
    check_new_directory(path)
    if os.name == "nt" and path.is_dir():
        # Windows renames onto no existing folder; an empty one holds nothing to lose.
        os.rmdir(path)
    try:
        # POSIX rename replaces an empty folder and fails on anything else, so nothing written there
        # in the meantime is lost.
        os.rename(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            check_new_directory(path)
        raise


@contextlib.contextmanager
def new_directory(path: Path) -> Iterator[Path]:
    """Write a folder the user asked for by name (``sdtrain base tiny DIR``): fill the yielded temporary
    folder; it becomes ``path`` in one rename.

    ``path`` may not exist yet or be an empty folder; anything else is refused, before the work and
    again at the end, with a :class:`UserError` naming it. Nothing is ever deleted.
    """
    check_new_directory(path)
    with _staged(path, _rename_into_empty) as tmp:
        yield tmp


# --- replaced folders: a run's own output, rewritten ---------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """Linux's renameat2 from the C library (glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap what ``a`` and ``b`` name in one atomic step; False where the kernel or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path``, never leaving a moment without a complete version to find.

    With Linux's renameat2(RENAME_EXCHANGE) one step swaps them, so ``path`` names the old or the new
    version at every moment; then the old one, now under the temporary name, is deleted. Where that
    call is missing (other systems, some filesystems) the old version is renamed to a hidden
    ``.{name}.….replaced`` folder beside it, the new one renamed in, and the old one deleted: between
    those two renames the old version is found under that hidden name, and an error there puts it back.
    """
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        _remove(tmp)
        return
    aside = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.replaced"
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove(aside)


@contextlib.contextmanager
def replaced_directory(path: Path) -> Iterator[Path]:
    """Write a folder a run owns and rewrites (its checkpoints, its exported diffusers folders): fill the
    yielded temporary folder; it then replaces ``path`` as described in :func:`_swap_in`.

    Only for folders sdtrain itself named and wrote; a folder the user names goes through
    :func:`new_directory`, which never replaces anything.
    """
    with _staged(path, _swap_in) as tmp:
        yield tmp


def write_legacy_torch_file(path: Path, content: dict) -> Path:
    """A ``.pt`` in torch's legacy (pre-zip) serialisation, atomically.

    AUTOMATIC1111's pickle checker accepts only that layout for embeddings and hypernetworks, and
    ``torch.load(weights_only=True)`` still reads it.
    """
    import torch

    return write_file(path, lambda tmp: torch.save(content, tmp, _use_new_zipfile_serialization=False))
