"""Resumable checkpoints: everything needed to continue a run so it ends with the same weights.

A checkpoint is a folder ``{output.dir}/checkpoints/step-00000010/`` holding

- ``trainable.safetensors``  the method's trained tensors
- ``optimizer.safetensors``  the optimizer's tensors; its other values are in ``state.json``
- ``rng.safetensors``        torch's CPU (and CUDA) generator states, of every process
- ``state.json``             step, data position, LR scheduler, Python/numpy RNG, recipe, process count

The main process writes it; every process reads it back and takes its own RNG states (docs/distributed.md).
No pickles: tensors go to safetensors, everything else to JSON. The folder is assembled under a
hidden temporary name and then put in place, so a crash leaves either no checkpoint or a complete
one; ``latest`` only considers complete folders named ``step-NNNNNNNN`` (never the hidden ones). A
run resumed from an earlier checkpoint rewrites the later ones as it reaches them: the new folder is
swapped in for the old (``trainer.atomic.replaced_directory``), so the step is never without one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import replaced_directory
from trainer.distributed import World, barrier, gather_objects
from trainer.errors import UserError

CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
# 2: RNG states per process ("rank{r}." tensors, state.json "rng": {"ranks": [...]}); 1 held one process's.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Optimizer values the recipe sets per parameter group that a resume may change ("initial_lr" is the
# group's learning rate before the schedule's factor).
_RECIPE_GROUP_KEYS = ("initial_lr", "weight_decay")


@dataclass
class Progress:
    """Where the run stands: optimizer steps done, and the next micro-batch in the data order."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    micro_step: int = 0


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def _split_tensors(values: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """``values`` without its tensors, which go to ``tensors`` under ``prefix`` + their key path ("/"-joined:
    8-bit AdamW keeps its quantisation state in a dict inside each parameter's state)."""
    plain = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            # Left on its device (a shard of train.shard_model is gathered from there); written from the CPU.
            tensors[f"{prefix}{key}"] = value.detach()
        elif isinstance(value, dict):
            plain[key] = _split_tensors(value, f"{prefix}{key}/", tensors)
        else:
            plain[key] = value
    return plain


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain = {str(index): _split_tensors(values, f"{index}.", tensors) for index, values in state["state"].items()}
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(i): copy.deepcopy(values) for i, values in plain["state"].items()}
    for key, value in tensors.items():
        index, _, path = key.partition(".")
        *parents, name = path.split("/")
        node = state.setdefault(int(index), {})
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _gathered_rng_state(world: World) -> tuple[dict[str, torch.Tensor], dict]:
    """Every process's RNG states (a collective: every process calls it), keyed by rank."""
    tensors, plains = {}, []
    for rank, (rank_tensors, plain) in enumerate(gather_objects(_rng_state(), world)):
        tensors.update({f"rank{rank}.{key}": value.cpu() for key, value in rank_tensors.items()})
        plains.append(plain)
    return tensors, {"ranks": plains}


