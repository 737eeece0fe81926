"""The validation loss: the training loss on held-out images, comparable across steps and runs.

Each validation image is scored at a fixed grid of timesteps (``validation.timesteps`` evenly spaced
over the trained range), with noise from a generator seeded by (validation.seed, the image's content
hash, the timestep), one image and timestep per forward pass, without augmentation (no flip, no
caption shuffle or dropout; the trigger word stays) and with the trained modules in eval mode (no
adapter dropout). So the number depends only on the weights: not on the batch size, the process
count, a resume, or the training RNG. The loss is the method's own (loss type, min-SNR weighting and
the rest as in training), on plain Gaussian noise (no offset, pyramid or input perturbation).
See docs/recipes.md, "Validation loss".
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.atomic import write_text
from trainer.data.captions import process_caption
from trainer.data.dataset import Batch, TrainingData, geometry_of
from trainer.data.scan import Item
from trainer.data.seeding import seed_of, seeded_rng
from trainer.distributed import World, sum_over_processes
from trainer.methods.base import TrainingBatch

CSV_NAME = "validation.csv"
IMAGES_NAME = "validation_images.txt"


def timestep_grid(count: int, low: int, high: int) -> list[int]:
    """``count`` timesteps evenly spaced over [low, high): the centres of equal intervals."""
    width = (high - low) / count
    return [low + int((k + 0.5) * width) for k in range(count)]


@dataclass
class ValidationImage:
    item: Item
    caption: str


class Validator:
    """Scores the held-out images; keeps the table of scores (validation.csv) of the run."""

    def __init__(self, recipe, images: list[ValidationImage], timesteps: list[int], output_dir: Path):
        self.recipe = recipe
        self.images = images
        self.timesteps = timesteps
        self.path = Path(output_dir) / CSV_NAME
        self.rows: list[dict[str, float]] = []

    @classmethod
    def from_recipe(cls, recipe, data: TrainingData, num_timesteps: int, output_dir: Path) -> Validator | None:
        cfg = recipe.validation
        if not cfg.split and not cfg.dir:
            return None
        if cfg.dir:
            items = TrainingData(replace(recipe.data, dir=cfg.dir, subsets=[]), seed=0, batch_size=1).items
        else:
            items = data.validation_items
        # No augmentation: the caption as training would see it before shuffling and dropout.
        plain = replace(recipe.data, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0)
        # (No shuffle, no dropout: the generator is never drawn from.)
        images = [ValidationImage(item, process_caption(item.caption, plain, seeded_rng("validation"), item.is_reg)) for item in items]
        low, high = recipe.train.timestep_range or (0, num_timesteps)
        return cls(recipe, images, timestep_grid(cfg.timesteps, low, high), output_dir)

    def describe(self) -> str:
        return "\n".join(f"{image.item.subset}/{image.item.relative_path}" for image in self.images) + "\n"

    def measure(self, method, model, cache, encode_mean, world: World, device: torch.device, autocast) -> list[float]:
        """[mean over images and timesteps, then the mean of each timestep] at the current weights."""
        seed = self.recipe.validation.seed
        totals = [0.0] * len(self.timesteps)
        trained = list(method.trainable_modules().values())
        modes = [module.training for module in trained]
        for module in trained:
            module.eval()
        try:
            with torch.no_grad():
                for index, image in enumerate(self.images):
                    if index % world.processes != world.rank:
                        continue
                    item = image.item
                    batch = Batch([item], [index], [image.caption], [False], torch.ones(1), [TrainingData.cache_key(item, False)], item.bucket)
                    latents = cache.latents(batch, encode_mean)[0].to(device)
                    geometry = [geometry_of(item, False)]
                    for position, timestep in enumerate(self.timesteps):
                        generator = torch.Generator("cpu").manual_seed(seed_of(seed, item.content_hash, timestep))
                        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
                        timesteps = torch.full((1,), timestep, device=device)
                        with autocast():
                            loss = method.loss(TrainingBatch(latents, [image.caption], geometry, torch.ones(1), noise, timesteps, 1))
                        totals[position] += float(loss)
        finally:
            for module, mode in zip(trained, modes):
                module.train(mode)
        totals = sum_over_processes(totals, world, device)
        per_timestep = [total / len(self.images) for total in totals]
        return [sum(per_timestep) / len(per_timestep), *per_timestep]

    # --- the table ---------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return ["step", "loss", *[f"loss_t{timestep}" for timestep in self.timesteps]]

    def resume_table(self, step: int) -> None:
        """Continue the table of an interrupted run: its rows up to ``step`` (the later ones are measured again).
        A table of other timesteps (validation.timesteps changed) starts anew."""
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [{key: float(value) for key, value in row.items()} for row in reader]
            if reader.fieldnames == self.columns():
                self.rows = [row for row in rows if row["step"] <= step]

    def record(self, step: int, values: list[float]) -> dict[str, float]:
        row = dict(zip(self.columns(), [float(step), *values]))
        self.rows = [old for old in self.rows if old["step"] != step] + [row]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for old in self.rows:
            writer.writerow({key: (int(value) if key == "step" else repr(value)) for key, value in old.items()})
        write_text(self.path, text.getvalue())
        return row

    def best_step(self, steps: set[int]) -> int | None:
        """The step among ``steps`` with the lowest validation loss (the earlier one on a tie)."""
        scored = [(row["loss"], int(row["step"])) for row in self.rows if int(row["step"]) in steps]
        return min(scored)[1] if scored else None

