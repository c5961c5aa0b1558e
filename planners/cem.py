"""The cross-entropy method (CEM): refit a sampling distribution to the best candidates, repeat.

Continuous actions use a per-step diagonal Gaussian, discrete ones a per-step categorical
distribution over one-hot actions (Memory Maze and Memory Cards are discrete). Each call starts from
the previous call's distribution shifted by the steps executed since (warm start, as in TD-MPC2),
and returns the elite mean: the Gaussian mean, or for discrete spaces the one-hot of the most likely
action at each step.
"""

from __future__ import annotations

import torch

from planners.base import (
    ActionSpec,
    Objective,
    SamplingPlanner,
    action_bounds,
    check_positive_int,
    one_hot_argmax,
    sample_gaussian_actions,
    sample_one_hot_actions,
    score_candidates,
)


class CEMPlanner(SamplingPlanner):
    """Cross-entropy method planner.

    Args:
        population: candidates sampled per iteration.
        elites: best candidates the distribution is refitted to (1 <= elites <= population).
        iterations: refits per decision.
        momentum: weight of the old distribution in each refit, in [0, 1) (0 = take the elites' fit).
        init_std: initial std of continuous actions as a fraction of the half range (high - low) / 2.
        min_std: floor of the continuous std as a fraction of the half range, so the search never
            collapses to a point before the last iteration.
        probability_floor: every discrete action keeps at least this probability after a refit
            (a collapsed categorical could never recover when warm-started).
        repeats: stochastic evaluations averaged per candidate.
        warm_start_shift: steps the previous plan is shifted at the next call (= actions executed
            between replans).
        seed: seed of the planner's generator.
    """

    def __init__(
        self,
        population: int = 64,
        elites: int = 8,
        iterations: int = 2,
        momentum: float = 0.1,
        init_std: float = 1.0,
        min_std: float = 0.05,
        probability_floor: float = 0.01,
        repeats: int = 1,
        warm_start_shift: int = 1,
        seed: int = 0,
    ) -> None:
        name = "CEMPlanner"
        self.population = check_positive_int("population", population, name)
        self.elites = check_positive_int("elites", elites, name)
        if self.elites > self.population:
            raise ValueError(
                f"{name}: elites ({self.elites}) must not exceed population ({self.population}); "
                "lower planner.elites or raise planner.population"
            )
        self.iterations = check_positive_int("iterations", iterations, name)
        self.repeats = check_positive_int("repeats", repeats, name)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1), got {momentum}")
        if float(init_std) <= 0.0 or float(min_std) < 0.0:
            raise ValueError(f"{name}: init_std must be > 0 and min_std >= 0, got {init_std}, {min_std}")
        if not 0.0 <= float(probability_floor) < 1.0:
            raise ValueError(f"{name}: probability_floor must be in [0, 1), got {probability_floor}")
        self.momentum = float(momentum)
        self.init_std = float(init_std)
        self.min_std = float(min_std)
        self.probability_floor = float(probability_floor)
        super().__init__(seed=seed, warm_start_shift=warm_start_shift)

    def plan(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """Return the elite mean after ``iterations`` refits, shape (horizon, action_dim)."""
        horizon = self._check_spec(action_spec, horizon)
        if action_spec.kind == "continuous":
            return self._plan_continuous(objective, action_spec, horizon)
        return self._plan_discrete(objective, action_spec, horizon)

    def _plan_continuous(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        low, high = action_bounds(action_spec)
        half_range = (high - low) / 2
        mean = self._warm_start(((low + high) / 2).expand(horizon, -1))
        std = (self.init_std * half_range).expand(horizon, -1).clone()
        for _ in range(self.iterations):
            candidates = sample_gaussian_actions(mean, std, self.population, low, high, self.generator)
            scores = score_candidates(objective, candidates, self.repeats)
            elite_candidates = candidates[torch.topk(scores, self.elites).indices]
            mean = self.momentum * mean + (1 - self.momentum) * elite_candidates.mean(dim=0)
            elite_std = elite_candidates.std(dim=0, unbiased=False)
            std = torch.maximum(self.momentum * std + (1 - self.momentum) * elite_std, self.min_std * half_range)
        self._previous = mean.clone()
        return torch.maximum(torch.minimum(mean, high), low)

    def _plan_discrete(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        num_actions = action_spec.dim
        probs = self._warm_start(torch.full((horizon, num_actions), 1.0 / num_actions))
        for _ in range(self.iterations):
            candidates = sample_one_hot_actions(probs, self.population, self.generator)
            scores = score_candidates(objective, candidates, self.repeats)
            elite_frequencies = candidates[torch.topk(scores, self.elites).indices].mean(dim=0)
            probs = self.momentum * probs + (1 - self.momentum) * elite_frequencies
            # mix in a uniform floor: p <- (1 - n f) p + f keeps every action at >= f and rows summing to 1
            floor = min(self.probability_floor, 1.0 / num_actions)
            probs = (1 - num_actions * floor) * probs + floor
        self._previous = probs.clone()
        return one_hot_argmax(probs)
