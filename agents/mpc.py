"""Model predictive control: plan with the world model's imagination, execute the first action(s), replan.

The agent owns a world model, a planner and an objective factory; it never feeds the world model
(the ``envs.memory_wrapper.WorldModelMemoryWrapper`` does, on every env step), so the world model's
memory is up to date whenever the agent plans.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from come_rl.interfaces import Objective, Planner, WorldModelProtocol
from come_rl.seeding import accepts_keyword, torch_generator

# objective_factory(world_model=..., goal_frame=...) -> objective
ObjectiveFactory = Callable[..., Objective]


class MPCAgent:
    """Replan every ``replan_every`` steps over ``horizon`` steps and execute the plan's first actions.

    Args:
        world_model: a ``WorldModelProtocol`` (its ``action_spec`` decodes plans into env actions).
        planner: a ``Planner`` (``plan(objective, action_spec, horizon)``, ``reset()``).
        objective_factory: called as ``objective_factory(world_model=..., goal_frame=...)`` on every
            ``reset``/``set_goal``; a Hydra ``_partial_`` objective config is such a factory.
        horizon: planning horizon in env steps.
        replan_every: env steps executed from one plan before the next (1 <= replan_every <= horizon).
    """

    def __init__(self, world_model: WorldModelProtocol, planner: Planner, objective_factory: ObjectiveFactory,
                 horizon: int, replan_every: int = 1) -> None:
        if isinstance(horizon, bool) or int(horizon) != horizon or int(horizon) <= 0:
            raise ValueError(f"MPCAgent: horizon must be a positive integer, got {horizon!r}; set agent.horizon >= 1")
        if isinstance(replan_every, bool) or not 1 <= int(replan_every) <= int(horizon):
            raise ValueError(
                f"MPCAgent: replan_every must be in [1, horizon={horizon}], got {replan_every!r}; "
                "a plan has only `horizon` actions to execute"
            )
        if not callable(getattr(planner, "plan", None)) or not callable(getattr(planner, "reset", None)):
            raise TypeError(f"planner {type(planner).__name__} must have plan(objective, action_spec, horizon) and reset()")
        if not callable(objective_factory):
            raise TypeError("objective_factory must be callable: objective_factory(world_model=..., goal_frame=...)")
        self.world_model = world_model
        self.planner = planner
        self.objective_factory = objective_factory
        self.horizon = int(horizon)
        self.replan_every = int(replan_every)
        self.objective: Objective | None = None
        self.last_plan: torch.Tensor | None = None  # (horizon, action_dim)
        self.last_plan_seconds = 0.0
        self.replanned = False
        self._queue: list[torch.Tensor] = []

    def set_goal(self, goal_frame: Any, imagine_seed: int | None = None) -> None:
        """Build the objective for a new goal (uint8 (H, W, 3) frame, or whatever the factory takes).

        ``imagine_seed``: the objective imagines from a generator with this seed (where the factory takes
        ``generator=``, as the goal objectives do); without it, imagination draws from torch's global generator.
        """
        kwargs = {}
        if imagine_seed is not None and accepts_keyword(self.objective_factory, "generator"):
            kwargs["generator"] = torch_generator(imagine_seed)
        self.objective = self.objective_factory(world_model=self.world_model, goal_frame=goal_frame, **kwargs)

    def reset(self, goal_frame: Any = None, planner_seed: int | None = None, imagine_seed: int | None = None) -> None:
        """Start an episode: forget the planner's warm start and the queued actions; set the goal if given.

        ``planner_seed`` / ``imagine_seed`` (``come_rl.seeding.EpisodeSeeds``) re-seed the planner (if its ``reset``
        takes ``seed=``) and the objective's imagination, so the episode's decisions depend on the run seed only.
        """
        if planner_seed is not None and accepts_keyword(self.planner.reset, "seed"):
            self.planner.reset(seed=planner_seed)
        else:
            self.planner.reset()
        self._queue = []
        self.last_plan = None
        if goal_frame is not None:
            self.set_goal(goal_frame, imagine_seed=imagine_seed)

    def act(self, observation: Any = None, info: dict | None = None) -> int | Any:
        """Return the next env action (an int for discrete spaces, a clipped vector otherwise).

        The observation has already reached the world model through the memory wrapper; it is not
        needed here, but kept in the signature for agents that use it.
        """
        if self.objective is None:
            raise RuntimeError("MPCAgent has no goal/objective: call agent.reset(goal_frame=...) or set_goal() first")
        self.replanned = not self._queue
        if self.replanned:
            start = time.perf_counter()
            plan = self.planner.plan(self.objective, self.world_model.action_spec, self.horizon)
            self.last_plan_seconds = time.perf_counter() - start
            plan = torch.as_tensor(plan, dtype=torch.float32)
            expected = (self.horizon, self.world_model.action_spec.dim)
            if tuple(plan.shape) != expected:
                raise ValueError(f"planner {type(self.planner).__name__} returned shape {tuple(plan.shape)}, expected {expected}")
            self.last_plan = plan
            self._queue = list(plan[: self.replan_every])
        return self.world_model.action_spec.decode(self._queue.pop(0).numpy())
