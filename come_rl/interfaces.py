"""The contracts between the layers of come_rl.

Every layer talks to its neighbours through the small types here, so that a planner never imports
the world model, an environment never imports a planner, and a user can plug in their own part.

Conventions used across the whole toolkit
-----------------------------------------
* Frames from environments and data sets: ``uint8`` arrays ``(height, width, 3)``.
  Frames inside the world model: ``float32`` tensors ``(channels, height, width)`` in ``[-1, 1]``.
* Actions are always float vectors of size ``action_dim``. Discrete action spaces (Memory Maze,
  Memory Cards) are one-hot encoded (``action_dim = n``); continuous ones (RECON's
  ``(dx, dy, dyaw)``) are used as they are. :class:`ActionSpec` converts between the two.
* Time alignment: ``frames[t + 1] = env.step(frames[t], actions[t])``; an episode of ``T`` steps has
  ``T + 1`` frames and ``T`` actions. ``WorldModel.observe(frame, action)`` takes the action that
  *led to* ``frame`` (``None`` for the first frame of an episode).
* Poses are ``(x, y, yaw)`` float arrays in the world frame (metres or maze units, radians).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class ActionSpec:
    """What the world model and the planners need to know of an action space.

    Attributes:
        kind: ``"discrete"`` (one-hot vectors of size ``n``) or ``"continuous"``.
        dim: size of one action vector (``n`` for discrete spaces).
        low, high: bounds of continuous actions (per dimension); ignored for discrete spaces.
    """

    kind: str
    dim: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("discrete", "continuous"):
            raise ValueError(f"ActionSpec.kind must be 'discrete' or 'continuous', got {self.kind!r}")
        if self.dim <= 0:
            raise ValueError(f"ActionSpec.dim must be positive, got {self.dim}")
        if self.kind == "continuous":
            if self.low is None or self.high is None or len(self.low) != self.dim or len(self.high) != self.dim:
                raise ValueError("a continuous ActionSpec needs low and high with one bound per dimension")

    @staticmethod
    def discrete(n: int) -> ActionSpec:
        return ActionSpec("discrete", int(n))

    @staticmethod
    def continuous(low, high) -> ActionSpec:
        low, high = tuple(float(v) for v in low), tuple(float(v) for v in high)
        return ActionSpec("continuous", len(low), low, high)

    def encode(self, env_action) -> np.ndarray:
        """Env action (an int for discrete spaces, a vector for continuous ones) -> float vector (dim,)."""
        if self.kind == "discrete":
            index = int(env_action)
            if not 0 <= index < self.dim:
                raise ValueError(f"discrete action {index} is outside [0, {self.dim}); pass an index below {self.dim}")
            vector = np.zeros(self.dim, dtype=np.float32)
            vector[index] = 1.0
            return vector
        vector = np.asarray(env_action, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(f"continuous action must have shape ({self.dim},), got {vector.shape}")
        return vector

    def decode(self, vector) -> int | np.ndarray:
        """Float vector (dim,) -> env action (argmax index for discrete spaces, clipped vector otherwise)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(f"action vector must have shape ({self.dim},), got {vector.shape}")
        if self.kind == "discrete":
            return int(np.argmax(vector))
        return np.clip(vector, self.low, self.high)


# objective(actions (batch, horizon, action_dim)) -> scores (batch,); higher is better.
Objective = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Planner(Protocol):
    """A planner optimises an action sequence against an objective; it never sees the world model."""

    def plan(self, objective: Objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        """Return the best action sequence found, shape (horizon, action_dim)."""
        ...

    def reset(self) -> None:
        """Forget warm-start state between episodes. A planner that draws random numbers may also take
        ``reset(seed=...)``: ``MPCAgent`` then hands it each episode's seed (see ``come_rl.seeding``)."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """Anything that predicts the noise of a noisy sample: one expert or a composition of experts."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (batch, channels, height, width), t: (batch,) in [0, 1] -> eps: same shape as x_t."""
        ...


@runtime_checkable
class WorldModelProtocol(Protocol):
    """What agents, wrappers and objectives may call on a world model."""

    action_spec: ActionSpec

    def reset(self) -> None: ...

    def observe(self, frame: np.ndarray, action: np.ndarray | None = None, pose: np.ndarray | None = None) -> None: ...

    def memorize(self, steps: int | None = None) -> dict: ...

    def imagine(self, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """actions: (batch, horizon, action_dim) -> frames (batch, horizon, 3, height, width) in [-1, 1].

        A model whose ``shares_prefixes`` is true also takes ``streams=`` and ``lengths=`` (``WorldModel.imagine``):
        rows of one stream that begin with the same actions share one sample until they part. One whose
        ``skips_last_frame`` is true also takes ``last_frame=False``: the last step's pose without its frame."""
        ...
