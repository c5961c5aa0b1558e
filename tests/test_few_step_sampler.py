"""Few-step samplers against a closed-form model: Gaussian data, whose exact noise prediction is known."""

import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig, sample
from come_rl.diffusion.sampler import karras_sigmas, time_of_sigma

MEAN, STD = 0.3, 0.5


def exact_eps(schedule):
    """E[eps | x_t] for x_0 ~ N(MEAN, STD^2) per dimension: sigma (x_t - alpha MEAN) / (alpha^2 STD^2 + sigma^2)."""

    def denoiser(x_t, t):
        alpha, sigma = (v[:, None].double() for v in schedule.alpha_sigma(t))
        return (sigma * (x_t.double() - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)).to(x_t.dtype)

    return denoiser


def spread_error(method: str, steps: int, seed: int = 0) -> tuple[float, float]:
    schedule = CosineSchedule()
    x = sample(exact_eps(schedule), (20000, 4), schedule, SamplerConfig(steps=steps, method=method, clip_x0=0.0),
               torch.Generator().manual_seed(seed))
    return abs(float(x.mean()) - MEAN), abs(float(x.std()) - STD)


@pytest.mark.parametrize("method, few, many, tolerance", [("ddim", 3, 50, 0.02), ("euler", 10, 50, 0.04),
                                                          ("heun", 6, 20, 0.03)])
def test_samplers_converge_to_the_gaussian_as_steps_grow(method, few, many, tolerance):
    mean_error, std_error = spread_error(method, many)
    assert mean_error < 0.01 and std_error < tolerance
    assert spread_error(method, few)[1] > std_error  # fewer steps, a worse spread: the test can tell them apart


def test_one_ddim_step_returns_the_posterior_mean():
    mean_error, std_error = spread_error("ddim", 1)
    assert mean_error < 0.01 and std_error > 0.45  # the mean, and almost no spread


def test_the_noise_levels_and_their_times():
    schedule = CosineSchedule()
    sigmas = karras_sigmas(schedule, 4)
    assert len(sigmas) == 5 and sigmas[-1] == 0 and torch.all(sigmas[:-1][1:] < sigmas[:-1][:-1])
    assert float(sigmas[-2]) == pytest.approx(0.002, rel=1e-6)
    times = time_of_sigma(schedule, sigmas[:-1].float())
    alpha, sigma = schedule.alpha_sigma(times)
    assert torch.allclose(sigma / alpha, sigmas[:-1].float(), rtol=1e-3)


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="unknown sampler method 'dpm'"):
        SamplerConfig(method="dpm")
    with pytest.raises(ValueError, match="deterministic"):
        SamplerConfig(method="heun", eta=0.5)
