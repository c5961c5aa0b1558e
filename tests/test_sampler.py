"""DDPM and DDIM recover a Gaussian target from its analytic denoiser."""

import pytest
import torch

from come_rl.diffusion import CosineSchedule, LinearSchedule, SamplerConfig, sample

MEAN, VAR = torch.tensor([1.5, -0.5]), torch.tensor([0.25, 2.0])


def gaussian_eps(schedule):
    def eps(x, t):
        alpha, sigma = schedule.alpha_sigma(t)
        a, s = alpha[:, None], sigma[:, None]
        # x_t ~ N(a m, a^2 v + s^2): score = -(x - a m) / (a^2 v + s^2), eps = -s * score
        return s * (x - a * MEAN) / (a**2 * VAR + s**2)

    return eps


@pytest.mark.parametrize("schedule", [CosineSchedule(), LinearSchedule()], ids=["cosine", "linear"])
@pytest.mark.parametrize("eta,steps", [(0.0, 100), (1.0, 200)], ids=["ddim", "ddpm"])
def test_sampler_recovers_mean_and_variance(schedule, eta, steps):
    x = sample(gaussian_eps(schedule), (20000, 2), schedule, SamplerConfig(steps=steps, eta=eta, clip_x0=0.0),
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), MEAN, atol=0.05), x.mean(0)
    assert torch.allclose(x.var(0), VAR, rtol=0.08), x.var(0)


def test_sampler_is_reproducible_and_validates():
    schedule = CosineSchedule()
    a = sample(gaussian_eps(schedule), (8, 2), schedule, SamplerConfig(steps=5, eta=1.0), torch.Generator().manual_seed(3))
    b = sample(gaussian_eps(schedule), (8, 2), schedule, SamplerConfig(steps=5, eta=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="eta"):
        SamplerConfig(eta=2.0)


def test_langevin_corrector_keeps_the_target():
    schedule = CosineSchedule()
    x = sample(gaussian_eps(schedule), (20000, 2), schedule,
               SamplerConfig(steps=50, eta=1.0, clip_x0=0.0, langevin_steps=1, langevin_step_size=0.05),
               generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), MEAN, atol=0.06)
    assert torch.allclose(x.var(0), VAR, rtol=0.12)


@pytest.mark.parametrize("config", [SamplerConfig(steps=1), SamplerConfig(steps=4), SamplerConfig(steps=3, eta=1.0),
                                    SamplerConfig(steps=3, eta=0.5, langevin_steps=2),
                                    SamplerConfig(steps=3, method="heun")],
                         ids=["ddim1", "ddim4", "ddpm3", "langevin", "heun"])
def test_skipping_a_sample_leaves_the_generator_where_sampling_it_does(config):
    """``skip_sample`` draws exactly the noise ``sample`` draws (and nothing else): the next draw is the same."""
    from come_rl.diffusion import skip_sample

    schedule = CosineSchedule()
    sampled, skipped = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sample(gaussian_eps(schedule), (8, 2), schedule, config, sampled)
    skip_sample((8, 2), config, skipped)
    assert torch.equal(torch.randn(16, generator=sampled), torch.randn(16, generator=skipped))
    if config.eta > 0:  # the initial noise alone is a draw too few, and it shows
        too_few = torch.Generator().manual_seed(5)
        skip_sample((8, 2), SamplerConfig(steps=config.steps), too_few)
        sampled = torch.Generator().manual_seed(5)
        sample(gaussian_eps(schedule), (8, 2), schedule, config, sampled)
        assert not torch.equal(torch.randn(16, generator=sampled), torch.randn(16, generator=too_few))
