"""Optimizers and learning-rate schedules named in ``train.*``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from trainer.errors import UserError
from trainer.recipe import OPTIMIZERS

if TYPE_CHECKING:
    from trainer.recipe import TrainConfig


def optimizer_type(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class train.optimizer names, and its options from the recipe."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        # fused: one kernel over all parameters instead of a dozen element-wise ops per tensor; on CPU it ran
        # the SD1.5 LoRA's update 3.4x faster than the default loop (docs/benchmarks.md). A run resumed from a
        # checkpoint keeps the implementation it was written with (load_state_dict restores the group flags).
        return torch.optim.AdamW, dict(lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise UserError("train.optimizer 'adamw8bit' (bitsandbytes) needs a CUDA GPU. On CPU use train.optimizer=adamw.")
        try:
            import bitsandbytes
        except ImportError as err:
            # An optional dependency (the `cuda` extra): installed, diffusers imports it into every run.
            raise UserError(
                "train.optimizer 'adamw8bit' needs bitsandbytes, which is not installed: run pip install -e \".[cuda]\" "
                "in the sdtrain folder (or pip install bitsandbytes), or use train.optimizer=adamw."
            ) from err

        return bitsandbytes.optim.AdamW8bit, dict(lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; train.lr is a multiplier on it (1.0 is the usual value).
        return Prodigy, dict(lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, dict(lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=cfg.weight_decay)
    raise UserError(f"Recipe key 'train.optimizer' is '{cfg.optimizer}'; use one of {', '.join(OPTIMIZERS)}.")


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, processes: int = 1) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``param_groups``; with train.shard_optimizer and several processes, each
    process keeping the state of its share of the parameters (ZeRO stage 1, docs/distributed.md)."""
    kind, options = optimizer_type(cfg)
    if cfg.shard_optimizer and processes > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(param_groups, optimizer_class=kind, **options)
    return kind(param_groups, **options)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
