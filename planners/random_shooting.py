"""Random shooting: score many random action sequences once, keep the best one."""

from __future__ import annotations

import torch

from planners.base import (
    ActionSpec,
    Objective,
    SamplingPlanner,
    action_bounds,
    check_positive_int,
    score_candidates,
)


class RandomShootingPlanner(SamplingPlanner):
    """Uniform random sequences (continuous: uniform in the bounds; discrete: uniform one-hot).

    Args:
        population: candidate sequences scored per decision.
        repeats: stochastic evaluations averaged per candidate (one batch of population x repeats).
        seed: seed of the planner's own generator.
    """

    def __init__(self, population: int = 64, repeats: int = 1, seed: int = 0) -> None:
        self.population = check_positive_int("population", population, "RandomShootingPlanner")
        self.repeats = check_positive_int("repeats", repeats, "RandomShootingPlanner")
        super().__init__(seed=seed, warm_start_shift=0)

    def sample(self, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """(population, horizon, action_dim) uniform random candidates."""
        if action_spec.kind == "continuous":
            low, high = action_bounds(action_spec)
            uniform = torch.rand((self.population, horizon, action_spec.dim), generator=self.generator)
            return low + (high - low) * uniform
        indices = torch.randint(action_spec.dim, (self.population, horizon), generator=self.generator)
        return torch.nn.functional.one_hot(indices, action_spec.dim).to(torch.float32)

    def plan(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """Return the best of ``population`` random sequences, shape (horizon, action_dim)."""
        horizon = self._check_spec(action_spec, horizon)
        candidates = self.sample(action_spec, horizon)
        scores = score_candidates(objective, candidates, self.repeats)
        return candidates[int(torch.argmax(scores))].clone()
