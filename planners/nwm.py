"""The planner of Navigation World Models (NWM), the reference protocol of the paper's RECON table.

docs/design.md, "The reference protocol for goal reaching": per goal, sample ``num_samples`` constant
deltas ``(dx, dy, dyaw) ~ N(mu, sigma)``, repeat each over the whole horizon, roll every candidate
out ``repeats`` times (stochastic world model) and average the objective (-LPIPS of the last imagined
frame to the goal), take the ``top_k`` best, refit mu and sigma to them, for ``optimization_steps``
steps (1 in NWM); the plan is the elite mean repeated over the horizon. Defaults are NWM's RECON
values. The planner keeps no state between calls (each goal starts from mu, sigma).

For discrete action spaces the proposals are constant actions too: every one of the ``n`` actions
repeated over the horizon (or ``num_samples`` of them drawn without replacement when fewer), and the
plan is the best-scoring one (a top-k mean of distinct one-hot proposals would be a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from planners.base import (
    ActionSpec,
    Objective,
    SamplingPlanner,
    action_bounds,
    check_positive_int,
    check_subset_size,
    score_candidates,
)


class NWMPlanner(SamplingPlanner):
    """Constant-delta CEM of NWM.

    Args:
        mu: initial mean of the per-step delta, one entry per action dimension (RECON: [-0.1, 0, 0]).
        sigma: initial std of the delta (RECON: [0.02, 0.1, 0.1]).
        num_samples: constant-delta proposals per optimisation step (NWM: 120).
        top_k: elites the mean and std are refitted to (NWM: 5).
        repeats: stochastic rollouts averaged per proposal (NWM: 3).
        optimization_steps: refits (NWM: 1).
        seed: seed of the planner's generator.
    """

    def __init__(
        self,
        mu: Sequence[float] = (-0.1, 0.0, 0.0),
        sigma: Sequence[float] = (0.02, 0.1, 0.1),
        num_samples: int = 120,
        top_k: int = 5,
        repeats: int = 3,
        optimization_steps: int = 1,
        seed: int = 0,
    ) -> None:
        name = "NWMPlanner"
        self.num_samples = check_positive_int("num_samples", num_samples, name)
        self.top_k = check_subset_size("top_k", top_k, "num_samples", self.num_samples, name)
        self.repeats = check_positive_int("repeats", repeats, name)
        self.optimization_steps = check_positive_int("optimization_steps", optimization_steps, name)
        self.mu = torch.tensor([float(v) for v in mu], dtype=torch.float32)
        self.sigma = torch.tensor([float(v) for v in sigma], dtype=torch.float32)
        if self.mu.ndim != 1 or self.mu.shape != self.sigma.shape:
            raise ValueError(f"{name}: mu and sigma must be lists of the same length, got {list(mu)} and {list(sigma)}")
        if (self.sigma < 0).any():
            raise ValueError(f"{name}: sigma must be >= 0, got {list(sigma)}")
        super().__init__(seed=seed, warm_start_shift=0)

    def plan(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """Return the elite-mean constant delta repeated over the horizon, shape (horizon, action_dim)."""
        horizon = self._check_spec(action_spec, horizon)
        if action_spec.kind == "discrete":
            return self._plan_discrete(objective, action_spec, horizon)
        if self.mu.shape[0] != action_spec.dim:
            raise ValueError(
                f"NWMPlanner: mu/sigma have {self.mu.shape[0]} entries but actions have {action_spec.dim} "
                f"dimensions; set planner.mu and planner.sigma to lists of {action_spec.dim} values"
            )
        low, high = action_bounds(action_spec)
        mu, sigma = self.mu.clone(), self.sigma.clone()
        for _ in range(self.optimization_steps):
            noise = torch.randn((self.num_samples, action_spec.dim), generator=self.generator)
            deltas = torch.maximum(torch.minimum(mu + sigma * noise, high), low)  # (num_samples, A)
            candidates = deltas.unsqueeze(1).expand(-1, horizon, -1).contiguous()
            scores = score_candidates(objective, candidates, self.repeats)
            elite_deltas = deltas[torch.topk(scores, self.top_k).indices]
            mu = elite_deltas.mean(dim=0)
            sigma = elite_deltas.std(dim=0, unbiased=False)
        return torch.maximum(torch.minimum(mu, high), low).expand(horizon, -1).clone()

    def _plan_discrete(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        num_actions = action_spec.dim
        if self.num_samples >= num_actions:
            indices = torch.arange(num_actions)
        else:
            indices = torch.randperm(num_actions, generator=self.generator)[: self.num_samples]
        one_hot = torch.nn.functional.one_hot(indices, num_actions).to(torch.float32)
        candidates = one_hot.unsqueeze(1).expand(-1, horizon, -1).contiguous()
        scores = score_candidates(objective, candidates, self.repeats)
        return candidates[int(torch.argmax(scores))].clone()
