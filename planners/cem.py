"""The cross-entropy method (CEM): refit a sampling distribution to the best candidates, repeat.

Continuous actions use a per-step diagonal Gaussian, discrete ones a per-step categorical
distribution over one-hot actions (Memory Maze and Memory Cards are discrete). Each call starts from
the previous call's distribution shifted by the steps executed since (warm start, as in TD-MPC2),
and returns the elite mean: the Gaussian mean, or for discrete spaces the one-hot of the most likely
action at each step.
"""

from __future__ import annotations

import torch

from planners.base import IterativeSamplingPlanner, check_fraction, check_positive_int, check_subset_size


class CEMPlanner(IterativeSamplingPlanner):
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
        self.elites = check_subset_size("elites", elites, "population", self.population, name)
        self.iterations = check_positive_int("iterations", iterations, name)
        self.repeats = check_positive_int("repeats", repeats, name)
        if float(init_std) <= 0.0 or float(min_std) < 0.0:
            raise ValueError(f"{name}: init_std must be > 0 and min_std >= 0, got {init_std}, {min_std}")
        self.momentum = check_fraction("momentum", momentum, name)
        self.init_std = float(init_std)
        self.min_std = float(min_std)
        self.probability_floor = check_fraction("probability_floor", probability_floor, name)
        super().__init__(seed=seed, warm_start_shift=warm_start_shift)

    @property
    def initial_std(self) -> float:
        return self.init_std

    def _refit_gaussian(self, candidates, scores, mean, std, half_range):
        elite_candidates = candidates[torch.topk(scores, self.elites).indices]
        mean = self.momentum * mean + (1 - self.momentum) * elite_candidates.mean(dim=0)
        elite_std = elite_candidates.std(dim=0, unbiased=False)
        return mean, torch.maximum(self.momentum * std + (1 - self.momentum) * elite_std, self.min_std * half_range)

    def _categorical_target(self, candidates, scores):
        return candidates[torch.topk(scores, self.elites).indices].mean(dim=0)  # the elites' action frequencies
