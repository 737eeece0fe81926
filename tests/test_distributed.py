"""Two processes train what one does: `sdtrain train --processes 2` on CPU (gloo) against one process with
the same global batch, for LoRA, Textual Inversion and DreamBooth; a killed two-process run resumes to
the bit; a resume with another process count continues when the global batch is unchanged and is
refused when it is not (docs/distributed.md).

Every run is a real `sdtrain` command (the two-process ones start torch's launcher), with one CPU
thread per process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, fast_overrides
from tests.tolerances import FP32, Rounding, assert_close_in_norm, layer_rounding, relative_error
from trainer.checkpoint import checkpoint_dir
from trainer.models.loading import load_base_model

STEPS = 3
RUN_TIMEOUT_S = 600
# The samples a global batch holds: 2 processes x batch 1 against 1 process x batch 2.
GLOBAL_BATCH = 2

RECIPES = {
    "lora": ("sls_frog_lora.yaml", {"lora.text_encoder": True}),
    "textual_inversion": ("sls_frog_ti.yaml", {}),
    "dreambooth": (
        "sls_frog_dreambooth.yaml",
        # The text encoder trains for 2 of the 3 steps: the last one must leave it untouched on every process.
        {"dreambooth.num_class_images": 2, "dreambooth.class_sample_steps": 2, "dreambooth.class_batch_size": 2, "dreambooth.ema": False,
         "dreambooth.text_encoder_steps": 2},
    ),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _command(method: str, out: Path, processes: int, *args: str, **extra) -> list[str]:
    recipe, values = RECIPES[method]
    # adam_epsilon 1, far above every |gradient| here: AdamW's step lr * m / (sqrt(v) + eps) then moves
    # with the gradient by at most lr per unit, so rounding differences of the gradients are not blown up
    # the way sqrt(v) in the denominator blows up those of gradients near zero at the usual 1e-8.
    values = {
        **values, "train.max_steps": STEPS, "train.save_every_steps": 1, "train.keep_checkpoints": 0, "train.adam_epsilon": 1.0,
        "train.lr": 0.05, "train.batch_size": GLOBAL_BATCH // processes, **extra,
    }
    if method == "dreambooth":
        values["dreambooth.class_dir"] = str(out.parent / "class_images")
    return [
        sys.executable, "-m", "trainer.cli", "train", str(REPO / "recipes" / recipe), *fast_overrides(out, **values),
        "--quiet", f"--processes={processes}", *args,
    ]


def _train(method: str, out: Path, processes: int, *args: str, **extra) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(method, out, processes, *args, **extra), env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _tensors(out: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(out, step) / f"{name}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per method: (one process x batch 2, two processes x batch 1), sharing the class images."""
    made = {}
    for method in RECIPES:
        root = tmp_path_factory.mktemp(f"distributed-{method}")
        one, two = root / "one", root / "two"
        _train(method, one, 1)
        _train(method, two, 2)
        made[method] = (one, two)
    return made


def _gradient_rounding() -> Rounding:
    """Both runs compute the global batch's gradient: one as a batch of 2, the other as two batches of 1
    summed by the all-reduce, so only the order of float sums differs. Forward and backward through the
    whole model bound the chain (what trains sits anywhere in it); a weight gradient also sums over the
    batch and the positions: 2 x 77 tokens for the text encoder, 2 x 64 latent pixels at 64 px."""
    model = load_base_model("tiny")
    return layer_rounding(model.unet, *model.text_encoder_modules().values(), passes=2, sums=GLOBAL_BATCH * 77)


def _flat(tensors: dict[str, torch.Tensor], suffix: str = "") -> torch.Tensor:
    return torch.cat([tensors[key].double().flatten() for key in sorted(tensors) if key.endswith(suffix)])


