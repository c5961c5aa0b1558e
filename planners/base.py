"""The planner contract and the helpers every planner of come_rl shares.

A planner optimises an action sequence against an objective and never sees the world model:

    plan = planner.plan(objective, action_spec, horizon)      # (horizon, action_dim)
    scores = objective(actions)                               # (batch, horizon, action_dim) -> (batch,)

Scores are "higher is better". A NaN score (a world model that diverged, an objective that broke)
ranks *worst*, never as a neutral ~0: :func:`score_candidates` replaces NaN by ``-inf`` before any
planner ranks, weights or averages.
"""

from __future__ import annotations

import torch

from come_rl.interfaces import ActionSpec, Objective, Planner

__all__ = [
    "ActionSpec",
    "Objective",
    "Planner",
    "SamplingPlanner",
    "action_bounds",
    "check_positive_int",
    "one_hot_argmax",
    "sample_gaussian_actions",
    "sample_one_hot_actions",
    "sanitize_scores",
    "score_candidates",
]


def check_positive_int(name: str, value: int, owner: str) -> int:
    """Return ``int(value)`` or raise a ValueError that names the setting and the fix."""
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}; set {name}=1 or more")
    return int(value)


def check_fraction(name: str, value: float, owner: str) -> float:
    """Return ``float(value)`` for a setting in [0, 1) or raise a ValueError that names it."""
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")
    return float(value)


def check_subset_size(name: str, value: int, of_name: str, of_value: int, owner: str) -> int:
    """``value`` (e.g. elites) as a positive integer no larger than ``of_value`` (e.g. population)."""
    value = check_positive_int(name, value, owner)
    if value > of_value:
        raise ValueError(f"{owner}: {name} ({value}) must not exceed {of_name} ({of_value}); "
                         f"lower planner.{name} or raise planner.{of_name}")
    return value


