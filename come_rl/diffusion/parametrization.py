"""Conversions between the network's output (v or eps) and the quantities a sampler needs (eps, x_0).

We train with v-prediction (Salimans & Ho, 2022): v = alpha * eps - sigma * x_0. Its target has unit variance at every
noise level, so the loss needs no weighting, and it stays informative near pure noise (t -> 1), which is exactly where
the long-term memory matters (docs/design.md's probe: memorization only helps at noise levels 0.95-1). Experts hand eps to
the composer because the paper's composition rule (eq. 6) is a sum of scores, and score = -eps / sigma.
"""

from __future__ import annotations

import torch


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = alpha * v + sigma * x_t (from x_t = alpha x_0 + sigma eps and v = alpha eps - sigma x_0)."""
    return _bcast(alpha, v) * v + _bcast(sigma, v) * x_t


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sigma * eps) / alpha, computed in float64: near t = 1, alpha ~ 1e-2 amplifies rounding."""
    a, s = _bcast(alpha, eps).double(), _bcast(sigma, eps).double()
    return ((x_t.double() - s * eps.double()) / a).to(eps.dtype)


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