@pytest.mark.parametrize("method", list(RECIPES))
def test_two_processes_compute_the_one_process_gradient(runs, method):
    """AdamW's first moment after step 1 is (1 - beta1) x the gradient: the summed gradient of the global batch."""
    one, two = runs[method]
    first, second = _tensors(one, 1, "optimizer"), _tensors(two, 1, "optimizer")
    assert sorted(first) == sorted(second)
    expected, actual = _flat(first, ".exp_avg"), _flat(second, ".exp_avg")
    assert expected.norm() > 0
    # Bound ~1e-4 (printed on failure); an unsynchronised gradient (each process its own sample's, or half
    # the sum) differs by 0.3-1 of the norm.
    assert_close_in_norm(actual, expected, _gradient_rounding(), what=f"{method}: the step-1 gradient of 2 processes")


def _assert_same_training(one: Path, two: Path, steps: int, what: str) -> None:
    """The weights ``two`` trained in ``steps`` steps are ``one``'s up to float rounding."""
    start, expected, actual = _tensors(one, 1, "trainable"), _tensors(one, steps, "trainable"), _tensors(two, steps, "trainable")
    # Compared in norm: what the steps after step 1 moved the weights by, measured from one process's step-1
    # weights (the two runs' step-1 weights differ only by step 1's rounding, counted below).
    change_one = _flat(expected) - _flat(start)
    change_two = _flat(actual) - _flat(start)
    assert change_one.norm() > 0
    # Each of the updates carries the gradient's rounding (AdamW with eps 1 moves with it by at most lr per
    # unit, see _command); the next gradients see weights that differ by that much, which the model's
    # forward and backward pass on without amplifying beyond the depth counted: safety = steps. Adding an
    # update of |u| to a weight of |w| rounds relative to |w|: `steps` more roundings of ||w||,
    # FP32 x sqrt(steps) x ||w||, far below the first term at these step sizes.
    gradient = _gradient_rounding()
    bound = Rounding(gradient.unit, gradient.terms, gradient.depth, safety=steps)
    weights = _flat(expected).norm().item()
    assert relative_error(change_two, change_one) <= bound.bound + 2 * FP32 * steps**0.5 * weights / change_one.norm().item(), (
        f"{what}: the weights 2 processes trained differ from one process's by "
        f"{relative_error(change_two, change_one):.3g} of the change, bound {bound}"
    )


@pytest.mark.parametrize("method", list(RECIPES))
def test_two_processes_train_the_one_process_weights(runs, method):
    one, two = runs[method]
    _assert_same_training(one, two, STEPS, method)


def _final_trainable(out: Path) -> dict[str, torch.Tensor]:
    return _tensors(out, STEPS + 3, "trainable")


