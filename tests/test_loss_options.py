"""The loss and noise options kohya users carry over (train.loss, huber_*, timestep_range, multires noise,
ip_noise_gamma, zero_terminal_snr, debiased_estimation): each does what it says, and a run with all of
them on resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import REPO, fast_overrides, train_and_resume
from tests.tolerances import FP32, Rounding, assert_close_elementwise
from trainer import diffusion
from trainer.diffusion import DDPMObjective, ObjectiveSettings
from trainer.errors import UserError
from trainer.loop import train
from trainer.models.tiny import sd_noise_scheduler
from trainer.recipe import load_recipe

RECIPE = REPO / "recipes" / "sls_frog_lora.yaml"


def _generators(count: int, purpose: str = "noise") -> list[torch.Generator]:
    return diffusion.sample_generators(7, 0, range(count), purpose)


def _draw(settings: ObjectiveSettings, count: int = 64, shape=(4, 16, 16)):
    objective = DDPMObjective(sd_noise_scheduler(), settings)
    return objective.sample(torch.zeros(count, *shape), _generators(count))


def test_timesteps_stay_in_the_range():
    _, timesteps, _ = _draw(ObjectiveSettings(timestep_range=(200, 300)), count=3000, shape=(1, 2, 2))
    # [min, max): 3000 uniform draws from 100 values reach both ends (a value is missed with probability
    # 0.99**3000 = 8e-14) and never leave them.
    assert int(timesteps.min()) == 200 and int(timesteps.max()) == 299
    with pytest.raises(UserError, match="train.timestep_range"):
        DDPMObjective(sd_noise_scheduler(), ObjectiveSettings(timestep_range=(0, 1001)))


def test_zero_terminal_snr_makes_the_last_step_pure_noise():
    plain = DDPMObjective(sd_noise_scheduler(), ObjectiveSettings())
    zero = DDPMObjective(sd_noise_scheduler(), ObjectiveSettings(zero_terminal_snr=True))
    assert float(zero.scheduler.alphas_cumprod[-1]) == 0.0 and float(plain.scheduler.alphas_cumprod[-1]) > 0.004
    # The rescale keeps alpha_bar at t = 0 (the shift and scale map its square root onto itself): a few
    # float32 roundings of numbers near 1.
    assert abs(float(zero.scheduler.alphas_cumprod[0]) - float(plain.scheduler.alphas_cumprod[0])) <= 8 * FP32
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.full((2,), 999)
    assert torch.equal(zero.add_noise(latents, noise, last), noise)
    # min-SNR weighting stays finite at SNR 0 (its limit, 1, for epsilon prediction).
    loss = diffusion.per_sample_loss(noise, torch.zeros_like(noise), last, zero.scheduler, ObjectiveSettings(min_snr_gamma=5.0))
    assert torch.isfinite(loss).all()
    # Debiased estimation would weigh that step infinitely for epsilon prediction: refused, naming both keys.
    with pytest.raises(UserError, match="train.zero_terminal_snr.*train.debiased_estimation"):
        DDPMObjective(sd_noise_scheduler(), ObjectiveSettings(zero_terminal_snr=True, debiased_estimation=True))


def test_huber_and_smooth_l1_are_quadratic_for_small_residuals_and_l1_is_absolute():
    c = 0.1
    residual = torch.linspace(0.01, 0.02, 64).reshape(1, 1, 8, 8)
    target = torch.zeros_like(residual)
    threshold = torch.tensor([c])

    def loss(kind):
        return diffusion.elementwise_loss(residual, target, ObjectiveSettings(loss=kind, huber_schedule="constant", huber_c=c), threshold)

    # 2c(sqrt(r^2 + c^2) - c) = r^2 * 2c / (sqrt(r^2 + c^2) + c), below r^2 by at most r^2 / (4c^2) of it
    # (0.01 at r = 0.02); float32's sqrt(r^2 + c^2) - c loses ~2 roundings of c, 4 FP32 c^2 / r^2 of the
    # result (2.4e-5 at r = 0.01). A missing factor c, or the l1 form, is off by a factor of 10 or more.
    bound = Rounding(FP32, terms=1, depth=1, safety=(0.02**2 / (4 * c**2) + 4 * FP32 * c**2 / 0.01**2) / (8 * FP32))
    assert_close_elementwise(loss("huber"), residual**2, bound)
    assert_close_elementwise(loss("smooth_l1"), residual**2 / c, bound)
    assert torch.equal(loss("l1"), residual.abs()) and torch.equal(loss("l2"), residual**2)


def test_huber_schedules_follow_kohya():
    scheduler = sd_noise_scheduler()
    t = torch.tensor([0, 500, 1000 - 1])
    exponential = diffusion.huber_threshold(ObjectiveSettings(huber_schedule="exponential", huber_c=0.1), scheduler, t)
    # c**(t/T): 1 at t = 0, falling to (nearly) c at the last step.
    assert exponential[0] == 1.0 and exponential[1] == pytest.approx(0.1**0.5, rel=1e-6) and exponential[2] == pytest.approx(0.1 ** (999 / 1000), rel=1e-6)
    snr_schedule = diffusion.huber_threshold(ObjectiveSettings(huber_schedule="snr", huber_c=0.1), scheduler, t)
    sigma = math.sqrt((1 - float(scheduler.alphas_cumprod[500])) / float(scheduler.alphas_cumprod[500]))
    assert snr_schedule[1] == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-6)
    assert snr_schedule[0] > snr_schedule[1] > snr_schedule[2] > 0.1


def test_debiased_estimation_weighs_by_inverse_root_snr():
    scheduler = sd_noise_scheduler()
    t = torch.tensor([10, 300, 900])
    prediction, target = torch.ones(3, 4, 4, 4), torch.zeros(3, 4, 4, 4)
    weighted = diffusion.per_sample_loss(prediction, target, t, scheduler, ObjectiveSettings(debiased_estimation=True))
    expected = 1 / torch.sqrt(torch.clamp(diffusion.snr(scheduler, t), max=1000.0))
    # The loss is exactly 1 per sample; the weight is one division and one square root apart.
    assert_close_elementwise(weighted, expected, Rounding(FP32, terms=1, depth=3))


def test_multires_noise_is_unit_variance_and_spatially_correlated():
    plain, _, _ = _draw(ObjectiveSettings(), count=16)
    pyramid, _, _ = _draw(ObjectiveSettings(multires_noise_iterations=6, multires_noise_discount=0.8), count=16)
    # Each sample rescaled by its own standard deviation: 1 up to the rounding of a 1024-term sum.
    stds = pyramid.std(dim=(1, 2, 3))
    assert_close_elementwise(stds, torch.ones_like(stds), Rounding(FP32, terms=1024, depth=3))

    def neighbour_correlation(noise):
        return float(torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1])

    # White noise: ~0 (+-0.02 for 15k pairs). With discount 0.8 the coarse levels (weights 0.8**i, upsampled
    # 2-4x and more, so neighbours nearly equal) carry ~1.5 of the ~3.5 total variance: ~0.3 expected.
    assert abs(neighbour_correlation(plain)) < 0.05 and neighbour_correlation(pyramid) > 0.15


def test_ip_noise_gamma_perturbs_the_input_only():
    noise, timesteps, input_noise = _draw(ObjectiveSettings(), count=32)
    perturbed_noise, perturbed_timesteps, perturbed_input = _draw(ObjectiveSettings(ip_noise_gamma=0.1), count=32)
    # The target's noise and the timesteps are drawn first, from the same per-sample streams: unchanged.
    assert torch.equal(noise, perturbed_noise) and torch.equal(timesteps, perturbed_timesteps) and torch.equal(input_noise, noise)
    # The input's extra noise is 0.1 x a standard normal: std 0.1 within 5% for 32k values.
    assert abs(float((perturbed_input - perturbed_noise).std()) - 0.1) < 0.005


def test_a_run_with_every_option_on_resumes_exactly(tmp_path):
    settings = {
        "train.max_steps": 4, "train.save_every_steps": 2, "train.keep_checkpoints": 0, "train.loss": "huber", "train.huber_schedule": "snr",
        "train.timestep_range": "[100,900]", "train.multires_noise_iterations": 4, "train.ip_noise_gamma": 0.1, "train.zero_terminal_snr": True,
        "train.min_snr_gamma": 5, "train.noise_offset": 0.05,
    }

    full = train_and_resume(RECIPE, tmp_path, settings)
    plain = train(load_recipe(RECIPE, fast_overrides(tmp_path / "plain", **{"train.max_steps": 4})), show_progress=False)
    assert full.final_loss != plain.final_loss  # the options are in effect


@pytest.mark.parametrize("key, value, words", [
    ("train.loss", "mae", "train.loss"),
    ("train.huber_c", "0", "train.huber_c"),
    ("train.timestep_range", "[500,100]", "train.timestep_range"),
    ("train.multires_noise_discount", "1.5", "train.multires_noise_discount"),
])
def test_bad_option_values_name_their_key(tmp_path, key, value, words):
    with pytest.raises(UserError, match=words):
        load_recipe(RECIPE, fast_overrides(tmp_path, **{key: value}))
