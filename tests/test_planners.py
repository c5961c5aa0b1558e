"""Planners against objectives whose optimum is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from planners import (
    ActionSpec,
    CallableObjective,
    CEMPlanner,
    MPPIPlanner,
    NWMPlanner,
    Planner,
    RandomShootingPlanner,
    score_candidates,
)

HORIZON = 4
CONTINUOUS = ActionSpec.continuous([-1.0, -1.0], [1.0, 1.0])
DISCRETE = ActionSpec.discrete(5)
# a target inside the bounds, different per step and per dimension
TARGET = torch.tensor([[0.3, -0.5], [0.6, 0.1], [-0.7, 0.2], [0.0, 0.8]])
# the optimal discrete action per step
TARGET_INDICES = torch.tensor([3, 0, 4, 1])


def quadratic(actions: torch.Tensor) -> torch.Tensor:
    """-(squared distance to TARGET): maximum 0 at actions = TARGET."""
    return -((actions - TARGET) ** 2).sum(dim=(1, 2))


def categorical(actions: torch.Tensor) -> torch.Tensor:
    """+1 for every step whose one-hot action is the target one; maximum HORIZON."""
    return actions[:, torch.arange(HORIZON), TARGET_INDICES].sum(dim=1)


@pytest.mark.parametrize(
    "planner",
    [
        CEMPlanner(population=200, elites=20, iterations=15, seed=1),
        MPPIPlanner(population=200, iterations=15, temperature=0.3, seed=1),
    ],
    ids=["cem", "mppi"],
)
def test_continuous_planner_finds_quadratic_optimum(planner: Planner) -> None:
    plan = planner.plan(quadratic, CONTINUOUS, HORIZON)
    assert plan.shape == (HORIZON, 2)
    # tolerance: every action within 0.05 of the optimum (bounds span 2.0)
    assert torch.max(torch.abs(plan - TARGET)).item() < 0.05


@pytest.mark.parametrize(
    "planner",
    [
        CEMPlanner(population=100, elites=10, iterations=6, seed=2),
        MPPIPlanner(population=100, iterations=6, temperature=0.3, seed=2),
    ],
    ids=["cem", "mppi"],
)
def test_discrete_planner_finds_categorical_optimum(planner: Planner) -> None:
    plan = planner.plan(categorical, DISCRETE, HORIZON)
    assert plan.shape == (HORIZON, 5)
    assert plan.dtype == torch.float32
    assert torch.equal(plan.sum(dim=1), torch.ones(HORIZON)), "a discrete plan is one-hot per step"
    assert torch.equal(plan.argmax(dim=1), TARGET_INDICES)


def test_cem_warm_start_shifts_previous_plan() -> None:
    planner = CEMPlanner(population=200, elites=20, iterations=15, seed=3, warm_start_shift=1)
    planner.plan(quadratic, CONTINUOUS, HORIZON)
    warm = planner._warm_start(torch.zeros(HORIZON, 2))
    # the previous mean shifted one step to the left, the tail from the cold start (zeros)
    assert torch.allclose(warm[:-1], TARGET[1:], atol=0.05)
    assert torch.equal(warm[-1], torch.zeros(2))
    planner.reset()
    assert torch.equal(planner._warm_start(torch.zeros(HORIZON, 2)), torch.zeros(HORIZON, 2))


def test_random_shooting_beats_the_mean_of_random() -> None:
    planner = RandomShootingPlanner(population=256, seed=4)
    random_scores = quadratic(RandomShootingPlanner(population=256, seed=5).sample(CONTINUOUS, HORIZON))
    best_score = quadratic(planner.plan(quadratic, CONTINUOUS, HORIZON).unsqueeze(0)).item()
    # uniform actions on [-1, 1]: E[(a - t)^2] = 1/3 + t^2 per entry -> mean of random is about -5.3
    expected_random = -sum(1 / 3 + t**2 for t in TARGET.flatten().tolist())
    assert abs(random_scores.mean().item() - expected_random) < 0.4
    assert best_score > random_scores.mean().item() + 2.0
    assert best_score >= random_scores.max().item() - 1.5


def test_nan_scores_rank_worst() -> None:
    scores = score_candidates(lambda a: torch.tensor([1.0, float("nan"), -5.0]), torch.zeros(3, 2, 2))
    assert scores[1] == float("-inf")
    assert torch.argsort(scores, descending=True).tolist() == [0, 2, 1]

    # a NaN in one repeat makes that candidate the worst
    def noisy(actions: torch.Tensor) -> torch.Tensor:
        values = torch.tensor([3.0, 2.0, 1.0, float("nan"), 2.0, 1.0])
        return values[: actions.shape[0]]

    assert score_candidates(noisy, torch.zeros(3, 1, 1), repeats=2).tolist() == [float("-inf"), 2.0, 1.0]

    # NaN on the half-space a[0, 0] > 0, which holds the optimum (TARGET[0, 0] = 0.3): if NaN ranked
    # best (or as ~0, above every finite score here) the plan would lie in it; ranked worst, the
    # elites and so their mean stay in the convex half-space a[0, 0] <= 0
    def nan_near_optimum(actions: torch.Tensor) -> torch.Tensor:
        scores = quadratic(actions)
        return torch.where(actions[:, 0, 0] > 0, torch.full_like(scores, float("nan")), scores)

    for planner in (CEMPlanner(population=200, elites=20, iterations=10, seed=6), RandomShootingPlanner(seed=6)):
        plan = planner.plan(nan_near_optimum, CONTINUOUS, HORIZON)
        assert plan[0, 0].item() <= 0.0
        assert abs(plan[0, 1].item() - TARGET[0, 1].item()) < (0.1 if isinstance(planner, CEMPlanner) else 1.0)


def test_all_nan_scores_raise() -> None:
    with pytest.raises(ValueError, match="no finite score"):
        score_candidates(lambda a: torch.full((a.shape[0],), float("nan")), torch.zeros(4, 2, 2))


def test_objective_with_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match="one score per candidate"):
        score_candidates(lambda a: torch.zeros(a.shape[0], 2), torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="one score per candidate"):
        CallableObjective(lambda a: [0.0])(torch.zeros(3, 2, 2))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CEMPlanner(population=4, elites=8), "elites .* must not exceed population"),
        (lambda: CEMPlanner(iterations=0), "iterations must be a positive integer"),
        (lambda: CEMPlanner(momentum=1.0), "momentum"),
        (lambda: MPPIPlanner(temperature=0.0), "temperature"),
        (lambda: MPPIPlanner(population=1), "population"),
        (lambda: RandomShootingPlanner(population=0), "population"),
        (lambda: NWMPlanner(num_samples=3, top_k=5), "top_k"),
        (lambda: NWMPlanner(mu=[0.0], sigma=[0.1, 0.1]), "same length"),
    ],
)
def test_bad_configs_raise(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("planner", [CEMPlanner(), MPPIPlanner(), RandomShootingPlanner(), NWMPlanner()])
@pytest.mark.parametrize("horizon", [0, -2])
def test_bad_horizon_raises_before_any_objective_call(planner: Planner, horizon: int) -> None:
    calls = []
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        planner.plan(lambda a: calls.append(1) or quadratic(a), CONTINUOUS, horizon)
    assert calls == []


def test_nwm_planner_constant_deltas_and_elite_mean() -> None:
    spec = ActionSpec.continuous([-1.0, -1.0, -math.pi], [1.0, 1.0, math.pi])
    target = torch.tensor([-0.1, 0.05, -0.08])
    seen = []

    def objective(actions: torch.Tensor) -> torch.Tensor:
        seen.append(actions.clone())
        return -((actions[:, -1] - target) ** 2).sum(dim=1)

    planner = NWMPlanner(num_samples=120, top_k=5, repeats=3, seed=7)
    plan = planner.plan(objective, spec, 8)
    assert len(seen) == 1 and seen[0].shape == (360, 8, 3), "one batch of 120 proposals x 3 repeats"
    assert torch.equal(seen[0][:, :1].expand(-1, 8, -1), seen[0]), "proposals are constant over the horizon"
    assert torch.equal(plan, plan[:1].expand(8, -1))
    # the plan is the mean of the 5 proposals closest to the target
    proposals = seen[0][:120, 0]
    elites = proposals[torch.topk(-((proposals - target) ** 2).sum(dim=1), 5).indices]
    assert torch.allclose(plan[0], elites.mean(dim=0), atol=1e-6)
    # better than NWM's prior mean (-0.1, 0, 0) itself
    assert ((plan[0] - target) ** 2).sum() < ((torch.tensor([-0.1, 0.0, 0.0]) - target) ** 2).sum()


def test_nwm_planner_discrete_picks_best_constant_action() -> None:
    def objective(actions: torch.Tensor) -> torch.Tensor:
        return actions[:, :, 2].sum(dim=1) - actions[:, :, 0].sum(dim=1)

    plan = NWMPlanner(repeats=1).plan(objective, DISCRETE, 3)
    assert torch.equal(plan.argmax(dim=1), torch.tensor([2, 2, 2]))


def test_nwm_planner_dimension_mismatch_is_clear() -> None:
    with pytest.raises(ValueError, match="set planner.mu and planner.sigma"):
        NWMPlanner().plan(quadratic, CONTINUOUS, 2)