def _restore_rng(tensors: dict[str, torch.Tensor], plain: dict, rank: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for ``rank`` (it was written
    by fewer processes)."""
    if "ranks" in plain:  # format 2
        if rank >= len(plain["ranks"]):
            return False
        prefix = f"rank{rank}."
        tensors = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        plain = plain["ranks"][rank]
    elif rank:  # format 1: one process
        return False
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


def save_checkpoint(
    output_dir: Path, progress: Progress, method, optimizer, lr_scheduler, recipe: dict, data_fingerprint: str, source_fingerprint: str, keep: int,
    world: World = World(), protect: int | None = None, sharding=None,
) -> Path:
    """Write a complete checkpoint atomically, then drop the oldest beyond ``keep`` (see ``_rotate``).

    Every process calls it (their RNG states are gathered); the main one writes, and the others wait
    until it has, so none runs ahead of a checkpoint it might be killed before. The checkpoint of step
    ``protect`` (validation.keep_best's) is never rotated away. With ``sharding`` (a
    trainer.sharding.ModelSharding) the sharded weights and optimizer state are gathered whole."""
    target = checkpoint_dir(output_dir, progress.step)
    rng_tensors, rng_plain = _gathered_rng_state(world)
    sharded_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    if hasattr(sharded_optimizer, "consolidate_state_dict"):
        # train.shard_optimizer: each process holds a share of the state; the main process collects it all.
        sharded_optimizer.consolidate_state_dict(to=0)
    # train.shard_model: every process takes part in gathering each sharded tensor as the main one writes it.
    gathering = sharding is not None and sharding.active
    if not (world.is_main or gathering):
        barrier(world)
        return target
    trainable = method.trainable_state_dict()
    optimizer_tensors, optimizer_plain = _flatten_optimizer(optimizer.state_dict())
    state = {
        "format": FORMAT_VERSION,
        "progress": asdict(progress),
        "method": recipe["method"],
        "recipe": recipe,
        "data_fingerprint": data_fingerprint,
        # The data as the recipe reads it, before the method adds to it: a resume compares it before
        # loading the model (trainer.resume).
        "data_source_fingerprint": source_fingerprint,
        "optimizer": optimizer_plain,
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": rng_plain,
        # The global batch is processes x train.batch_size; a resume compares it (trainer.resume).
        "processes": world.processes,
        # CPU results are bit-identical only with the same thread count (float sums split by thread).
        "cpu_threads": torch.get_num_threads(),
    }
    if world.is_main:
        sweep_leftovers(output_dir)
    with replaced_directory(target) if world.is_main else nullcontext() as tmp:
        for name, tensors in (("trainable.safetensors", trainable), ("optimizer.safetensors", optimizer_tensors)):
            if gathering:
                sharding.save_whole(tensors, tmp / name if tmp else None)
            else:
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / name)
        if world.is_main:
            save_file(rng_tensors, tmp / "rng.safetensors")
            # state.json last: its presence is what marks the folder's content complete.
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if world.is_main:
        _rotate(Path(output_dir) / "checkpoints", keep, progress.step, protect)
    barrier(world)
    return target


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = CHECKPOINT_NAME.match(child.name)
            if match and child.is_dir() and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _rotate(root: Path, keep: int, step: int, protect: int | None = None) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (0 = all), and the one of step ``protect``.

    Later ones are left alone: they are from before a resume from an earlier checkpoint, and the run
    replaces each when it reaches its step. Counting them would delete the checkpoint just written.
    """
    if keep <= 0:
        return
    for found_step, old in [found for found in _complete_checkpoints(root) if found[0] <= step][:-keep]:
        if found_step == protect:
            continue
        # Renamed to a hidden name first: a deletion killed halfway then leaves no step-… folder that
        # lacks some of its files (and that a later rotation would never see); the next save sweeps it.
        doomed = old.parent / f".{old.name}.{uuid.uuid4().hex[:8]}.deleting"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def sweep_leftovers(output_dir: Path) -> None:
    """Delete the hidden checkpoint folders an interrupted save or rotation left (one run writes an output
    folder, and it is the one starting or saving now)."""
    root = Path(output_dir) / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of the run in ``output_dir``, oldest first."""
    return _complete_checkpoints(Path(output_dir) / "checkpoints")


def latest_complete(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest complete checkpoint under ``output_dir``; anything else is a path."""
    if resume == "latest":
        latest = latest_complete(output_dir)
        if latest is None:
            raise UserError(
                f"--resume latest: no complete checkpoint under '{Path(output_dir) / 'checkpoints'}'. "
                "Check output.dir, or set train.save_every_steps so the run writes checkpoints."
            )
        return latest
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume '{resume}' is not a complete sdtrain checkpoint folder (no state.json). Pass 'latest' or a folder like checkpoints/step-00000010.")
    return path


@dataclass
class Checkpoint:
    path: Path
    state: dict

    @property
    def progress(self) -> Progress:
        return Progress(**self.state["progress"])

    @property
    def processes(self) -> int:
        return self.state.get("processes", 1)

    def restore(self, method, optimizer, lr_scheduler, world: World = World()) -> None:
        """Load the trained tensors, optimizer, schedule and this process's RNGs, keeping the recipe's
        learning rates and weight decay: loading brings back the checkpoint's, and a resume may change them
        (trainer.resume). Unchanged, they are the same values, so the resumed run stays exact."""
        recipe_values = [{key: group[key] for key in _RECIPE_GROUP_KEYS if key in group} for group in optimizer.param_groups]
        method.load_trainable_state_dict(load_file(self.path / "trainable.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(self.path / "optimizer.safetensors"), self.state["optimizer"]))
        lr_scheduler.load_state_dict(self.state["lr_scheduler"])
        if not _restore_rng(load_file(self.path / "rng.safetensors"), self.state["rng"], world.rank):
            # Only module dropout draws from the process's generator; every other draw is seeded per sample.
            print(f"note: the checkpoint has no RNG state for process {world.rank} (it was written by {self.processes}); it keeps its seeded one.")
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        for group, values in zip(optimizer.param_groups, recipe_values):
            group.update(values)
        # Every diffusers schedule is a LambdaLR: lr = base lr * factor(step), the base being the recipe's.
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"Checkpoint '{path}' cannot be read ({err}). Resume from an earlier checkpoint folder.") from None
    if state.get("format") not in READABLE_VERSIONS:
        raise UserError(f"Checkpoint '{path}' has format {state.get('format')}, this sdtrain reads formats {', '.join(map(str, READABLE_VERSIONS))}.")
    missing = [name for name in TENSOR_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(
            f"Checkpoint '{path}' is incomplete: {', '.join(missing)} missing (it was damaged outside sdtrain). "
            "Resume from an earlier checkpoint folder with --resume <folder>, or move this one away."
        )
    return Checkpoint(path, state)
