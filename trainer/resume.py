"""Which recipe changes a resume can continue with, and what each does to the result.

A checkpoint records the recipe it was trained with (``state.json`` "recipe"). Before the model is
loaded, :func:`check_resume` compares it with the current recipe key by key: keys in the tables below
may change, with a warning that says whether the result still equals an uninterrupted run; every other
key refuses, all differing keys in one message. A key missing from the tables refuses (default-deny):
a new recipe key is resumable only once someone has argued here why a checkpoint survives its change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import SimpleNamespace

from omegaconf import OmegaConf

from trainer.checkpoint import Checkpoint
from trainer.errors import UserError
from trainer.methods import METHODS

# Where, how often and in which format the run writes things, how it draws samples (in a forked RNG)
# and measures the validation loss (no gradients, its own seeds): the trained weights do not depend on
# them. Gradient checkpointing recomputes activations instead of storing them (restoring the RNG for
# dropout), and a sharded optimizer updates each share with the same elementwise computation: the same
# result, less memory. A sharded model (train.shard_model) adds up the same gradient terms in another
# order: the same result up to float rounding, and a checkpoint holds whole tensors either way.
NO_EFFECT = (
    "train.save_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.gradient_checkpointing",
    "train.shard_optimizer",
    "train.shard_model",
    "sample.*",
    "hypernetwork.sample_strength",
    "output.*",
    "data.cache_dir",
    "model.allow_unsafe_pickle",
    "validation.every_steps",
    "validation.timesteps",
    "validation.keep_best",
    "validation.dir",
)

# Values the optimizer reads at every step; the checkpoint's optimizer state stays valid with new
# ones (``Checkpoint.restore`` applies them). The steps after the checkpoint use them, the steps
# before did not, so the result differs from an uninterrupted run with either value.
NEXT_STEPS = (
    "train.lr",
    "{method}.text_encoder_lr",
    "train.weight_decay",
    "train.max_grad_norm",
)

# The length of the run and the learning-rate schedule's warmup. Whether the steps already done had
# the learning rate the new values give them depends on the schedule (a constant one does not depend
# on max_steps), so :func:`_schedule_note` computes it.
SCHEDULE = (
    "train.max_steps",
    "train.lr_warmup_steps",
)

# What the run trains on (validation.split and its seed choose which images it holds out). The data
# fingerprint (images, captions, buckets, caption settings) decides:
# a key change that leaves it unchanged (e.g. data.dir after moving the folder) changes nothing, one
# that changes it needs --allow-data-change, since the run then continues on other data.
# data.cache_latents is judged by itself in :func:`_cache_note`.
DATA = ("data.*", "validation.split", "validation.seed")

# Data keys the fingerprint does not see but the trained model does: how captions become text-encoder
# input. They refuse like any other key.
CONDITIONING = ("data.max_token_length",)

# Everything else refuses: the method, model.* (the base the trained tensors belong to), the method's
# own section (tensor shapes, the algorithm), the optimizer and its betas, the schedule's type, batch
# size, gradient accumulation, seed, mixed precision, noise offset, min-SNR weighting. Sections of
# other methods are not read by this run and are not compared.


@dataclass
class ResumeCheck:
    """The outcome of a permitted resume: warnings to print, and whether the data changed (None: the
    checkpoint predates the recorded source fingerprint, so the loop decides after preparing the data)."""

    warnings: list[str] = field(default_factory=list)
    data_changed: bool | None = None


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists stay whole values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...], method: str) -> bool:
    return any(fnmatchcase(key, pattern.format(method=method)) for pattern in patterns)


def _show(value) -> str:
    return json.dumps(value)


def changed_keys(recorded: dict, current: dict) -> dict[str, tuple]:
    """``key: (old, new)`` for every key whose value differs, other methods' sections left out.

    A key the checkpoint's recipe lacks (added to sdtrain since) counts as its default then.
    """
    from trainer.recipe import Recipe

    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Recipe)))
    old, new = flatten(recorded), flatten(current)
    others = tuple(f"{name}." for name in METHODS if name != current["method"])
    return {
        key: (old.get(key, defaults.get(key)), value)
        for key, value in new.items()
        if not key.startswith(others) and old.get(key, defaults.get(key)) != value
    }


def _lr_factors(train: dict, steps: int) -> list[float]:
    """The schedule's learning-rate factor of optimizer steps 1..``steps`` for these train settings."""
    import torch

    from trainer.optim import build_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, SimpleNamespace(**train))
    return [scheduler.lr_lambdas[0](step) for step in range(steps)]


def _schedule_note(old_train: dict, new_train: dict, step: int) -> tuple[str, bool]:
    """What the new max_steps/warmup do to steps 1..``step``, and whether those are unchanged."""
    if _lr_factors(old_train, step) == _lr_factors(new_train, step):
        return f"steps 1-{step} had the same learning rate under the new schedule", True
    return f"steps 1-{step} followed the old {old_train['lr_scheduler']} schedule, the rest follow the new one", False


def _cache_note(old: str, new: str, step: int) -> tuple[str, bool]:
    # Cached latents are the VAE's mean; uncached ones are drawn from its distribution every step.
    if old == "none":
        return f"from step {step + 1} on the latents are the VAE's mean instead of a sample", False
    if new == "none":
        return f"from step {step + 1} on the latents are sampled instead of the VAE's mean", False
    return "memory and disk caches hold the same latents", True


