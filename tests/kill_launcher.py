"""Run ``sdtrain`` and SIGKILL it at a chosen write: the child process of the kill tests (tests/test_kill.py).

    python tests/kill_launcher.py <point> <n> -- train recipes/sls_frog_lora.yaml key=value ...

runs the command line in this process and kills the process (SIGKILL: no cleanup code, no flushing,
what an out-of-memory kill or ``kill -9`` does; not a power cut, which also loses what the OS had not yet
written to disk) at the ``n``-th call of the operation ``<point>`` names on a path its glob matches.
``<point>`` is ``<moment>:<glob>`` (the glob is matched against the whole path, as ``fnmatch`` does),
the moment one of:

- ``before-replace``  just before a file or folder is renamed into place: its content is complete
                      under the temporary name
- ``midway-replace``  the same moment, but the temporary content cut to what a kill in the middle of
                      writing it leaves: a file half its size; of a folder, the files written first
                      complete, the next one half, the rest missing
- ``after-replace``   just after the rename
- ``midway-rmtree``   in the middle of deleting a folder: the first half of its files (by name) are gone
- ``midway-rmtree-reversed``  the same, the last half of its files (by name) gone (a folder is deleted in
                      the order the file system lists it, so any part of it may go first)

``none`` as the point runs the command without a kill. The package has no test hooks: the points are
the toolkit's own calls of ``os.replace``/``os.rename`` and ``shutil.rmtree``, patched here.

``python tests/kill_launcher.py --serve`` imports torch, diffusers and the toolkit once, then reads one
JSON request per line on stdin, ``{"point": ..., "n": ..., "argv": [...], "log": path}``, runs each in a
forked child (stdout and stderr to ``log``) and answers ``{"status": s}`` per line on stdout, ``s`` as
``subprocess`` reports it (the exit status, or minus the signal). Forking skips the several seconds of
imports each run would otherwise pay, so the tests can afford many kills; the server itself computes
nothing, so no thread pool exists yet when it forks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOMENTS = {"before-replace", "midway-replace", "after-replace", "midway-rmtree", "midway-rmtree-reversed"}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.truncate(path.stat().st_size // 2)


def _cut(path: Path) -> None:
    """Leave ``path`` as a kill in the middle of writing it would: half a file, or a folder written halfway."""
    if path.is_file():
        _cut_file(path)
        return
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_mtime_ns, str(p)))
    done = len(files) // 2
    if done < len(files):
        _cut_file(files[done])
    for later in files[done + 1:]:
        later.unlink()


def install_kill_point(point: str, n: int) -> None:
    """Patch the operation ``point`` names so that its ``n``-th call on a matching path kills this process."""
    if point == "none":
        return
    moment, _, pattern = point.partition(":")
    if moment not in MOMENTS or not pattern or n < 1:
        raise SystemExit(f"kill_launcher: bad kill point {point!r} {n}; see the module docstring")
    calls = 0

    def due(path) -> bool:
        nonlocal calls
        if not fnmatch(os.fspath(path), pattern):
            return False
        calls += 1
        return calls == n

    if moment.startswith("midway-rmtree"):
        rmtree = shutil.rmtree

        def killing_rmtree(path, *args, **kwargs):
            if due(path):
                files = sorted((p for p in Path(path).rglob("*") if p.is_file()), reverse=moment.endswith("-reversed"))
                for gone in files[: max(1, len(files) // 2)]:
                    gone.unlink()
                _die()
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = killing_rmtree
        return

    def wrap(rename):
        def killing_rename(src, dst, *args, **kwargs):
            if not due(dst):
                return rename(src, dst, *args, **kwargs)
            if moment == "midway-replace":
                _cut(Path(src))
            if moment != "after-replace":
                _die()
            rename(src, dst, *args, **kwargs)
            _die()

        return killing_rename

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)


def run(point: str, n: int, argv: list[str]) -> int:
    install_kill_point(point, n)
    from trainer.cli import main

    return main(argv)


def _child(request: dict) -> None:
    """In the forked child: output to the log, run, and leave without the parent's exit handlers."""
    status = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        status = run(request["point"], request["n"], request["argv"])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001  (any crash is reported as the child's exit status)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve() -> None:
    import trainer.cli

    trainer.cli._quiet_libraries()
    # Everything a training run imports, so that the forked children start with it.
    import trainer.loop  # noqa: F401
    import trainer.methods.dreambooth.class_images  # noqa: F401
    import trainer.sampling  # noqa: F401
    from trainer.methods import METHODS, method_class

    for name in METHODS:
        method_class(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, wait_status = os.waitpid(pid, 0)
        status = -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)
        print(json.dumps({"status": status}), flush=True)


def main() -> None:
    sys.path.insert(0, str(REPO))
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    sys.exit(run(sys.argv[1], int(sys.argv[2]), sys.argv[4:]))


if __name__ == "__main__":
    main()
