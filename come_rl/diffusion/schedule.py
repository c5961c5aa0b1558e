"""Continuous-time noise schedules: x_t = alpha(t) * x_0 + sigma(t) * eps, with t in [0, 1] and alpha^2 + sigma^2 = 1."""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Variance-preserving schedule defined by alpha_bar(t) = alpha(t)^2, clamped away from 0 and 1.

    The clamp keeps alpha(1) > 0 so that x_0 = (x_t - sigma * eps) / alpha stays finite at the noisiest step.
    """

    min_alpha_bar = 1e-4
    max_alpha_bar = 1.0 - 1e-6

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (batch,) -> alpha, sigma: (batch,), both in (0, 1)."""
        alpha_bar = self.alpha_bar(t).clamp(self.min_alpha_bar, self.max_alpha_bar)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)) / cos^2(pi/2 s / (1 + s))."""

    def __init__(self, offset: float = 0.008):
        self.offset = offset
        self._norm = math.cos(math.pi / 2 * offset / (1 + offset)) ** 2

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(math.pi / 2 * (t + self.offset) / (1 + self.offset)) ** 2 / self._norm


class LinearSchedule(NoiseSchedule):
    """DDPM's linear beta schedule (beta from 1e-4 to 0.02 over 1000 steps) in continuous time."""

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
        self.beta_start, self.beta_end, self.num_steps = beta_start, beta_end, num_steps

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        # log alpha_bar = -sum_i beta_i ~ -T (beta_start t + (beta_end - beta_start) t^2 / 2) for a linear ramp.
        n = self.num_steps
        return torch.exp(-n * (self.beta_start * t + 0.5 * (self.beta_end - self.beta_start) * t**2))


def build_schedule(name: str) -> NoiseSchedule:
    schedules = {"cosine": CosineSchedule, "linear": LinearSchedule}
    if name not in schedules:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(schedules)}")
    return schedules[name]()
