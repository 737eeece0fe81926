"""The Runs page: ``sdtrain train`` as background processes, queued one after another, and every run
folder under the root read back from disk.

A run's state lives in its output folder, so a restarted UI finds everything again: ``recipe.yaml``,
``checkpoints/``, ``samples/``, the artifacts and TensorBoard's ``logs/`` (step, loss and learning
rate, as the loop logs them) are the training's own; the UI adds ``ui-job.json`` (the command, its
process id and exit status) and ``train.log`` (the process's output). The queue is
``<root>/.sdtrain-ui/queue.json``. Training runs in its own session, so closing the browser or
stopping the UI leaves it running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from trainer.atomic import write_text
from trainer.checkpoint import complete_checkpoints
from trainer.errors import UserError
from trainer.recipe import load_recipe
from trainer.run_folder import ARTIFACT_SUFFIXES
from trainer.ui.confine import OutsideRoot, inside, relative

JOB_FILE = "ui-job.json"
LOG_FILE = "train.log"
QUEUE_FILE = ".sdtrain-ui/queue.json"
# Run folders are found this many levels below the root (output/<run> is two).
SEARCH_DEPTH = 4
_LOG_TAIL = 20_000


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` is a training process still running (not a zombie, not a reused pid)."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z" and b"trainer.cli" in (proc / "cmdline").read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def read_scalars(output_dir: Path) -> dict[str, list[list[float]]]:
    """TensorBoard's scalars of a run: tag -> [[step, value, wall time], ...] by step.

    A resumed run logs the steps after its checkpoint again, in a new event file: the latest write of
    each step wins.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    number = float(tensor_util.make_ndarray(value.tensor).item()) if value.HasField("tensor") else value.simple_value
                    seen = latest.setdefault(value.tag, {})
                    if event.step not in seen or seen[event.step][1] <= event.wall_time:
                        seen[event.step] = (number, event.wall_time)
        except Exception:  # a file being written ends mid-record: read what is complete, next time the rest
            continue
    return {tag: [[step, value, wall] for step, (value, wall) in sorted(points.items())] for tag, points in latest.items()}


def _eta_seconds(loss: list[list[float]], max_steps: int) -> float | None:
    """Seconds left at the pace of the last (up to) 20 steps logged."""
    recent = loss[-21:]
    if len(recent) < 2 or recent[-1][0] >= max_steps:
        return None
    pace = (recent[-1][2] - recent[0][2]) / (recent[-1][0] - recent[0][0])
    return max(pace, 0.0) * (max_steps - recent[-1][0])