def sanitize_scores(scores: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, so that a broken candidate ranks worst in top-k, argmax and softmax weights."""
    scores = scores.detach().to(torch.float32)
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)


def check_repeats_and_sharing(repeats: int, share_prefixes: bool, repeats_key: str = "the planner's repeats",
                              share_key: str = "the objective's share_prefixes",
                              fix_key: str = "the objective's repeats") -> None:
    """A planner's repeats ask for independent samples of every candidate; an objective that shares one sample among
    candidates with the same actions would make them copies: refused, naming both settings and the fix."""
    if repeats > 1 and share_prefixes:
        raise ValueError(f"{repeats_key}={repeats} asks for independent samples of every candidate, but {share_key}="
                         "true shares one sample among candidates with the same actions (the repeats would be copies): "
                         f"set {fix_key} instead, or {share_key}=false")


def score_candidates(objective: Objective, actions: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Score candidate action sequences, averaging over ``repeats`` stochastic evaluations.

    The repeats are one batch (every candidate tiled ``repeats`` times), so a stochastic world model
    draws independent noise per copy and the objective runs once.

    Args:
        objective: ``(batch, horizon, action_dim) -> (batch,)``, higher is better.
        actions: (num_candidates, horizon, action_dim) candidate sequences.
        repeats: how many evaluations to average per candidate.
    Returns:
        (num_candidates,) float32 scores with NaN replaced by -inf (a NaN in any repeat makes the
        candidate's mean NaN, so it ranks worst).
    """
    num_candidates = actions.shape[0]
    check_repeats_and_sharing(repeats, getattr(objective, "share_prefixes", False))
    batch = actions.repeat(repeats, 1, 1) if repeats > 1 else actions
    scores = objective(batch)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.shape != (batch.shape[0],):
        raise ValueError(
            f"the objective must return one score per candidate, shape ({batch.shape[0]},), got "
            f"{tuple(scores.shape)}; reduce over every other dimension inside the objective"
        )
    scores = scores.detach().to(torch.float32).cpu()
    if repeats > 1:
        # rows are [all candidates, repeat 0], [all candidates, repeat 1], ...
        scores = scores.view(repeats, num_candidates).mean(dim=0)
    scores = sanitize_scores(scores)
    if not torch.isfinite(scores).any() and not (scores == float("inf")).any():
        raise ValueError(
            f"the objective returned no finite score for any of the {num_candidates} candidates "
            "(NaN counts as worst); check the world model's imagined frames and the objective"
        )
    return scores


def action_bounds(action_spec: ActionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) float32 tensors of shape (action_dim,) of a continuous action spec."""
    if action_spec.kind != "continuous":
        raise ValueError("action_bounds needs a continuous ActionSpec")
    return (
        torch.tensor(action_spec.low, dtype=torch.float32),
        torch.tensor(action_spec.high, dtype=torch.float32),
    )


def sample_gaussian_actions(
    mean: torch.Tensor, std: torch.Tensor, count: int, low: torch.Tensor, high: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw ``count`` sequences from N(mean, std^2), clipped to the action bounds.

    mean, std: (horizon, action_dim); low, high: (action_dim,). Returns (count, horizon, action_dim).
    """
    noise = torch.randn((count, *mean.shape), generator=generator)
    return torch.maximum(torch.minimum(mean + std * noise, high), low)


def sample_one_hot_actions(probs: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``count`` one-hot sequences from per-step categorical distributions.

    probs: (horizon, n) rows summing to 1. Returns (count, horizon, n) float32 one-hot vectors.
    """
    horizon, num_actions = probs.shape
    indices = torch.multinomial(probs, count, replacement=True, generator=generator)  # (horizon, count)
    one_hot = torch.zeros(count, horizon, num_actions)
    one_hot.scatter_(2, indices.T.unsqueeze(-1), 1.0)
    return one_hot


def one_hot_argmax(probs: torch.Tensor) -> torch.Tensor:
    """(horizon, n) probabilities -> (horizon, n) one-hot float plan of the most likely actions."""
    plan = torch.zeros_like(probs, dtype=torch.float32)
    plan.scatter_(1, probs.argmax(dim=1, keepdim=True), 1.0)
    return plan


class SamplingPlanner:
    """Shared state of the sampling planners: a seeded generator and the warm-start memory.

    Subclasses implement :meth:`plan`. ``warm_start_shift`` is how many steps the previous plan is
    shifted at the next call (the agent executes that many actions between replans).
    """

    def __init__(self, seed: int = 0, warm_start_shift: int = 1) -> None:
        self.seed = int(seed)
        if int(warm_start_shift) < 0:
            raise ValueError(f"warm_start_shift must be >= 0, got {warm_start_shift}; use 0 to disable shifting")
        self.warm_start_shift = int(warm_start_shift)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._previous: torch.Tensor | None = None  # last distribution parameter (mean or probs)

    def reset(self, seed: int | None = None) -> None:
        """Forget the warm start between episodes; ``seed`` re-seeds the generator.

        Without a seed the generator keeps running, so episodes differ but episode k's candidates depend on every
        episode before it; ``come_rl.run`` passes each episode its own seed (``come_rl.seeding``), so an episode
        draws the same candidates whether it runs first, last or alone (a resumed evaluation).
        """
        self._previous = None
        if seed is not None:
            self.seed = int(seed)
            self.generator = torch.Generator().manual_seed(self.seed)

    def _warm_start(self, initial: torch.Tensor) -> torch.Tensor:
        """The previous mean/probs shifted by ``warm_start_shift`` steps, the tail from ``initial``.

        initial: (horizon, action_dim) the cold-start parameter. TD-MPC2's warm start: the plan made
        one decision ago is still mostly right, shifted by the steps executed since.
        """
        previous = self._previous
        if previous is None or previous.shape != initial.shape:
            return initial.clone()
        shift = min(self.warm_start_shift, initial.shape[0])
        warm = initial.clone()
        warm[: initial.shape[0] - shift] = previous[shift:]
        return warm

    def _check_spec(self, action_spec: ActionSpec, horizon: int) -> int:
        if not isinstance(action_spec, ActionSpec):
            raise TypeError(f"action_spec must be a come_rl.interfaces.ActionSpec, got {type(action_spec).__name__}")
        return check_positive_int("horizon", horizon, type(self).__name__)


class IterativeSamplingPlanner(SamplingPlanner):
    """The skeleton CEM and MPPI share: sample a population from a per-step distribution (a diagonal Gaussian over
    continuous actions, a categorical over one-hot discrete ones), score it, refit, ``iterations`` times, starting from
    the previous call's distribution shifted (warm start); return the mean (continuous, clipped to the bounds) or the
    most likely one-hot action per step (discrete).

    Subclasses set ``population``, ``iterations``, ``repeats``, ``momentum``, ``probability_floor``, ``initial_std``
    (a fraction of the half range) and say how scored candidates refit the distribution: :meth:`_refit_gaussian` and
    :meth:`_categorical_target`.
    """

    population: int
    iterations: int
    repeats: int
    momentum: float
    probability_floor: float
    initial_std: float

    def plan(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """Return the plan after ``iterations`` refits, shape (horizon, action_dim)."""
        horizon = self._check_spec(action_spec, horizon)
        if action_spec.kind == "continuous":
            return self._plan_continuous(objective, action_spec, horizon)
        return self._plan_discrete(objective, action_spec, horizon)

    def _refit_gaussian(self, candidates: torch.Tensor, scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        half_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(population, horizon, dim) candidates and their (population,) scores -> the next (mean, std)."""
        raise NotImplementedError

    def _categorical_target(self, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(population, horizon, n) one-hot candidates and their scores -> (horizon, n) action frequencies that the
        probabilities move towards (by 1 - momentum)."""
        raise NotImplementedError

    def _plan_continuous(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        low, high = action_bounds(action_spec)
        half_range = (high - low) / 2
        mean = self._warm_start(((low + high) / 2).expand(horizon, -1))
        std = (self.initial_std * half_range).expand(horizon, -1).clone()
        for _ in range(self.iterations):
            candidates = sample_gaussian_actions(mean, std, self.population, low, high, self.generator)
            scores = score_candidates(objective, candidates, self.repeats)
            mean, std = self._refit_gaussian(candidates, scores, mean, std, half_range)
        self._previous = mean.clone()
        return torch.maximum(torch.minimum(mean, high), low)

    def _plan_discrete(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        num_actions = action_spec.dim
        probs = self._warm_start(torch.full((horizon, num_actions), 1.0 / num_actions))
        # mix in a uniform floor: p <- (1 - n f) p + f keeps every action at >= f and rows summing to 1
        floor = min(self.probability_floor, 1.0 / num_actions)
        for _ in range(self.iterations):
            candidates = sample_one_hot_actions(probs, self.population, self.generator)
            scores = score_candidates(objective, candidates, self.repeats)
            probs = self.momentum * probs + (1 - self.momentum) * self._categorical_target(candidates, scores)
            probs = (1 - num_actions * floor) * probs + floor
        self._previous = probs.clone()
        return one_hot_argmax(probs)
