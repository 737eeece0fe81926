"""Kill at any moment, for every method: a run SIGKILLed again and again, each time while it writes
something, and resumed until it finishes, ends with exactly the files of a run never interrupted.

Each run is a real child process (tests/kill_launcher.py) that kills itself at one of the toolkit's
own writes: a class image, a latent-cache entry, a sample image, a checkpoint, the deletion of an old
checkpoint, an export. After every kill the output folder must be one the user can continue from:
``--resume latest`` finds the newest complete checkpoint, and before the first checkpoint (no
checkpoint, no artifact) a plain re-run starts it again.

The runs are small (64 px, 6 steps), and all of them, the uninterrupted one included, are forked from one
launcher process that imported torch once, so a kill costs a second or two of CPU instead of the ~6 s of
imports a fresh process pays, and every run uses the same number of CPU threads (bit-identity on CPU needs that: float sums are split by thread).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from trainer.checkpoint import latest_complete, resolve_checkpoint

KILL_LAUNCHER = Path(__file__).with_name("kill_launcher.py")
# Only against a hang (a forked child stuck on a lock): a run here takes seconds.
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Case:
    """A method's run: its recipe, overrides, and its artifacts in the order it writes them."""

    recipe: str
    artifacts: tuple[str, ...]
    overrides: dict = field(default_factory=dict)
    class_images: bool = False


# Every run: 6 steps, checkpoints at 2, 4, 6 (only the newest kept: each one deletes the one before),
# samples at 3 and 6, latents cached on disk.
COMMON = {
    "train.max_steps": 6,
    "train.save_every_steps": 2,
    "train.keep_checkpoints": 1,
    "sample.every_steps": 3,
    "sample.prompts": "[sls frog]",
    "sample.steps": 2,
    "data.cache_latents": "disk",
}

CASES = {
    # Tag shuffling and dropout, flips, caption dropout, LoRA dropout, gradient accumulation and a
    # cosine schedule: every source of randomness a resume must restore.
    "lora": Case(
        "tags_finetune_lora.yaml",
        ("tagged_lora.safetensors", "tagged_lora_diffusers"),
        {"data.dir": str(REPO / "datasets" / "tagged_example"), "lora.dropout": 0.1, "lora.rank": 4, "lora.feed_forward": False, "train.lr_scheduler": "cosine"},
    ),
    "loha": Case("lycoris_loha.yaml", ("sls_frog_loha.safetensors",), {"lycoris.preset": "attn-mlp"}),
    "textual_inversion": Case("sls_frog_ti.yaml", ("sls_frog.safetensors", "sls_frog.pt", "sls_frog_diffusers"), {"output.formats": "[a1111,a1111_pt,diffusers]"}),
    "hypernetwork": Case("sls_frog_hypernetwork.yaml", ("sls_frog.pt", "sls_frog.safetensors")),
    "dreambooth": Case(
        "sls_frog_dreambooth.yaml",
        ("sls_frog.safetensors", "sls_frog_diffusers"),
        {
            "dreambooth.num_class_images": 3,
            "dreambooth.class_sample_steps": 2,
            "dreambooth.class_batch_size": 1,
            "dreambooth.text_encoder_steps": 3,
            "dreambooth.ema": True,
        },
        class_images=True,
    ),
}


@dataclass(frozen=True)
class Kill:
    """Kill the run at the ``n``-th write matching ``point`` (see tests/kill_launcher.py); afterwards
    the newest complete checkpoint must be ``latest_step`` (None: no checkpoint yet)."""

    point: str
    latest_step: int | None
    n: int = 1


def _kills(case: Case, out: Path, class_dir: Path) -> list[Kill]:
    """The moments one run is killed at, in the order the resumed runs reach them."""
    kills = [Kill(f"before-replace:{class_dir}/class_00001.png", None)] if case.class_images else []
    return kills + [
        Kill(f"midway-replace:{out}/latent_cache/*", None, n=2),
        Kill(f"after-replace:{out}/samples/step-00000003-00.png", 2),
        Kill(f"midway-replace:{out}/checkpoints/step-00000004", 2),
        # Rotation renames the old checkpoint to a hidden name, then deletes it.
        Kill(f"midway-rmtree:{out}/checkpoints/.step-00000002.*.deleting", 4),
        Kill(f"midway-replace:{out}/{case.artifacts[-1]}*", 6),
    ]


