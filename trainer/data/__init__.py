"""The caption/tag data loader all trainers share: kohya folders and subsets, captions with seeded
tag shuffling and dropout, aspect-ratio buckets, each image's geometry (for SDXL's size conditioning), and the latent and
text-encoder caches.

    data = TrainingData(recipe.data, seed=..., batch_size=...)
    for sample_indices in data.epoch_batches(epoch):
        batch = data.load_batch(sample_indices, epoch)
        latents, masks = cache.latents(batch, encode)
"""

from trainer.data.cache import LatentCache, TextCache, module_fingerprint, vae_fingerprint
from trainer.data.dataset import Batch, TrainingData
from trainer.data.scan import Item

__all__ = ["Batch", "Item", "LatentCache", "TextCache", "TrainingData", "module_fingerprint", "vae_fingerprint"]
