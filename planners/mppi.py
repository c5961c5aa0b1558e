"""Model predictive path integral control (MPPI): a softmax-weighted average of all candidates.

Where CEM keeps the top-k candidates with equal weight, MPPI weights every candidate by
``exp(score / temperature)``. Scores are standardised by their spread before the softmax
(``normalize_scores``), so one temperature works for LPIPS scores (spread ~0.05) and for returns
(spread ~100) alike. Continuous actions: the weighted mean (and, with ``adapt_std``, the weighted
std) of Gaussian samples. Discrete actions: the categorical probabilities move towards the
softmax-weighted frequencies of the sampled one-hot actions; the plan is the most likely action per
step as a one-hot vector.
"""

from __future__ import annotations

import torch

from planners.base import IterativeSamplingPlanner, check_fraction, check_positive_int


def softmax_weights(scores: torch.Tensor, temperature: float, normalize_scores: bool) -> torch.Tensor:
    """(batch,) scores (-inf for broken candidates) -> (batch,) weights summing to 1.

    Subtracting the best score first keeps exp() from overflowing; -inf scores get weight 0.
    """
    finite = scores[torch.isfinite(scores)]
    scale = 1.0
    if normalize_scores and finite.numel() > 1:
        scale = float(finite.std()) + 1e-8
    best = scores.max()
    if best == float("inf"):  # an infinitely good candidate takes all the weight
        return (scores == best).to(torch.float32) / (scores == best).sum()
    return torch.softmax((scores - best) / (temperature * scale), dim=0)


class MPPIPlanner(IterativeSamplingPlanner):
    """MPPI planner.

    Args:
        population: candidates sampled per iteration.
        iterations: weighted updates per decision.
        temperature: softmax temperature (in units of the scores' std when ``normalize_scores``).
        noise_std: std of continuous samples as a fraction of the half range (high - low) / 2.
        adapt_std: refit the continuous std to the weighted spread each iteration (TD-MPC2 style).
        min_std: floor of the adapted std as a fraction of the half range.
        momentum: weight of the old mean/probabilities in each update, in [0, 1).
        probability_floor: minimum probability of every discrete action after an update.
        normalize_scores: divide scores by their std before the softmax.
        repeats: stochastic evaluations averaged per candidate.
        warm_start_shift: steps the previous plan is shifted at the next call.
        seed: seed of the planner's generator.
    """

    def __init__(
        self,
        population: int = 64,
        iterations: int = 2,
        temperature: float = 0.5,
        noise_std: float = 1.0,
        adapt_std: bool = True,
        min_std: float = 0.05,
        momentum: float = 0.0,
        probability_floor: float = 0.01,
        normalize_scores: bool = True,
        repeats: int = 1,
        warm_start_shift: int = 1,
        seed: int = 0,
    ) -> None:
        name = "MPPIPlanner"
        self.population = check_positive_int("population", population, name)
        if self.population < 2:
            raise ValueError(f"{name}: population must be at least 2 to weight candidates, got {population}")
        self.iterations = check_positive_int("iterations", iterations, name)
        self.repeats = check_positive_int("repeats", repeats, name)
        if float(temperature) <= 0.0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}; try 0.5")
        if float(noise_std) <= 0.0 or float(min_std) < 0.0:
            raise ValueError(f"{name}: noise_std must be > 0 and min_std >= 0, got {noise_std}, {min_std}")
        self.temperature = float(temperature)
        self.noise_std = float(noise_std)
        self.adapt_std = bool(adapt_std)
        self.min_std = float(min_std)
        self.momentum = check_fraction("momentum", momentum, name)
        self.probability_floor = check_fraction("probability_floor", probability_floor, name)
        self.normalize_scores = bool(normalize_scores)
        super().__init__(seed=seed, warm_start_shift=warm_start_shift)

    @property
    def initial_std(self) -> float:
        return self.noise_std

    def _refit_gaussian(self, candidates, scores, mean, std, half_range):
        weights = softmax_weights(scores, self.temperature, self.normalize_scores).view(-1, 1, 1)
        weighted_mean = (weights * candidates).sum(dim=0)
        if self.adapt_std:
            weighted_std = (weights * (candidates - weighted_mean) ** 2).sum(dim=0).sqrt()
            std = torch.maximum(weighted_std, self.min_std * half_range)
        return self.momentum * mean + (1 - self.momentum) * weighted_mean, std

    def _categorical_target(self, candidates, scores):
        weights = softmax_weights(scores, self.temperature, self.normalize_scores).view(-1, 1, 1)
        return (weights * candidates).sum(dim=0)  # softmax-weighted action frequencies, rows sum to 1
