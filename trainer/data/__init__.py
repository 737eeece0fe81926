"""The caption/tag data loader all trainers share: kohya folders and subsets, captions with seeded
tag shuffling and dropout, aspect-ratio buckets, each image's geometry (for SDXL's size conditioning), and the latent and
text-encoder caches.

    data = TrainingData(recipe.data, seed=..., batch_size=...)
    for sample_indices in data.epoch_batches(epoch):
        batch = data.load_batch(sample_indices, epoch)
        latents, masks = cache.latents(batch, encode)

The names below are imported from their modules when first used: the caches and the dataset import torch,
and checking a recipe's data settings (trainer.data.buckets, trainer.data.scan) must not (trainer.cli).
"""

import importlib

_MODULE_OF = {
    "Batch": "dataset", "Item": "scan", "LatentCache": "cache", "TextCache": "cache", "TrainingData": "dataset",
    "module_fingerprint": "cache", "vae_fingerprint": "cache",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'trainer.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"trainer.data.{_MODULE_OF[name]}"), name)