class Launcher:
    """tests/kill_launcher.py --serve: one process that imports torch once and forks every run."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(KILL_LAUNCHER), "--serve"],
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: on a hang, the launcher and its child go together
        )

    def run(self, argv: list[str], log: Path, point: str = "none", n: int = 1) -> int:
        """Run ``sdtrain argv`` to its end or to its kill point; its exit status as subprocess gives it."""
        self.process.stdin.write(json.dumps({"point": point, "n": n, "argv": argv, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], RUN_TIMEOUT_S)
        if not ready:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"sdtrain {' '.join(argv)} did not end in {RUN_TIMEOUT_S} s; its output is in {log}")
        answer = self.process.stdout.readline()
        assert answer, f"the kill launcher died; see pytest's captured stderr and {log}"
        return json.loads(answer)["status"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def launcher():
    server = Launcher()
    yield server
    server.close()


def _argv(case: Case, out: Path, class_dir: Path) -> list[str]:
    extra = {**COMMON, **case.overrides}
    if case.class_images:
        extra["dreambooth.class_dir"] = str(class_dir)
    return ["train", str(REPO / "recipes" / case.recipe), *fast_overrides(out, **extra), "--quiet"]


def _visible_files(root: Path) -> list[Path]:
    """What a user sees: every file, relative to ``root``, outside hidden (temporary) names."""
    return sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    flat = {}

    def walk(value, key):
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{key}/{index}")

    walk(torch.load(path, map_location="cpu", weights_only=True), "")
    return flat


def _assert_same_files(resumed: Path, uninterrupted: Path) -> None:
    """The same files; tensors and images bit-identical (metadata holds dates and paths, so it may differ)."""
    files = _visible_files(uninterrupted)
    assert _visible_files(resumed) == files
    compared = 0
    for name in files:
        if name.suffix in (".safetensors", ".pt"):
            expected, actual = _tensors(uninterrupted / name), _tensors(resumed / name)
            assert actual.keys() == expected.keys(), name
            for key, tensor in expected.items():
                assert torch.equal(actual[key], tensor), f"{name}: {key}"
            compared += 1
        elif name.suffix == ".png":
            with Image.open(uninterrupted / name) as expected, Image.open(resumed / name) as actual:
                assert np.array_equal(np.asarray(actual), np.asarray(expected)), name
            compared += 1
    assert compared > 0


def _kill_and_continue(launcher, case: Case, out: Path, class_dir: Path, kills: list[Kill], logs: Path) -> Path:
    """Run ``case`` into ``out``, killed at each of ``kills`` in turn and continued as a user would, then once
    more to its end; the log of that last run, whose exit status must be 0."""
    logs.mkdir(exist_ok=True)
    argv = _argv(case, out, class_dir)
    resume: list[str] = []
    for number, kill in enumerate(kills):
        log = logs / f"{number}.log"
        status = launcher.run(argv + resume, log, kill.point, kill.n)
        assert status == -signal.SIGKILL, f"run {number} ({' '.join(resume) or 'fresh'}) was to be killed at {kill.point} but ended with status {status}:\n{log.read_text()}"
        if kill.latest_step is None:
            # No checkpoint and no artifact yet: the user starts the run again, and that must work (a guard
            # against running into another run's folder must let this folder through).
            assert latest_complete(out) is None
            assert not any((out / name).exists() for name in case.artifacts)
            resume = []
        else:
            # What `--resume latest` picks: the newest checkpoint completely written.
            assert resolve_checkpoint(out, "latest").name == f"step-{kill.latest_step:08d}", kill.point
            resume = ["--resume", "latest"]
    log = logs / "last.log"
    status = launcher.run(argv + resume, log)
    assert status == 0, f"the run after the last kill ended with status {status}:\n{log.read_text()}"
    return log


@pytest.mark.parametrize("method", list(CASES))
def test_run_killed_at_every_kind_of_write_ends_as_if_never_killed(method, launcher, tmp_path):
    case = CASES[method]
    logs = tmp_path / "logs"
    logs.mkdir()
    reference_out, reference_class_dir = tmp_path / "uninterrupted", tmp_path / "uninterrupted_class_images"
    assert launcher.run(_argv(case, reference_out, reference_class_dir), logs / "uninterrupted.log") == 0, (logs / "uninterrupted.log").read_text()

    out, class_dir = tmp_path / "killed", tmp_path / "class_images"
    _kill_and_continue(launcher, case, out, class_dir, _kills(case, out, class_dir), logs)
    assert all((out / name).exists() for name in case.artifacts)
    _assert_same_files(out, reference_out)
    if case.class_images:
        _assert_same_files(class_dir, reference_class_dir)


# --- Writes that once went wrong when killed -----------------------------------------------------------

SMALL_LORA = Case("sls_frog_lora.yaml", ("sls_frog.safetensors",), {"train.max_steps": 4})


def test_samples_due_at_a_checkpoint_survive_a_kill_between_the_two(launcher, tmp_path):
    """A resumed run never draws the samples of the step it resumes at: they are drawn before that step's checkpoint."""
    case = replace(SMALL_LORA, overrides={**SMALL_LORA.overrides, "sample.every_steps": 2})
    out = tmp_path / "out"
    _kill_and_continue(launcher, case, out, tmp_path, [Kill(f"after-replace:{out}/checkpoints/step-00000002", 2)], tmp_path / "logs")
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-00000002-00.png", "step-00000004-00.png"]