def _text_cache_note(old: str, new: str, step: int) -> tuple[str, bool]:
    # Cached outputs are encoded one caption at a time, uncached ones with their batch: float rounding apart.
    if "none" in (old, new):
        return f"from step {step + 1} on the text encoders' outputs are computed {'per caption' if old == 'none' else 'per batch'}: the same up to float rounding", False
    return "memory and disk caches hold the same outputs", True


def _global_batch_note(checkpoint: Checkpoint, current: dict, processes: int) -> tuple[str | None, str | None]:
    """(refusal, note) for the process count and train.batch_size together: the data position counts
    global batches of processes x batch_size samples, and every random draw is seeded per sample, so
    the run continues exactly when that product is unchanged (docs/distributed.md)."""
    old_batch, new_batch = checkpoint.state["recipe"]["train"]["batch_size"], current["train"]["batch_size"]
    old_global, new_global = checkpoint.processes * old_batch, processes * new_batch
    if (checkpoint.processes, old_batch) == (processes, new_batch):
        return None, None
    if checkpoint.processes == processes:
        return f"train.batch_size: {old_batch} -> {new_batch}", None
    described = f"{checkpoint.processes} process(es) x train.batch_size {old_batch} -> {processes} x {new_batch}"
    if old_global != new_global:
        fix = f"train.batch_size={old_global // processes}" if old_global % processes == 0 else f"{checkpoint.processes} process(es)"
        return f"the global batch ({described}: {old_global} -> {new_global} samples; resume with {fix})", None
    return None, f"{described} (the same {old_global}-sample batches and per-sample draws: equal up to float rounding; module dropout draws differ)"


def check_resume(checkpoint: Checkpoint, current: dict, source_fingerprint: str, allow_data_change: bool, processes: int = 1) -> ResumeCheck:
    """Refuse a resume with recipe changes the checkpoint cannot continue with; describe the others.

    ``current`` is the recipe as a dict, ``source_fingerprint`` the fingerprint of the data as the
    recipe reads it, before the method adds to it (compared with the checkpoint's when it has one);
    ``processes`` the number of processes of this run.
    """
    state, method, step = checkpoint.state, current["method"], checkpoint.progress.step
    changes = changed_keys(state["recipe"], current)
    changes.pop("train.batch_size", None)  # judged with the process count
    global_refusal, global_note = _global_batch_note(checkpoint, current, processes)
    recorded_source = state.get("data_source_fingerprint")
    data_changed = None if recorded_source is None else recorded_source != source_fingerprint
    refused, data_keys, notes = [global_refusal] if global_refusal else [], [], [global_note] if global_note else []
    same_as_uninterrupted = True
    for key, (old, new) in changes.items():
        line = f"{key}: {_show(old)} -> {_show(new)}"
        if _matches(key, NO_EFFECT, method):
            notes.append(f"{line} (does not change the trained weights)")
        elif _matches(key, NEXT_STEPS, method):
            notes.append(f"{line} (used from step {step + 1} on)")
            same_as_uninterrupted = False
        elif _matches(key, SCHEDULE, method):
            note, same = _schedule_note(state["recipe"]["train"], current["train"], step)
            same_as_uninterrupted &= same
            notes.append(f"{line} ({note})")
        elif key in ("data.cache_latents", "data.cache_text_encoder_outputs"):
            note, same = (_cache_note if key == "data.cache_latents" else _text_cache_note)(old, new, step)
            same_as_uninterrupted &= same
            notes.append(f"{line} ({note})")
        elif _matches(key, CONDITIONING, method):
            refused.append(line)
        elif _matches(key, DATA, method):
            data_keys.append(line)
        else:
            refused.append(line)
    if data_keys and data_changed is False:
        notes += [f"{line} (the images and captions read are the same)" for line in data_keys]
    elif data_keys or data_changed:
        what = "; ".join(data_keys) if data_keys else "its images or captions"
        if not allow_data_change:
            refused.append(f"the training data ({what}; continue on the changed data with --allow-data-change)")
        else:
            notes.append(f"the training data changed ({what}): steps after {step} train on the new data")
            same_as_uninterrupted = False
            data_changed = True
    if refused:
        raise UserError(
            f"Cannot resume from '{checkpoint.path}' (step {step}) with this recipe: a checkpoint cannot continue with these settings changed: "
            + "; ".join(refused)
            + ". Set them back to the checkpoint's values (its recipe is in state.json in the checkpoint folder), "
            "or train a new run in another output.dir."
        )
    result = ResumeCheck(data_changed=data_changed)
    if notes:
        ending = (
            "The result is what an uninterrupted run with the new recipe gives."
            if same_as_uninterrupted
            else "The result will differ from an uninterrupted run with either recipe."
        )
        result.warnings.append(f"resuming from step {step} with changed settings:\n  " + "\n  ".join(notes) + f"\n{ending}")
    if step > current["train"]["max_steps"]:
        result.warnings.append(
            f"the checkpoint is at step {step}, past train.max_steps={current['train']['max_steps']}: nothing is left to "
            "train; the run writes the artifacts from the checkpoint's weights."
        )
    return result
