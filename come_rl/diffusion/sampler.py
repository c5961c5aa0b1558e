"""DDIM / DDPM sampling over any denoiser (one expert or a composition), with an optional Langevin corrector.

The sampler knows nothing of networks: it calls ``denoiser(x_t, t) -> eps`` (the contract of
``come_rl.interfaces.Denoiser``) and walks the noise schedule from t = 1 to t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from come_rl import devices
from come_rl.diffusion.parametrization import _bcast, eps_to_x0
from come_rl.diffusion.schedule import NoiseSchedule


@dataclass
class SamplerConfig:
    """How to sample.

    Attributes:
        steps: number of denoising steps (DDIM works well with 5-20; NWM used 250 DDPM steps).
        eta: 0 = deterministic DDIM, 1 = DDPM's ancestral sampling; in between interpolates.
        clip_x0: clamp the predicted clean sample to [-clip_x0, clip_x0] (frames live in [-1, 1]); 0 = off.
        langevin_steps: corrector steps after each predictor step (paper D.3; it found no gain).
        langevin_step_size: corrector step size as a fraction of sigma_t^2.
    """

    steps: int = 10
    eta: float = 0.0
    clip_x0: float = 1.0
    langevin_steps: int = 0
    langevin_step_size: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {self.eta}")
        if self.langevin_steps < 0:
            raise ValueError(f"langevin_steps must be >= 0, got {self.langevin_steps}")


def sample(
    denoiser,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    device: torch.device | str | None = None,
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
    """
    config = config or SamplerConfig()
    if device is None:
        device = x_init.device if x_init is not None else torch.device("cpu")
    device = torch.device(device)
    x = devices.randn(shape, generator, device) if x_init is None else x_init.to(device).clone()
    batch = shape[0]
    times = torch.linspace(1.0, 0.0, config.steps + 1, device=device)
    for i in range(config.steps):
        t, s = times[i].expand(batch), times[i + 1].expand(batch)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
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