def test_a_run_resumed_at_its_last_checkpoint_does_not_rewrite_it(launcher, tmp_path):
    """Killed while exporting, the run resumes at its final checkpoint and only exports: rewriting that checkpoint
    would open a window in which a second kill leaves it damaged."""
    out = tmp_path / "out"
    argv = _argv(SMALL_LORA, out, tmp_path)
    assert launcher.run(argv, tmp_path / "killed.log", f"midway-replace:{out}/sls_frog.safetensors", 1) == -signal.SIGKILL
    final = out / "checkpoints" / "step-00000004"
    before = {path.name: path.stat().st_ino for path in final.iterdir()}
    assert launcher.run(argv + ["--resume", "latest"], tmp_path / "resumed.log") == 0
    assert {path.name: path.stat().st_ino for path in final.iterdir()} == before
    assert "Nothing left to train" in (tmp_path / "resumed.log").read_text() and (out / "sls_frog.safetensors").is_file()


def test_killed_writes_and_deletions_leave_nothing_behind_once_the_run_ends(launcher, tmp_path):
    """Temporaries of killed writes and checkpoints whose deletion was killed are swept: for DreamBooth each is a whole model."""
    out = tmp_path / "out"
    kills = [
        Kill(f"midway-replace:{out}/checkpoints/step-00000002", None),
        # Saving step 4 deletes step 2.
        Kill(f"midway-rmtree-reversed:{out}/checkpoints/.step-00000002.*.deleting", 4),
        Kill(f"midway-replace:{out}/sls_frog.safetensors", 4),
    ]
    _kill_and_continue(launcher, SMALL_LORA, out, tmp_path, kills, tmp_path / "logs")
    assert sorted(str(path.relative_to(out)) for path in out.rglob(".*")) == []
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-00000004"]


def test_a_checkpoint_missing_a_file_is_named_with_the_fix(tmp_path):
    from trainer.checkpoint import load_checkpoint
    from trainer.errors import UserError

    folder = tmp_path / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(UserError, match=r"step-00000002' is incomplete: trainable.safetensors, optimizer.safetensors, rng.safetensors missing"):
        load_checkpoint(folder)
