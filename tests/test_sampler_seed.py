"""Sampling from a memorized view (SDEdit restart, ``sample(seed_x0=...)``) against the closed form of N(0, I) data."""

import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig, sample

SCHEDULE = CosineSchedule()


def _exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for data N(0, I) under a variance-preserving schedule: sigma_t * x_t."""
    return SCHEDULE.alpha_sigma(t)[1].view(-1, 1) * x


def test_seeded_rows_restart_from_the_view_at_t0_and_the_others_are_untouched():
    steps, level = 10, 0.5
    config = SamplerConfig(steps=steps, clip_x0=0.0)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    view = torch.full((3, 4), 0.7)
    rows = torch.tensor([True, False, True])
    plain = sample(_exact_eps, (3, 4), SCHEDULE, config, x_init=noise)
    seeded = sample(_exact_eps, (3, 4), SCHEDULE, config, x_init=noise, seed_x0=(view, rows, level))
    assert torch.equal(seeded[1], plain[1])
    # closed form: with eps = sigma x, a DDIM step multiplies x by alpha_s alpha_t + sigma_s sigma_t, the last returns
    # x0 = alpha_t x; the restart at the first level <= t0 sets x = alpha * view + sigma * (initial noise)
    times = torch.linspace(1.0, 0.0, steps + 1)
    start = int((times <= level + 1e-6).nonzero()[0])
    alpha0, sigma0 = SCHEDULE.alpha_sigma(times[start:start + 1])
    x = alpha0 * view[0] + sigma0 * noise[0]
    for i in range(start, steps):
        alpha_t, sigma_t = SCHEDULE.alpha_sigma(times[i:i + 1])
        if i == steps - 1:
            x = alpha_t * x
            break
        alpha_s, sigma_s = SCHEDULE.alpha_sigma(times[i + 1:i + 2])
        x = (alpha_s * alpha_t + sigma_s * sigma_t) * x
    assert torch.allclose(seeded[0], x, atol=1e-5)
    assert (seeded[0] - view[0]).abs().mean() < (plain[0] - view[0]).abs().mean()  # pulled toward the view
    with pytest.raises(ValueError, match="needs the ddim sampler"):
        sample(_exact_eps, (3, 4), SCHEDULE, SamplerConfig(method="euler"), x_init=noise, seed_x0=(view, rows, level))
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        sample(_exact_eps, (3, 4), SCHEDULE, config, x_init=noise, seed_x0=(view, rows, 1.0))
