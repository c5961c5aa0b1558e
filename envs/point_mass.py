"""A point mass on a plane: a tiny gymnasium env and its exact (closed-form) world model.

The world model implements ``come_rl.interfaces.WorldModelProtocol`` with no learning at all: its
``imagine`` integrates the same dynamics as the env and renders the same frames, so a planner and an
agent can be tested against known answers, and the CLI runs end to end in seconds
(``python -m come_rl.run env=point_mass model=point_mass``).

World: position (x, y) in [-bound, bound]^2; an action moves it by (dx, dy) clipped to
[-max_step, max_step] per axis, then the position is clipped to the square. Discrete variant: five
actions (stay, +x, -x, +y, -y), each a move of ``max_step``. The frame is a Gaussian blob of std
``blob_sigma`` (world units) centred on the position, red on a dark background, ``size`` x ``size``.
Pose in ``info["pose"]``: (x, y, yaw = 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from come_rl.conventions import tensor_to_frames
from come_rl.interfaces import ActionSpec

# direction of each discrete action, in units of max_step
DISCRETE_DIRECTIONS = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=np.float32)


class PointMassDynamics:
    """Dynamics and renderer shared by the env and the world model (batched, torch)."""

    def __init__(self, size: int = 32, max_step: float = 0.2, bound: float = 1.0, blob_sigma: float = 0.25,
                 discrete: bool = False) -> None:
        if int(size) < 4:
            raise ValueError(f"size must be at least 4 pixels, got {size}")
        if float(max_step) <= 0 or float(bound) <= 0 or float(blob_sigma) <= 0:
            raise ValueError("max_step, bound and blob_sigma must be positive")
        self.size = int(size)
        self.max_step = float(max_step)
        self.bound = float(bound)
        self.blob_sigma = float(blob_sigma)
        self.discrete = bool(discrete)
        if self.discrete:
            self.action_spec = ActionSpec.discrete(len(DISCRETE_DIRECTIONS))
        else:
            self.action_spec = ActionSpec.continuous([-self.max_step] * 2, [self.max_step] * 2)
        # pixel centres: column j <-> x, row i <-> y (row 0 at y = +bound, so "up" is +y)
        centres = -self.bound + (torch.arange(self.size, dtype=torch.float32) + 0.5) * (2 * self.bound / self.size)
        self.pixel_x = centres.view(1, -1)
        self.pixel_y = centres.flip(0).view(-1, 1)

    def displacement(self, action_vectors: torch.Tensor) -> torch.Tensor:
        """(..., action_dim) action vectors -> (..., 2) displacement, clipped to max_step per axis."""
        if self.discrete:
            return action_vectors @ (torch.from_numpy(DISCRETE_DIRECTIONS) * self.max_step)
        return action_vectors.clamp(-self.max_step, self.max_step)

    def step(self, positions: torch.Tensor, action_vectors: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions, (..., action_dim) actions -> (..., 2) next positions."""
        return (positions + self.displacement(action_vectors)).clamp(-self.bound, self.bound)

    def render(self, positions: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions -> (..., 3, size, size) float frames in [-1, 1]."""
        x = positions[..., 0, None, None]
        y = positions[..., 1, None, None]
        blob = torch.exp(-((self.pixel_x - x) ** 2 + (self.pixel_y - y) ** 2) / (2 * self.blob_sigma**2))
        red = 2 * blob - 1
        green = blob - 1
        blue = torch.full_like(blob, -0.8)
        return torch.stack([red, green, blue], dim=-3)

    def render_uint8(self, position: np.ndarray) -> np.ndarray:
        """(2,) position -> uint8 (size, size, 3) env frame."""
        frame = self.render(torch.as_tensor(position, dtype=torch.float32))
        return tensor_to_frames(frame)

    def locate(self, frame: np.ndarray) -> np.ndarray:
        """Estimate the position from a uint8 (size, size, 3) frame: the brightest red pixel's centre."""
        row, column = np.unravel_index(int(np.argmax(frame[..., 0])), frame.shape[:2])
        return np.array([float(self.pixel_x[0, column]), float(self.pixel_y[row, 0])], dtype=np.float32)


class PointMassEnv(gym.Env):
    """Gymnasium point mass. Observation: uint8 (size, size, 3) frame; ``info["pose"]`` = (x, y, 0).

    Args:
        size, max_step, bound, blob_sigma, discrete: see :class:`PointMassDynamics`.
        start_radius: the start position is uniform in [-start_radius, start_radius]^2.
        max_episode_steps: the episode is truncated after this many steps.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self, size: int = 32, max_step: float = 0.2, bound: float = 1.0, blob_sigma: float = 0.25,
                 discrete: bool = False, start_radius: float = 0.8, max_episode_steps: int = 100) -> None:
        self.dynamics = PointMassDynamics(size, max_step, bound, blob_sigma, discrete)
        self.start_radius = float(start_radius)
        self.max_episode_steps = int(max_episode_steps)
        self.observation_space = gym.spaces.Box(0, 255, (self.dynamics.size, self.dynamics.size, 3), np.uint8)
        if discrete:
            self.action_space = gym.spaces.Discrete(len(DISCRETE_DIRECTIONS))
        else:
            self.action_space = gym.spaces.Box(-self.dynamics.max_step, self.dynamics.max_step, (2,), np.float32)
        self.render_mode = "rgb_array"
        self.position = np.zeros(2, dtype=np.float32)
        self.steps = 0

    def _observation(self) -> tuple[np.ndarray, dict[str, Any]]:
        pose = np.array([self.position[0], self.position[1], 0.0], dtype=np.float32)
        return self.dynamics.render_uint8(self.position), {"pose": pose, "steps": self.steps}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and "start" in options:
            self.position = np.asarray(options["start"], dtype=np.float32).reshape(2).copy()
        else:
            self.position = self.np_random.uniform(-self.start_radius, self.start_radius, 2).astype(np.float32)
        self.steps = 0
        return self._observation()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        candidate = int(action) if self.dynamics.discrete else np.asarray(action, dtype=np.float32).reshape(2)
        if not self.action_space.contains(candidate):
            raise ValueError(f"action {action!r} is outside the action space {self.action_space}; clip it first")
        vector = torch.from_numpy(self.dynamics.action_spec.encode(action))
        self.position = self.dynamics.step(torch.from_numpy(self.position), vector).numpy().astype(np.float32)
        self.steps += 1
        frame, info = self._observation()
        return frame, 0.0, False, self.steps >= self.max_episode_steps, info

    def render(self) -> np.ndarray:
        return self.dynamics.render_uint8(self.position)


class PointMassWorldModel:
    """The exact world model of :class:`PointMassEnv` (implements ``WorldModelProtocol``).

    It tracks the current position from observed poses (or, without a pose, by integrating the
    observed action, or by locating the blob in the first frame) and imagines futures by integrating
    the env's own dynamics. ``imagine_noise_std`` > 0 adds Gaussian noise to every imagined step,
    to make it stochastic like a diffusion model (planners' ``repeats`` then matter).
    """

    def __init__(self, size: int = 32, max_step: float = 0.2, bound: float = 1.0, blob_sigma: float = 0.25,
                 discrete: bool = False, imagine_noise_std: float = 0.0) -> None:
        self.dynamics = PointMassDynamics(size, max_step, bound, blob_sigma, discrete)
        self.action_spec = self.dynamics.action_spec
        self.frame_shape = (3, self.dynamics.size, self.dynamics.size)
        self.imagine_noise_std = float(imagine_noise_std)
        self.position: np.ndarray | None = None
        self.observed_frames = 0
        self.memorized_steps = 0

    def reset(self) -> None:
        """Forget the episode."""
        self.position = None
        self.observed_frames = 0
        self.memorized_steps = 0

    def observe(self, frame: np.ndarray, action: np.ndarray | None = None, pose: np.ndarray | None = None) -> None:
        """Take in the frame reached by ``action`` (None for the first frame) and its pose (x, y, yaw)."""
        frame = np.asarray(frame)
        if frame.shape != (self.dynamics.size, self.dynamics.size, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"observe expects a uint8 ({self.dynamics.size}, {self.dynamics.size}, 3) frame, "
                f"got {frame.dtype} {frame.shape}"
            )
        if pose is not None:
            self.position = np.asarray(pose, dtype=np.float32).reshape(-1)[:2].copy()
        elif action is not None and self.position is not None:
            vector = torch.as_tensor(np.asarray(action, dtype=np.float32))
            self.position = self.dynamics.step(torch.from_numpy(self.position), vector).numpy()
        else:
            self.position = self.dynamics.locate(frame)
        self.observed_frames += 1

    def memorize(self, steps: int | None = None) -> dict:
        """Nothing to learn in a closed-form model; counts the request so schedules can be tested."""
        steps = 0 if steps is None else int(steps)
        self.memorized_steps += steps
        return {"steps": steps, "frames": self.observed_frames, "loss": 0.0}

    def imagine(self, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """actions: (batch, horizon, action_dim) -> frames (batch, horizon, 3, size, size) in [-1, 1]."""
        if self.position is None:
            raise RuntimeError("imagine needs a current state: call reset() and observe(first_frame) first")
        actions = torch.as_tensor(actions, dtype=torch.float32)
        if actions.ndim != 3 or actions.shape[-1] != self.action_spec.dim:
            raise ValueError(
                f"actions must have shape (batch, horizon, {self.action_spec.dim}), got {tuple(actions.shape)}"
            )
        positions = self.imagine_positions(actions, generator)
        return self.dynamics.render(positions)

    def imagine_positions(self, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """actions: (batch, horizon, action_dim) -> positions (batch, horizon, 2) after each action."""
        batch, horizon, _ = actions.shape
        position = torch.from_numpy(np.asarray(self.position, dtype=np.float32)).expand(batch, 2)
        positions = []
        for step in range(horizon):
            position = self.dynamics.step(position, actions[:, step])
            if self.imagine_noise_std > 0:
                noise = torch.randn((batch, 2), generator=generator) * self.imagine_noise_std
                position = (position + noise).clamp(-self.dynamics.bound, self.dynamics.bound)
            positions.append(position)
        return torch.stack(positions, dim=1)
