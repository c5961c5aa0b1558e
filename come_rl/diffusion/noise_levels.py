"""Distributions of training noise levels t in [0, 1].

Which noise levels a model trains on is a first-class knob for the long-term memory: docs/design.md's probe found that an
episode's memory only matters near pure noise (at t = 0.3-0.6 the base model recovers an object from the noisy target
itself), so memorizing at t in [0.95, 1] lifted Memory Cards recall from 29 % to 86 % at 100 steps.
"""

from __future__ import annotations

import torch

from come_rl import devices


def sample_noise_levels(
    batch_size: int, low: float = 0.0, high: float = 1.0, uniform_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t: (batch_size,) drawn from U[low, high], except a ``uniform_fraction`` of rows drawn from U[0, 1].

    Training uses the defaults (U[0, 1]); memorization uses e.g. low=0.95 with uniform_fraction=0.5, which keeps
    recalled objects sharp (the uniform half keeps the adapters from degrading low-noise denoising).
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"noise levels need 0 <= low < high <= 1, got low={low}, high={high}")
    if not 0.0 <= uniform_fraction <= 1.0:
        raise ValueError(f"uniform_fraction must be in [0, 1], got {uniform_fraction}")
    # Drawn on the generator's device (the CPU for torch.Generator()); callers move t to their model's device.
    t = low + (high - low) * devices.rand((batch_size,), generator)
    uniform_rows = devices.rand((batch_size,), generator) < uniform_fraction
    return torch.where(uniform_rows, devices.rand((batch_size,), generator), t)
