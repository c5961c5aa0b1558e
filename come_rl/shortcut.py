"""Shortcut models (Frans, Hafner, Levine & Abbeel, 2025): one network that denoises with any DDIM step size, trained
from the plain diffusion loss and its own self-consistency, without a separate teacher or distillation stage.

The backbone is told the step size d it is sampled with (``UNetConfig.step_conditioned``: a zero-initialised
embedding of d added to the noise level's; the world model tells it 1 / steps). Training (``come_rl.train
shortcut_fraction=F shortcut_max_steps=M``) splits each batch:

- the plain rows (1 - F) take the ordinary diffusion loss with d = 0, at the ordinary noise levels: the many-step
  denoiser, and the loss the long-term memory is memorized by at test time (so the LTM stays a copy of its base
  trained by that base's own loss, as the paper's);
- the self-consistency rows (F) draw a student step count n in {1, 2, 4, ..., M} (d = 1 / n) and a level t on
  n's DDIM grid; the model itself (no gradient) takes two DDIM steps of size d / 2 from z_t, told d / 2 (or 0, the
  plain denoiser, once 2n > M), and the row regresses the clean frame x~ from which one step of size d lands where
  those two did (progressive distillation's target, ``come_rl.distill.distillation_target``).

With M = 4, n = 4 learns from 8 plain half steps, n = 2 from the model's own 4-step path, n = 1 from its 2-step path,
in one run. Composition is unchanged: every expert is asked for eps at each of the few steps and
the rule combines them, each told the same step size.
"""

from __future__ import annotations

import torch

from come_rl.distill import distillation_target, grid_levels
from come_rl.experts.expert import DiffusionExpert


def check_max_steps(max_steps: int) -> None:
    """``shortcut_max_steps`` must be a power of two >= 1 (the student step counts are 1, 2, 4, ..., max_steps)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1 or max_steps & (max_steps - 1):
        raise ValueError(f"shortcut_max_steps must be a power of two >= 1 (the fewest steps trained: 1, 2, 4, ... up "
                         f"to it), got {max_steps!r}")


def draw_step_counts(batch: int, fraction: float, max_steps: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) long: 0 for a plain row, else the row's student step count n in {1, 2, 4, ..., max_steps}; the first
    round(fraction * batch) rows after a random permutation are self-consistency rows."""
    check_max_steps(max_steps)
    counts = torch.zeros(batch, dtype=torch.long)
    chosen = torch.randperm(batch, generator=generator)[:round(fraction * batch)]
    powers = torch.randint(0, max_steps.bit_length(), (len(chosen),), generator=generator)
    counts[chosen] = 2 ** powers
    return counts


def shortcut_batch(expert: DiffusionExpert, frames: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None,
                   t: torch.Tensor, eps: torch.Tensor, drop: torch.Tensor | None, counts: torch.Tensor,
                   max_steps: int, clip_x0: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The levels t (B,), frame-space targets (B, C, H, W) and step sizes (B,) of a training batch whose rows have the
    step ``counts`` of :func:`draw_step_counts`: plain rows keep their level, their clip's frame and d = 0;
    self-consistency rows get a level on their grid, the model's own two-half-step target and d = 1 / n."""
    if not expert.step_conditioned:
        raise ValueError("shortcut training needs a step-conditioned backbone (UNetConfig.step_conditioned)")
    t = t.clone().float()
    targets = frames[:, -1].clone().float()
    steps = torch.zeros(len(counts))
    rows = torch.nonzero(counts > 0).flatten()
    if len(rows):
        n = counts[rows].float()
        t[rows] = grid_levels(t[rows], n)
        half = torch.where(2 * n <= max_steps, 1.0 / (2 * n), torch.zeros_like(n))  # the teacher's told step size
        with torch.no_grad():  # the network being trained (no dropout or batch norm: its mode does not matter)
            targets[rows] = distillation_target(
                expert, frames[rows], actions[rows], None if poses is None else poses[rows], t[rows], eps[rows],
                None if drop is None else drop[rows], n, clip_x0=clip_x0, teacher_step=half).float().to(targets.device)
        steps[rows] = 1.0 / n
    return t, targets, steps