def test_killed_two_process_run_resumes_to_the_bit(tmp_path):
    """SIGKILL the whole two-process run once its first checkpoint exists; --resume latest finishes it with
    exactly the weights of the uninterrupted two-process run (same process count, same threads)."""
    steps = STEPS + 3
    uninterrupted = tmp_path / "uninterrupted"
    _train("lora", uninterrupted, 2, **{"train.max_steps": steps})
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        _command("lora", killed, 2, **{"train.max_steps": steps}), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (checkpoint_dir(killed, 2) / "state.json").exists():
        assert child.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (killed / "sls_frog.safetensors").exists()
    _train("lora", killed, 2, "--resume", "latest", **{"train.max_steps": steps})
    expected, actual = _final_trainable(uninterrupted), _final_trainable(killed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_resume_with_other_process_count_keeps_or_refuses_the_global_batch(runs, tmp_path):
    _, two = runs["lora"]
    continued = tmp_path / "continued"
    subprocess.run(["cp", "-r", str(two), str(continued)], check=True)
    # One process x batch 1 would cut the data into other batches: refused before anything loads.
    refused = subprocess.run(
        _command("lora", continued, 1, "--resume", "latest", **{"train.max_steps": STEPS + 1, "train.batch_size": 1}),
        env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert refused.returncode == 2
    assert "the global batch (2 process(es) x train.batch_size 1 -> 1 x 1: 2 -> 1 samples; resume with train.batch_size=2)" in refused.stderr
    assert not checkpoint_dir(continued, STEPS + 1).exists()
    # One process x batch 2 continues it: the same global batches.
    done = _train("lora", continued, 1, "--resume", "latest", **{"train.max_steps": STEPS + 1})
    assert "2 process(es) x train.batch_size 1 -> 1 x 2" in done.stdout + done.stderr
    assert (checkpoint_dir(continued, STEPS + 1) / "state.json").exists()


def test_sharded_optimizer_trains_the_unsharded_weights_and_resumes_unsharded(runs):
    """train.shard_optimizer (ZeRO stage 1): each process updates its share of the UNet with the same
    elementwise AdamW on the same summed gradients, so the weights are the unsharded run's to the bit; the
    checkpoint holds the whole optimizer state, so a resume without sharding continues it exactly."""
    _, two = runs["dreambooth"]
    sharded = two.parent / "sharded"
    _train("dreambooth", sharded, 2, **{"train.shard_optimizer": True})
    for name in ("trainable", "optimizer"):
        expected, actual = _tensors(two, STEPS, name), _tensors(sharded, STEPS, name)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected), name
    unsharded = two.parent / "resumed-unsharded"
    subprocess.run(["cp", "-r", str(sharded), str(unsharded)], check=True)
    for step in range(2, STEPS + 1):
        subprocess.run(["rm", "-r", str(checkpoint_dir(unsharded, step))], check=True)
    # As a kill after the step-1 checkpoint leaves it: no later checkpoints, no artifacts yet.
    (unsharded / "sls_frog.safetensors").unlink()
    subprocess.run(["rm", "-r", str(unsharded / "sls_frog_diffusers")], check=True)
    _train("dreambooth", unsharded, 2, "--resume", "latest")
    expected, actual = _tensors(two, STEPS, "trainable"), _tensors(unsharded, STEPS, "trainable")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_frozen_part_stays_put_on_every_process(runs):
    """After dreambooth.text_encoder_steps the text encoder gets no gradient on any process: the optimizer must
    skip it (no weight decay, no momentum step) as it does with one process, not update it with a zero sum."""
    for run in runs["dreambooth"]:
        before, after = _tensors(run, 2, "trainable"), _tensors(run, 3, "trainable")
        frozen = [key for key in before if key.startswith("text_encoder.")]
        assert frozen and all(torch.equal(before[key], after[key]) for key in frozen), run.name


SHARDED_STEPS = 4


def _short_batch_data(root: Path) -> Path:
    """Three instance images seen once per epoch: the global batches of 2 are [2, 1], so in every second
    micro-step the second process has no sample of its own."""
    folder = root / "data" / "1_sls frog"
    folder.mkdir(parents=True)
    for name in ("01.png", "01.txt", "02.png", "02.txt", "03.png", "03.txt"):
        shutil.copy(REPO / "datasets" / "sls_frog" / "10_sls frog" / name, folder / name)
    return folder.parent


def test_sharded_model_trains_the_one_process_weights_resumes_and_exports(tmp_path):
    """train.shard_model (FSDP, ZeRO stage 3): two processes each keeping half of the UNet's and the text
    encoder's weights, gradients and AdamW state train what one process with the whole batch trains, through
    short batches (the process without a sample runs a stand-in at weight 0: FSDP gathers the weights with
    every process), gradient accumulation and the text encoder's stop; the checkpoints hold the whole tensors, a killed run resumes
    to the bit, and the exported model is the trained one."""
    values = {
        "data.dir": str(_short_batch_data(tmp_path)), "dreambooth.prior_preservation": False, "train.max_steps": SHARDED_STEPS,
        # Clipping at a norm no gradient reaches: the norm over the shards is computed, the steps stay
        # unclipped, so a gradient of the wrong size shows (clipping to 1 would hide one twice as large).
        "train.gradient_checkpointing": True, "train.max_grad_norm": 1e6,
        # Two micro-steps per optimizer step: the shards' gradients add up over them.
        "train.gradient_accumulation_steps": 2,
    }
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    _train("dreambooth", one, 1, **values)
    # Samples and the validation loss run the sharded model outside the steps' rhythm (the main process
    # alone; each process on its share of the images): neither changes the trained weights.
    sharded_values = {
        **values, "train.shard_model": True, "sample.every_steps": 2, "sample.prompts": "['sls frog']", "sample.steps": 2,
        "validation.dir": values["data.dir"], "validation.every_steps": 2,
    }
    _train("dreambooth", sharded, 2, **sharded_values)
    assert len(list((sharded / "samples").iterdir())) == 2
    assert (sharded / "validation.csv").read_text().count("\n") == 1 + 2

    # The gradients are summed over the processes instead of within one batch: the same terms in another
    # order, within the gradient's rounding bound.
    first, second = _tensors(one, 1, "optimizer"), _tensors(sharded, 1, "optimizer")
    assert sorted(first) == sorted(second)
    assert_close_in_norm(_flat(second, ".exp_avg"), _flat(first, ".exp_avg"), _gradient_rounding(), what="sharded: the step-1 gradient")
    _assert_same_training(one, sharded, SHARDED_STEPS, "sharded")
    # dreambooth.text_encoder_steps is 2: the sharded text encoder stays put after it.
    after_stop = [_tensors(sharded, step, "trainable") for step in (2, 3, 4)]
    frozen = [key for key in after_stop[0] if key.startswith("text_encoder.")]
    assert frozen and all(torch.equal(after_stop[0][key], later[key]) for later in after_stop[1:] for key in frozen)

    # The diffusers folder holds the checkpoint's final weights (in output.save_dtype).
    final = _tensors(sharded, SHARDED_STEPS, "trainable")
    for part, file in (("unet", "unet/diffusion_pytorch_model.safetensors"), ("text_encoder", "text_encoder/model.safetensors")):
        exported = load_file(sharded / "sls_frog_diffusers" / file)
        trained = {key[len(part) + 1:]: value for key, value in final.items() if key.startswith(part + ".")}
        assert trained.keys() <= exported.keys()
        assert all(torch.equal(exported[key], value.to(exported[key].dtype)) for key, value in trained.items()), part

    # A run killed after its step-1 checkpoint resumes, sharded, to the uninterrupted run's weights; and
    # unsharded (the checkpoint holds whole tensors) to them up to rounding.
    def killed_after_step_1(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(sharded, run)
        for step in range(2, SHARDED_STEPS + 1):
            shutil.rmtree(checkpoint_dir(run, step))
        (run / "sls_frog.safetensors").unlink()
        shutil.rmtree(run / "sls_frog_diffusers")
        return run

    resumed = killed_after_step_1("resumed")
    _train("dreambooth", resumed, 2, "--resume", "latest", **sharded_values)
    expected, actual = _tensors(sharded, SHARDED_STEPS, "trainable"), _tensors(resumed, SHARDED_STEPS, "trainable")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    unsharded = killed_after_step_1("resumed-unsharded")
    _train("dreambooth", unsharded, 2, "--resume", "latest", **{**sharded_values, "train.shard_model": False})
    _assert_same_training(one, unsharded, SHARDED_STEPS, "sharded, resumed unsharded")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU launch's environment")
def test_a_cpu_launch_with_more_threads_than_cores_waits_passively(monkeypatch):
    # Spinning OpenMP threads of one process take the cores the others need (docs/benchmarks.md,
    # "Threads that load images"): 2 processes of 2 threads on 2 cores ran 120x slower.
    from trainer.distributed import launcher_command

    cores = os.cpu_count() or 1
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    assert launcher_command(2, "trainer.cli", [])[1]["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own policy is kept
    assert launcher_command(2, "trainer.cli", [])[1]["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("OMP_NUM_THREADS")  # torch's launcher then gives each process one thread
    assert "OMP_WAIT_POLICY" not in launcher_command(min(2, cores), "trainer.cli", [])[1]
