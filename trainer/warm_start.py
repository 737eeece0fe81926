"""What the loop does before step 1 so that every step runs at its steady pace: fill the latent and caption
caches for the coming samples, and page out the frozen parts no step will run (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from trainer.checkpoint import Progress
from trainer.models.base_model import page_out
from trainer.recipe import Recipe


def coming_samples(data, world, progress: Progress, cfg) -> tuple[list, bool]:
    """This process's samples of the coming steps, each as a batch of one, up to the end of the next whole
    epoch; and whether that is every step left in the run (else it holds at least one whole epoch)."""
    micro_steps = (cfg.max_steps - progress.step) * cfg.gradient_accumulation_steps
    epoch, index, batches = progress.epoch, progress.batch_in_epoch, data.epoch_batches(progress.epoch)
    ahead = min(micro_steps, len(batches) - index + (data.batches_per_epoch if index else 0))
    singles = []
    for _ in range(ahead):
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = data.epoch_batches(epoch)
        singles += [data.load_batch([sample], epoch) for sample in world.slice_of(batches[index], cfg.batch_size)]
        index += 1
    return singles, ahead == micro_steps


def encode_latents_ahead(singles: list, cache, encode, show_progress: bool) -> None:
    """Fill the latent cache before step 1, under a progress bar, so the first steps run at their steady
    pace. One image at a time, as the steps would (trainer.data.cache: a latent never depends on its
    batch), so training is the same with or without this."""
    wanted = {single.cache_keys[0]: single for single in singles}
    missing = [single for key, single in wanted.items() if cache.get(key) is None]
    for single in tqdm(missing, disable=not (show_progress and missing), desc="Caching latents", unit="image", dynamic_ncols=True):
        cache.latents(single, encode)


def encode_captions_ahead(singles: list, method, autocast, show_progress: bool) -> None:
    """The same for the text encoder outputs (data.cache_text_encoder_outputs), one caption at a time, in
    the autocast the steps use."""
    captions = list(dict.fromkeys(single.captions[0] for single in singles))
    with autocast():
        for caption in tqdm(captions, disable=not show_progress, desc="Caching captions", unit="caption", dynamic_ncols=True):
            method.encode_text([caption])


def page_out_unused(model, recipe: Recipe, every_latent_cached: bool, every_caption_cached: bool, validating: bool, directory: Path) -> None:
    """Out of memory, the frozen parts no step runs: the VAE decoder when no samples are drawn; once
    every latent, or caption, the run reads is cached and nothing samples or validates, the VAE encoder,
    or the text encoders. Paged out, not deleted: their values stay, so a method that ships the whole
    model exports them unchanged, and a step that did need one would read it back (base_model.page_out)."""
    vae = model.vae
    unused = []
    if not recipe.sample.prompts:
        unused += [vae.decoder, getattr(vae, "post_quant_conv", None)]
        if every_latent_cached and not validating:
            unused += [vae.encoder, getattr(vae, "quant_conv", None)]
        if every_caption_cached and not validating:
            unused += list(model.text_encoder_modules().values())
    page_out([module for module in unused if module is not None], directory)
