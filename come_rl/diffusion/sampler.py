"""DDIM / DDPM sampling over any denoiser (one expert or a composition), with an optional Langevin corrector; and
EDM-style Euler / Heun sampling of the probability-flow ODE on Karras et al.'s noise levels (``method=``).

The sampler knows nothing of networks: it calls ``denoiser(x_t, t) -> eps`` (the contract of
``come_rl.interfaces.Denoiser``) and walks the noise schedule from t = 1 to t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from come_rl import devices
from come_rl.diffusion.parametrization import _bcast, eps_to_x0
from come_rl.diffusion.schedule import NoiseSchedule


SAMPLER_METHODS = ("ddim", "euler", "heun")


@dataclass
class SamplerConfig:
    """How to sample.

    Attributes:
        steps: number of denoising steps (DDIM works well with 5-20; NWM used 250 DDPM steps).
        eta: 0 = deterministic DDIM, 1 = DDPM's ancestral sampling; in between interpolates.
        clip_x0: clamp the predicted clean sample to [-clip_x0, clip_x0] (frames live in [-1, 1]); 0 = off.
        langevin_steps: corrector steps after each predictor step (paper D.3; it found no gain).
        langevin_step_size: corrector step size as a fraction of sigma_t^2.
        method: "ddim" (the default: DDIM / DDPM steps evenly spaced in t), "euler" or "heun": the probability-flow
            ODE in the variance-exploding variable x / alpha with noise levels sigma = sigma_t / alpha_t spaced as
            Karras et al. (2022, rho = 7) from the schedule's largest level to ``sigma_min``, then 0; Euler calls the
            denoiser once per step, Heun twice (its second-order correction; none on the last step): 2 steps - 1 calls.
        sigma_min: the smallest non-zero noise level of the euler / heun schedules (EDM: 0.002).
    """

    steps: int = 10
    eta: float = 0.0
    clip_x0: float = 1.0
    langevin_steps: int = 0
    langevin_step_size: float = 0.1
    method: str = "ddim"
    sigma_min: float = 0.002

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps must be an integer >= 1, got {self.steps!r}")
        if self.method not in SAMPLER_METHODS:
            raise ValueError(f"unknown sampler method {self.method!r}; choose one of {SAMPLER_METHODS}")
        if self.method != "ddim" and (self.eta != 0.0 or self.langevin_steps):
            raise ValueError(f"sampler method {self.method!r} is deterministic: eta and langevin_steps apply to ddim only")
        if not self.sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {self.eta}")
        if self.langevin_steps < 0:
            raise ValueError(f"langevin_steps must be >= 0, got {self.langevin_steps}")

    @property
    def step_size(self) -> float:
        """The step size a step-conditioned (shortcut) denoiser is told: 1 / steps on DDIM's even grid; 0 (the plain
        denoiser) for euler / heun, whose steps are uneven."""
        return 1.0 / self.steps if self.method == "ddim" else 0.0


def sample(
    denoiser,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    seed_x0: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Draw one batch of samples of ``shape`` (batch first) by integrating the reverse diffusion.

    Args:
        denoiser: callable ``(x_t (shape), t (batch,)) -> eps (shape)``.
        shape: output shape, e.g. (batch, channels, height, width).
        schedule: the noise schedule the denoiser was trained with.
        config: steps, eta (DDIM 0 / DDPM 1), x_0 clipping, Langevin corrector.
        generator: makes the initial noise and every stochastic step reproducible.
        x_init: start from this pure-noise sample instead of drawing one.
        device: where the sample lives (the denoiser's device; default: x_init's, else the CPU). Noise is drawn on
            the generator's device and copied there, so a seed gives the same noise on every device.
        seed_x0: (x0 (shape), rows (batch,) bool, t0): the chosen rows restart from ``x0`` at noise level t0 (SDEdit,
            Meng et al. 2022): at the first step at or below t0 their sample becomes alpha_t0 * x0 + sigma_t0 * (their
            initial noise), and the denoiser takes them the rest of the way. DDIM only.
    """
    config = config or SamplerConfig()
    if device is None:
        device = x_init.device if x_init is not None else torch.device("cpu")
    device = torch.device(device)
    x = devices.randn(shape, generator, device) if x_init is None else x_init.to(device).clone()
    if seed_x0 is not None:
        seed_frames, seed_rows, seed_level = seed_x0
        if config.method != "ddim":
            raise ValueError(f"seed_x0 (sampling from a memorized view) needs the ddim sampler, not {config.method!r}")
        if not 0.0 < seed_level < 1.0:
            raise ValueError(f"seed_x0's level t0 must be in (0, 1), got {seed_level}")
        seed_rows = seed_rows.to(device).view(-1, *([1] * (x.dim() - 1)))
        noise = x.clone()
    if config.method != "ddim":
        return _sample_ode(denoiser, x, schedule, config)
    batch = shape[0]
    times = torch.linspace(1.0, 0.0, config.steps + 1, device=device)
    seeded = seed_x0 is None
    for i in range(config.steps):
        t, s = times[i].expand(batch), times[i + 1].expand(batch)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        if not seeded and float(times[i]) <= seed_level + 1e-6:
            restart = _bcast(alpha_t, x) * seed_frames.to(x) + _bcast(sigma_t, x) * noise
            x, seeded = torch.where(seed_rows, restart, x), True
        eps = denoiser(x, t)
        x0 = eps_to_x0(eps, x, alpha_t, sigma_t)
        if config.clip_x0 > 0:
            x0 = x0.clamp(-config.clip_x0, config.clip_x0)
        # Re-derive eps from the (clipped) x_0 so that the step stays on the line through x_t and x_0.
        eps = (x - _bcast(alpha_t, x) * x0) / _bcast(sigma_t, x)
        if i == config.steps - 1:
            x = x0
            break
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        # DDIM's generalised step (Song et al. 2021, eq. 12): the stochastic part has the DDPM posterior
        # variance scaled by eta^2; eta = 1 is ancestral DDPM sampling.
        posterior_var = (sigma_s**2 / sigma_t**2) * (1.0 - (alpha_t / alpha_s) ** 2)
        noise_std = config.eta * posterior_var.clamp_min(0).sqrt()
        direction = (sigma_s**2 - noise_std**2).clamp_min(0).sqrt()
        x = _bcast(alpha_s, x) * x0 + _bcast(direction, x) * eps
        if config.eta > 0:
            x = x + _bcast(noise_std, x) * devices.randn(shape, generator, device)
        for _ in range(config.langevin_steps):
            # Unadjusted Langevin on log p_s: score = -eps / sigma_s, step delta = c * sigma_s^2.
            delta = config.langevin_step_size * sigma_s**2
            score = -denoiser(x, s) / _bcast(sigma_s, x)
            x = x + _bcast(delta, x) * score + _bcast((2 * delta).sqrt(), x) * devices.randn(shape, generator, device)
    return x


