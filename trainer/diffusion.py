"""The denoising objective shared by every method: noise, timesteps, targets, loss weighting.

Every sample's noise and timestep come from a generator seeded by (train.seed, epoch, sample), so a
run resumed at step k draws exactly the noise the uninterrupted run drew, and a sample draws the same
whichever batch or process it is trained in (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.data.seeding import seed_of


def sample_generators(seed: int, epoch: int, samples: Sequence[int], purpose: str) -> list[torch.Generator]:
    """One generator per sample, a separate stream per purpose ("noise", "latents"); CPU generators, so CPU
    and GPU runs draw the same numbers."""
    return [torch.Generator("cpu").manual_seed(seed_of(seed, epoch, sample, purpose)) for sample in samples]


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus kohya's per-channel noise offset) and uniform timesteps for ``latents``."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        # Offset noise lets the model learn very dark and very bright images (crosslabs' trick, as kohya).
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """MSE per sample, weighted by min-SNR-gamma when asked (weight min(snr, g)/snr, or /(snr+1) for v)."""
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, prediction.dim())))
    if min_snr_gamma:
        ratio = snr(scheduler, timesteps)
        weight = torch.clamp(ratio, max=min_snr_gamma)
        weight = weight / (ratio + 1) if scheduler.config.prediction_type == "v_prediction" else weight / ratio
        loss = loss * weight
    return loss


class DDPMObjective:
    """The denoising objective of the DDPM-trained families (SD1, SD2, SDXL), over their noise scheduler.

    A flow-matching family (SD3, Flux) brings its own objective with the same four calls.
    """

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler

    def sample(self, latents: torch.Tensor, generators: Sequence[torch.Generator], noise_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timestep of each row of ``latents`` from that row's generator."""
        rows = [sample_noise(latents[i:i + 1], generator, noise_offset, self.scheduler.config.num_train_timesteps) for i, generator in enumerate(generators)]
        return torch.cat([noise for noise, _ in rows]), torch.cat([timesteps for _, timesteps in rows])

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return target_for(self.scheduler, latents, noise, timesteps)

    def per_sample_loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        return per_sample_loss(prediction, target, timesteps, self.scheduler, min_snr_gamma)
