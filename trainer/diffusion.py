"""The denoising objective shared by every method: noise, timesteps, targets, loss weighting.

Every sample's noise and timestep come from a generator seeded by (train.seed, epoch, sample), so a
run resumed at step k draws exactly the noise the uninterrupted run drew, and a sample draws the same
whichever batch or process it is trained in (docs/distributed.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.data.seeding import seed_of
from trainer.errors import UserError


@dataclass(frozen=True)
class ObjectiveSettings:
    """The train.* options that shape noise, timesteps and the loss (docs/recipes.md, "Loss and noise")."""

    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    timestep_range: tuple[int, int] | None = None
    zero_terminal_snr: bool = False
    loss: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False

    @classmethod
    def from_train(cls, train) -> ObjectiveSettings:
        """From a recipe's ``train`` section."""
        names = [f.name for f in fields(cls)]
        values = {name: getattr(train, name) for name in names}
        values["timestep_range"] = tuple(train.timestep_range) if train.timestep_range is not None else None
        return cls(**values)


def sample_generators(seed: int, epoch: int, samples: Sequence[int], purpose: str) -> list[torch.Generator]:
    """One generator per sample, a separate stream per purpose ("noise", "latents"); CPU generators, so CPU
    and GPU runs draw the same numbers."""
    return [torch.Generator("cpu").manual_seed(seed_of(seed, epoch, sample, purpose)) for sample in samples]


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float, num_timesteps: int, timestep_range: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus kohya's per-channel noise offset) and uniform timesteps in ``timestep_range``
    ([min, max), default the whole schedule) for ``latents``."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        # Offset noise lets the model learn very dark and very bright images (crosslabs' trick, as kohya).
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    low, high = timestep_range or (0, num_timesteps)
    timesteps = torch.randint(low, high, (shape[0],), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid noise (kohya's multires_noise): ``iterations`` more noises at ever coarser random scales (level
    i at 1/r**i of the size, r drawn from [2, 4); level 0 at full size), upsampled and added with weight
    discount**i, then brought back to unit variance.

    kohya rescales by the standard deviation of the whole batch; here each sample by its own, so a
    sample's noise does not depend on the batch it is in."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for level in range(iterations):
        factor = (2 + 2 * torch.rand((), generator=generator).item()) ** level
        coarse_h, coarse_w = max(1, int(height / factor)), max(1, int(width / factor))
        coarse = torch.randn((batch, channels, coarse_h, coarse_w), generator=generator).to(noise.device, noise.dtype)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if coarse_h == 1 or coarse_w == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def huber_threshold(settings: ObjectiveSettings, scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """kohya's huber_c per timestep: "constant" c x scale; "exponential" c**(t/T) x scale (from 1 at t=0
    to c at t=T); "snr" (1 - c) / (1 + sigma)**2 + c with sigma = sqrt((1 - alpha_bar) / alpha_bar)
    (kohya applies no scale there either)."""
    t = timesteps.float()
    if settings.huber_schedule == "constant":
        return torch.full_like(t, settings.huber_c * settings.huber_scale)
    if settings.huber_schedule == "exponential":
        return torch.exp(math.log(settings.huber_c) * t / scheduler.config.num_train_timesteps) * settings.huber_scale
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1 - settings.huber_c) / (1 + sigmas) ** 2 + settings.huber_c


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, settings: ObjectiveSettings, threshold: torch.Tensor | None) -> torch.Tensor:
    """Each latent value's loss: squared or absolute error, or kohya's pseudo-Huber forms with threshold c
    per sample: huber 2c(sqrt(r^2 + c^2) - c) (~ r^2 for |r| << c, ~ 2c|r| beyond), smooth_l1
    2(sqrt(r^2 + c^2) - c) (~ r^2/c, then ~ 2|r|)."""
    residual = prediction.float() - target.float()
    if settings.loss == "l2":
        return residual**2
    if settings.loss == "l1":
        return residual.abs()
    c = threshold.view(-1, *[1] * (residual.dim() - 1))
    smooth = 2 * (torch.sqrt(residual**2 + c**2) - c)
    return c * smooth if settings.loss == "huber" else smooth


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    settings: ObjectiveSettings,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's loss: the mean of its elementwise loss (over the pixels its ``mask`` weights, if
    given), weighted by min-SNR-gamma (min(snr, g)/snr, or /(snr+1) for v) and debiased estimation
    (1/sqrt(snr), or 1/(snr+1) for v; snr capped at 1000 as kohya) when asked."""
    threshold = huber_threshold(settings, scheduler, timesteps) if settings.loss in ("huber", "smooth_l1") else None
    elementwise = elementwise_loss(prediction, target, settings, threshold)
    dims = list(range(1, prediction.dim()))
    if mask is None:
        loss = elementwise.mean(dim=dims)
    else:
        # The mean over the pixels that count: a half-masked image learns its half at the full rate.
        weights = mask.float().expand_as(elementwise)
        loss = (elementwise * weights).sum(dim=dims) / weights.sum(dim=dims).clamp(min=torch.finfo(torch.float32).tiny)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if settings.min_snr_gamma or settings.debiased_estimation:
        ratio = snr(scheduler, timesteps)
    if settings.min_snr_gamma:
        gamma = settings.min_snr_gamma
        if v_prediction:
            weight = torch.clamp(ratio, max=gamma) / (ratio + 1)
        else:
            # min(snr, g) / snr, written so a zero terminal SNR (snr 0 at t = T) weighs 1, its limit.
            weight = torch.where(ratio > gamma, gamma / ratio, torch.ones_like(ratio))
        loss = loss * weight
    if settings.debiased_estimation:
        capped = torch.clamp(ratio, max=1000.0)
        loss = loss * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
    return loss


class DDPMObjective:
    """The denoising objective of the DDPM-trained families (SD1, SD2, SDXL), over their noise scheduler.

    A flow-matching family (SD3, Flux) brings its own objective with the same calls.
    """

    def __init__(self, scheduler: DDPMScheduler, settings: ObjectiveSettings = ObjectiveSettings()):
        if settings.zero_terminal_snr:
            # Training only, as kohya: the betas rescaled so alpha_bar at t = T is 0 (Lin et al. 2024, as
            # diffusers' rescale_betas_zero_snr); sampling keeps the model's own schedule.
            scheduler = DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)
        self.scheduler = scheduler
        self.settings = settings
        steps = scheduler.config.num_train_timesteps
        if settings.timestep_range is not None and settings.timestep_range[1] > steps:
            raise UserError(f"Recipe key 'train.timestep_range' is {list(settings.timestep_range)}, but this model's schedule has {steps} timesteps: use a range within [0, {steps}].")
        if settings.zero_terminal_snr and settings.debiased_estimation and scheduler.config.prediction_type != "v_prediction":
            raise UserError(
                "Recipe keys 'train.zero_terminal_snr' and 'train.debiased_estimation' are both on for an epsilon-prediction model: "
                "debiased estimation weighs a sample by 1/sqrt(SNR), which is infinite at the zero terminal SNR. Turn one off, "
                "or train a v-prediction model (model.prediction_type=v_prediction)."
            )

    def sample(self, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, timesteps, input noise) of each row of ``latents`` from that row's generator: the noise is
        the target's, the input noise what the latents are noised with (the same tensor unless
        ip_noise_gamma perturbs it)."""
        settings, rows = self.settings, []
        for i, generator in enumerate(generators):
            row = latents[i:i + 1]
            noise, timesteps = sample_noise(row, generator, settings.noise_offset, self.scheduler.config.num_train_timesteps, settings.timestep_range)
            if settings.multires_noise_iterations:
                noise = multires_noise(noise, generator, settings.multires_noise_iterations, settings.multires_noise_discount)
            input_noise = noise
            if settings.ip_noise_gamma:
                # Input perturbation (Ning et al. 2023): the input is noised a little more than the target says.
                input_noise = noise + settings.ip_noise_gamma * torch.randn(row.shape, generator=generator).to(noise.device, noise.dtype)
            rows.append((noise, timesteps, input_noise))
        return tuple(torch.cat(parts) for parts in zip(*rows))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return target_for(self.scheduler, latents, noise, timesteps)

    def per_sample_loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return per_sample_loss(prediction, target, timesteps, self.scheduler, self.settings, mask)
