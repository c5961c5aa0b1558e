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


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_the_shipped_rule_at_few_steps_is_the_rule_applied_by_hand(steps):
    """Sampling the shipped Memory Cards CoME rule (all four experts, pairwise, split gates) in 1-3 DDIM steps through
    the batched composer equals a DDIM loop written out here with the rule applied by hand: at t >= 0.8 base + LTM,
    eps_base + w/(w_base + w) * (alpha eps_ltm + (1 - alpha) eps_base - eps_base) = eps_base + 2.5 (eps_ltm - eps_base);
    below it (eps_stm + eps_sltm) / 2 (the base's share cancels); x_0 clipped to [-1, 1] as the sampler does."""
    import json
    from pathlib import Path

    from come_rl.composition import CompositionConfig, build_composer
    from tests.test_composition import _DistinctExpert

    rule = json.loads((Path(__file__).resolve().parents[1] / "come_rl/checkpoints/memory_cards/world_model.json")
                      .read_text())["composition"]
    config = CompositionConfig(**{**rule, "experts": ["base", "ltm", "stm", "sltm"]})
    assert config.alphas["ltm"] == 5.0 and config.active_from == {"ltm": 0.8} and config.pairwise
    scales = {"base": 0.5, "ltm": 1.5, "stm": -0.7, "sltm": 2.5}
    experts = {role: _DistinctExpert(scale) for role, scale in scales.items()}
    generator = torch.Generator().manual_seed(0)
    conditions = {role: {"context": torch.randn(3, 2, 4, generator=generator), "actions": torch.zeros(3, 3, 1)}
                  for role in scales}
    schedule, sampler = CosineSchedule(), SamplerConfig(steps=steps, clip_x0=1.0)
    composed = sample(build_composer(config, experts).bind(conditions), (3, 5), schedule, sampler,
                      torch.Generator().manual_seed(7))

    def eps(role, x, t):  # the expert's conditional prediction, written out from the stand-in's definition
        state = conditions[role]["context"].flatten(1).mean(1)
        return x * scales[role] + state[:, None] + torch.sin(3.0 * t)[:, None] * scales[role]

    x = torch.randn((3, 5), generator=torch.Generator().manual_seed(7))
    times = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = times[i].expand(3)
        if float(times[i]) >= 0.8:
            e = eps("base", x, t) + 2.5 * (eps("ltm", x, t) - eps("base", x, t))
        else:
            e = (eps("stm", x, t) + eps("sltm", x, t)) / 2
        alpha, sigma = (float(v[0]) for v in schedule.alpha_sigma(t))
        x0 = ((x - sigma * e) / alpha).clamp(-1.0, 1.0)
        if i == steps - 1:
            x = x0
            break
        alpha_s, sigma_s = (float(v[0]) for v in schedule.alpha_sigma(times[i + 1].expand(3)))
        x = alpha_s * x0 + sigma_s * (x - alpha * x0) / sigma
    assert torch.allclose(composed, x, atol=1e-5)
    # the gates matter: the same loop with the memory experts swapped gives other samples
    assert not torch.allclose(composed, sample(build_composer(CompositionConfig(**{
        **rule, "experts": ["base", "ltm", "stm", "sltm"], "active_from": {"stm": 0.8, "sltm": 0.8},
        "active_below": {"ltm": 0.8}}), experts).bind(conditions), (3, 5), schedule, sampler,
        torch.Generator().manual_seed(7)), atol=1e-3)