class Runs:
    """Starts, stops and lists training runs under ``root``; one runs at a time, the rest wait in the queue."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root = root.resolve()
        self.python = python
        self._lock = threading.RLock()
        self._processes: dict[str, subprocess.Popen] = {}

    # --- the queue ---------------------------------------------------------------------------------

    def queue(self) -> list[dict]:
        return _read_json(self.root / QUEUE_FILE, [])

    def _write_queue(self, entries: list[dict]) -> None:
        write_text(self.root / QUEUE_FILE, json.dumps(entries, indent=1))

    def enqueue(self, recipe: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> dict:
        """Check the recipe as ``sdtrain train`` would (the CLI's message if it cannot train) and queue it."""
        recipe_file = inside(self.root, recipe)
        loaded = load_recipe(recipe_file, overrides)
        # The run starts in the root, so a relative output.dir is read from there.
        output_dir = (self.root / loaded.output.dir).resolve()
        if not output_dir.is_relative_to(self.root):
            raise OutsideRoot(f"output.dir '{loaded.output.dir}' is outside the UI's folder {self.root}; set it to a folder inside, e.g. output/my_run")
        entry = {
            "id": uuid.uuid4().hex[:8], "recipe": relative(self.root, recipe_file), "overrides": list(overrides),
            "resume": resume, "overwrite": overwrite, "output_dir": relative(self.root, output_dir),
        }
        with self._lock:
            self._write_queue(self.queue() + [entry])
        self.advance()
        return entry

    def cancel(self, entry_id: str) -> None:
        with self._lock:
            self._write_queue([entry for entry in self.queue() if entry["id"] != entry_id])

    def running(self) -> str | None:
        """The output folder (root-relative) of the run in progress, if any."""
        for run in self._run_folders():
            job = _read_json(run / JOB_FILE, {})
            if job.get("state") == "running" and _alive(job.get("pid")):
                return relative(self.root, run)
        return None

    def advance(self) -> None:
        """Start the next queued run when none is running (called after each change and every second)."""
        with self._lock:
            entries = self.queue()
            if not entries or self.running():
                return
            self._write_queue(entries[1:])
            self._start(entries[0])

    def _start(self, entry: dict) -> None:
        output_dir = self.root / entry["output_dir"]
        output_dir.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "trainer.cli", "train", entry["recipe"], *entry["overrides"], "--quiet"]
        command += ["--resume", "latest"] if entry["resume"] else []
        command += ["--overwrite"] if entry["overwrite"] else []
        with open(output_dir / LOG_FILE, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} sdtrain {' '.join(command[3:])}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )
        job = {**entry, "pid": process.pid, "state": "running", "started": time.time(), "returncode": None}
        write_text(output_dir / JOB_FILE, json.dumps(job, indent=1))
        self._processes[entry["output_dir"]] = process
        threading.Thread(target=self._reap, args=(process, output_dir), daemon=True).start()

    def _reap(self, process: subprocess.Popen, output_dir: Path) -> None:
        returncode = process.wait()
        with self._lock:
            job = _read_json(output_dir / JOB_FILE, {})
            if job.get("pid") == process.pid:
                stopped = job.get("state") == "stopping"
                job.update(returncode=returncode, ended=time.time(), state="stopped" if stopped else ("finished" if returncode == 0 else "failed"))
                write_text(output_dir / JOB_FILE, json.dumps(job, indent=1))
        self.advance()

    def stop(self, run: str) -> None:
        """Stop a running training (its last complete checkpoint stays, for --resume latest)."""
        output_dir = inside(self.root, run)
        with self._lock:
            job = _read_json(output_dir / JOB_FILE, {})
            if job.get("state") != "running" or not _alive(job.get("pid")):
                raise UserError(f"'{run}' is not running.")
            job["state"] = "stopping"
            write_text(output_dir / JOB_FILE, json.dumps(job, indent=1))
            os.killpg(job["pid"], signal.SIGTERM)

    def resume(self, run: str, max_steps: int | None = None) -> dict:
        """Queue ``sdtrain train <recipe> --resume latest`` for a run, optionally to a new train.max_steps."""
        output_dir = inside(self.root, run)
        job = _read_json(output_dir / JOB_FILE, {})
        if not complete_checkpoints(output_dir):
            raise UserError(f"'{run}' has no complete checkpoint to resume from; start it again instead.")
        # The command that started it; a run started outside the UI is resumed from the recipe it recorded.
        recipe, overrides = (job["recipe"], job["overrides"]) if job.get("recipe") else (relative(self.root, output_dir / "recipe.yaml"), [])
        overrides = [o for o in overrides if not o.startswith("train.max_steps=")] + ([f"train.max_steps={max_steps}"] if max_steps else [])
        return self.enqueue(recipe, overrides, resume=True)

    # --- reading runs back -------------------------------------------------------------------------

    def _run_folders(self) -> list[Path]:
        found = []
        for folder, subfolders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            subfolders[:] = [name for name in subfolders if not name.startswith(".") and depth < SEARCH_DEPTH and name not in ("checkpoints", "logs", "samples")]
            if JOB_FILE in files or ("recipe.yaml" in files and {"checkpoints", "logs"} & set(subfolders)):
                found.append(Path(folder))
        return sorted(found)

    def _state(self, output_dir: Path, job: dict, artifacts: list[str]) -> str:
        state = job.get("state")
        if state in ("running", "stopping"):
            if _alive(job.get("pid")):
                return state
            # The UI was not there when it ended: the folder tells.
            return "finished" if artifacts else "interrupted"
        return state or ("finished" if artifacts else "interrupted")

    def summary(self, output_dir: Path) -> dict:
        job = _read_json(output_dir / JOB_FILE, {})
        recorded = _read_yaml_mapping(output_dir / "recipe.yaml")
        artifacts = sorted(
            relative(self.root, path) for path in output_dir.iterdir()
            if (path.is_file() and path.suffix in ARTIFACT_SUFFIXES) or (path.is_dir() and path.name.endswith("_diffusers"))
        )
        checkpoints = complete_checkpoints(output_dir)
        return {
            "run": relative(self.root, output_dir),
            "state": self._state(output_dir, job, artifacts),
            "method": recorded.get("method", ""),
            "max_steps": (recorded.get("train") or {}).get("max_steps"),
            "checkpoint_step": checkpoints[-1][0] if checkpoints else None,
            "artifacts": artifacts,
            "returncode": job.get("returncode"),
        }

    def list(self) -> dict:
        return {"runs": [self.summary(folder) for folder in self._run_folders()], "queue": self.queue()}

    def detail(self, run: str) -> dict:
        """Everything the Runs page shows of one run."""
        output_dir = inside(self.root, run)
        if not output_dir.is_dir():
            raise UserError(f"'{run}' is not a run folder.")
        summary = self.summary(output_dir)
        scalars = read_scalars(output_dir) if (output_dir / "logs").is_dir() else {}
        loss = scalars.get("loss", [])
        samples = sorted((output_dir / "samples").glob("*.png")) if (output_dir / "samples").is_dir() else []
        evaluations = sorted(path for path in output_dir.rglob("concept_eval/*") if path.suffix in (".md", ".png", ".json"))
        log = output_dir / LOG_FILE
        return {
            **summary,
            "step": int(loss[-1][0]) if loss else summary["checkpoint_step"],
            "loss": [[step, value] for step, value, _ in loss],
            "lr": [[step, value] for step, value, _ in scalars.get("lr", [])],
            "eta_seconds": _eta_seconds(loss, summary["max_steps"] or 0) if summary["state"] == "running" else None,
            "samples": [relative(self.root, path) for path in samples],
            "evaluations": [relative(self.root, path) for path in evaluations],
            "log": log.read_bytes()[-_LOG_TAIL:].decode("utf-8", "replace") if log.is_file() else "",
        }


def _read_yaml_mapping(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