def skip_sample(
    shape: tuple[int, ...],
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Draw and discard the noise that ``sample(denoiser, shape, schedule, config, generator, device=device)`` draws,
    with no denoising: a caller that does not need that sample leaves ``generator`` (torch's global generator when it is
    None) where the full call would, so every later draw is the one it would have been. ``sample`` draws the initial
    noise and, with DDIM, one more per step but the last where eta > 0 and one per Langevin step; Euler / Heun none."""
    config = config or SamplerConfig()
    device = torch.device("cpu") if device is None else torch.device(device)
    draws = 1
    if config.method == "ddim":
        draws += (config.steps - 1) * ((1 if config.eta > 0 else 0) + config.langevin_steps)
    for _ in range(draws):
        devices.randn(shape, generator, device)


def time_of_sigma(schedule: NoiseSchedule, sigma_ve: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The time t in [0, 1] at which the schedule's sigma_t / alpha_t equals ``sigma_ve`` (bisection: any schedule
    whose noise grows with t)."""
    low, high = torch.zeros_like(sigma_ve), torch.ones_like(sigma_ve)
    for _ in range(iterations):
        mid = (low + high) / 2
        alpha, sigma = schedule.alpha_sigma(mid)
        above = sigma / alpha > sigma_ve
        high, low = torch.where(above, mid, high), torch.where(above, low, mid)
    return (low + high) / 2


def karras_sigmas(schedule: NoiseSchedule, steps: int, sigma_min: float = 0.002, rho: float = 7.0) -> torch.Tensor:
    """steps + 1 noise levels (variance-exploding sigma = sigma_t / alpha_t) from the schedule's largest to
    ``sigma_min``, spaced as Karras et al. (2022), then 0."""
    alpha, sigma = schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))
    sigma_max = float(sigma / alpha)
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (min(sigma_min, sigma_max) ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _sample_ode(denoiser, x: torch.Tensor, schedule: NoiseSchedule, config: SamplerConfig) -> torch.Tensor:
    """Euler / Heun on dy/dsigma = (y - D(y, sigma)) / sigma with y = x_t / alpha_t (EDM's ODE, Karras et al. 2022);
    the first level is the schedule's t = 1, where x starts as pure noise."""
    batch = x.shape[0]
    sigmas = karras_sigmas(schedule, config.steps, config.sigma_min).to(x.device)
    times = time_of_sigma(schedule, sigmas[:-1].float().clamp_max(float(sigmas[0])))
    times[0] = 1.0

    def denoised(y: torch.Tensor, index: int) -> torch.Tensor:
        t = times[index].expand(batch)
        alpha, sigma = schedule.alpha_sigma(t)
        x_t = _bcast(alpha, y) * y
        x0 = eps_to_x0(denoiser(x_t, t), x_t, alpha, sigma)
        return x0.clamp(-config.clip_x0, config.clip_x0) if config.clip_x0 > 0 else x0

    alpha_1, _ = schedule.alpha_sigma(times[:1])
    y = x / alpha_1.to(x.dtype)
    for i in range(config.steps):
        s_now, s_next = sigmas[i].to(x.dtype), sigmas[i + 1].to(x.dtype)
        d_now = denoised(y, i)
        if s_next == 0:
            y = d_now
            break
        slope = (y - d_now) / s_now
        y_next = y + (s_next - s_now) * slope
        if config.method == "heun":
            slope_next = (y_next - denoised(y_next, i + 1)) / s_next
            y_next = y + (s_next - s_now) * (slope + slope_next) / 2
        y = y_next
    return y
