"""Memory Maze (Pasukonis et al. 2022) as a gymnasium environment with poses.

Built directly on memory-maze's dm_env task (``memory_maze.tasks.memory_maze_<N>x<N>``), not on its
old-gym registration, so it runs on gymnasium 1.x and numpy 2.

Observation
    The 64x64 egocentric RGB image, ``uint8 (image_size, image_size, 3)``, with the current target's
    colour drawn as a border (as in the original task). Everything else is in ``info``:

    * ``pose``: ``float32 (3,)`` ``(x, y, yaw)``: position in maze-grid units (one cell = 1.0, the
      bottom-left corner of the inner maze is (0, 0)) and heading in radians in ``[-pi, pi)``,
      counter-clockwise from the grid's x axis. Going forward moves the pose along ``yaw``.
    * ``agent_pos`` ``(2,)``, ``agent_dir`` ``(2,)`` (unit vector): memory-maze's own observables.
    * ``targets_pos`` ``(n_targets, 2)``, ``target_pos`` ``(2,)``, ``target_index`` (int),
      ``target_color`` ``(3,)`` in [0, 1]: all targets and the one to reach now.
    * ``maze_layout`` ``uint8 (N, N)``: 1 = free cell, 0 = wall, row 0 at the bottom.
    * ``seed``: the seed the current maze was built from.

Actions: ``Discrete(6)``, see ``ACTION_MEANINGS``: 0 noop, 1 forward, 2 turn left, 3 turn right,
4 forward + turn left, 5 forward + turn right (memory-maze's discrete set; control at 4 Hz).

Reward 1.0 when the current target is touched (a new target is then chosen). The task never
terminates; an episode is truncated at the task's time limit (1000 steps for 9x9, 2000/3000/4000 for
11x11/13x13/15x15) or at ``max_episode_steps`` if that is smaller.

Seeding: a maze is generated when the dm_env task is built, from the seed given then, so
``reset(seed=s)`` rebuilds the task from ``s`` (1-4 s) and the same seed gives identical frames and
poses. ``reset()`` without a seed keeps the task and draws the next maze from its random stream
(also deterministic given the first seed).

Rendering: MuJoCo needs ``MUJOCO_GL`` before it is first imported. If unset we set ``egl`` (works
here with Mesa's software renderer); pass ``mujoco_gl="osmesa"`` (or set the variable yourself) where
EGL is missing. It cannot be changed once MuJoCo has been imported in the process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from come_rl.conventions import frames_to_tensor, yaw_from_direction
from come_rl.experts.episode_memory import PlaceMemory
from come_rl.interfaces import ActionSpec

ACTION_MEANINGS: tuple[str, ...] = ("noop", "forward", "turn_left", "turn_right", "forward_left", "forward_right")
MAZE_SIZES: tuple[int, ...] = (9, 11, 13, 15)
# Steps per episode of memory-maze's tasks: time limit (s) x 4 Hz control.
TASK_EPISODE_STEPS: dict[int, int] = {9: 1000, 11: 2000, 13: 3000, 15: 4000}


def _ensure_mujoco_gl(mujoco_gl: str | None) -> None:
    """Pick the MuJoCo rendering backend before mujoco/dm_control are imported."""
    if mujoco_gl is not None:
        if mujoco_gl not in ("egl", "osmesa", "glfw"):
            raise ValueError(f"mujoco_gl must be 'egl', 'osmesa' or 'glfw', got {mujoco_gl!r}")
        current = os.environ.get("MUJOCO_GL")
        if "mujoco" in sys.modules and current is not None and current != mujoco_gl:
            raise RuntimeError(f"MuJoCo is already imported with MUJOCO_GL={current!r}; start a new process with "
                               f"MUJOCO_GL={mujoco_gl} set in the environment to switch backends")
        os.environ["MUJOCO_GL"] = mujoco_gl
    else:
        os.environ.setdefault("MUJOCO_GL", "egl")


def _load_triton_before_mujoco() -> None:
    """Import triton (if installed) before MuJoCo's EGL context exists.

    Measured here: building a Memory Maze env (MuJoCo + EGL) and *then* importing peft (which pulls in triton via
    torch._dynamo) segfaults the process; loading triton first avoids it and rendering still works.
    """
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


# dm_control's walker initializer sets a zero velocity at every episode start; memory-maze's walker (a rolling ball)
# moves on slide and hinge joints, not a free joint, so dm_control logs this through absl on every reset (14 lines in
# the default run). The velocity it cannot set is zero: nothing is wrong and nothing is for a user to do.
NO_FREE_JOINT_MESSAGE = "Cannot set velocity on Entity with no free joint."


# dm_control's INFO lines on import: which OpenGL backend it tries and MuJoCo's version. An entry point that logs INFO
# (Hydra's ``come_rl.run`` does) printed them at the top of every Memory Maze run; they say nothing a user acts on.
DM_CONTROL_INFO_PREFIXES = ("MUJOCO_GL=", "MuJoCo library version is:")
# PyOpenGL logs at INFO that its optional C accelerator is absent; that logger carries nothing else.
QUIET_INFO_LOGGERS = ("OpenGL.acceleratesupport",)


class _NoFreeJointVelocityFilter(logging.Filter):
    """Drops exactly dm_control's no-free-joint velocity message, and its two INFO lines on import (below WARNING only),
    from the ``absl`` logger; every other absl record passes (absl's record names absl's own module, not dm_control's,
    so the text is what identifies it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno < logging.WARNING and message.startswith(DM_CONTROL_INFO_PREFIXES):
            return False
        return message != NO_FREE_JOINT_MESSAGE


def _quiet_dependency_logs() -> None:
    """Install the filter above once per process (idempotent), before the first task is built and reset."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(existing, _NoFreeJointVelocityFilter) for existing in absl_logger.filters):
        absl_logger.addFilter(_NoFreeJointVelocityFilter())
    for name in QUIET_INFO_LOGGERS:
        quiet = logging.getLogger(name)
        if quiet.level == logging.NOTSET:  # a user who set this logger's level keeps it
            quiet.setLevel(logging.WARNING)


def _import_gym_without_its_notice() -> None:
    """Import gym (memory-maze's ``__init__`` imports it to register its old-gym envs) with its banner held back.

    gym 0.26.2 prints the ``gym_notices`` deprecation banner for its version to stderr on import ("Gym has been
    unmaintained since 2022 ..."). come_rl never uses gym (the env is built on memory-maze's dm_env task, served
    through gymnasium), so the banner addresses nobody. gym has no switch for it; only that exact text is dropped, and
    anything else printed during the import (a warning, a different notice) still reaches stderr.
    """
    if "gym" in sys.modules:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import gym
    except ImportError:  # memory-maze's own import reports a missing gym
        sys.stderr.write(captured.getvalue())
        return
    text = captured.getvalue()
    notices = getattr(sys.modules.get("gym_notices.notices"), "notices", None) or {}
    notice = notices.get(getattr(gym, "__version__", None))
    if notice:
        text = text.replace(notice + "\n", "", 1)
    if text:
        sys.stderr.write(text)


def _build_task(maze_size: int, seed: int, image_size: int):
    """The dm_env task of memory-maze with global observables (poses, targets, layout)."""
    _load_triton_before_mujoco()
    _quiet_dependency_logs()
    _import_gym_without_its_notice()
    try:
        from memory_maze import tasks
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError("Memory Maze needs the packages memory-maze==1.0.3, mujoco==3.17.0, dm-control==1.0.50 "
                          "and gym==0.26.2: pip install 'come_rl' installs them (mujoco 4.x breaks memory-maze)"
                          ) from error
    builder = {9: tasks.memory_maze_9x9, 11: tasks.memory_maze_11x11,
               13: tasks.memory_maze_13x13, 15: tasks.memory_maze_15x15}[maze_size]
    return builder(global_observables=True, seed=int(seed), camera_resolution=int(image_size))


class MemoryMazeEnv(gym.Env):
    """Memory Maze with a uint8 image observation and poses/targets in ``info`` (see module docstring).

    Args:
        maze_size: 9, 11, 13 or 15 (inner maze cells per side).
        image_size: camera resolution (square), 64 in the paper and the offline data set.
        max_episode_steps: truncate earlier than the task's own time limit (None: the task's limit).
        mujoco_gl: ``"egl"`` (default when unset), ``"osmesa"`` or ``"glfw"``.
        render_mode: only ``"rgb_array"`` (returns the last observation).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}  # noqa: RUF012 (gymnasium convention)

    def __init__(self, maze_size: int = 9, image_size: int = 64, max_episode_steps: int | None = None,
                 mujoco_gl: str | None = None, render_mode: str | None = "rgb_array"):
        if maze_size not in MAZE_SIZES:
            raise ValueError(f"maze_size must be one of {MAZE_SIZES}, got {maze_size!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (64 matches the paper), got {image_size!r}")
        if max_episode_steps is not None and max_episode_steps <= 0:
            raise ValueError(f"max_episode_steps must be positive or None, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        _ensure_mujoco_gl(mujoco_gl)
        self.maze_size = int(maze_size)
        self.image_size = int(image_size)
        task_steps = TASK_EPISODE_STEPS[self.maze_size]
        self.max_episode_steps = task_steps if max_episode_steps is None else min(int(max_episode_steps), task_steps)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.action_space = spaces.Discrete(len(ACTION_MEANINGS))
        self.action_spec = ActionSpec.discrete(len(ACTION_MEANINGS))
        self._task = None
        self._task_seed: int | None = None
        # True while the built task has not been reset yet: a reset with the same seed can reuse it.
        self._task_fresh = False
        self._last_image: np.ndarray | None = None
        self._steps = 0

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        if seed is not None and not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        super().reset(seed=seed)
        if seed is not None:
            if not (self._task_fresh and self._task_seed == int(seed)):
                self._rebuild(int(seed))
        elif self._task is None:
            # No seed ever given: draw one from gymnasium's generator (itself seeded from OS entropy).
            self._rebuild(int(self.np_random.integers(0, 2**31 - 1)))
        self._task_fresh = False
        time_step = self._task.reset()
        self._steps = 0
        return self._observation(time_step.observation), self._info(time_step.observation)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or not 0 <= action < 6:
            raise ValueError(f"action must be an int in [0, 6) {ACTION_MEANINGS}, got {action!r}; "
                             "for a one-hot vector use env.action_spec.decode(vector)")
        time_step = self._task.step(int(action))
        self._steps += 1
        reward = float(time_step.reward or 0.0)
        # Memory Maze has no terminal state: the end of the time limit is a truncation.
        truncated = bool(time_step.last()) or self._steps >= self.max_episode_steps
        return self._observation(time_step.observation), reward, False, truncated, self._info(time_step.observation)

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        if self._last_image is None:
            raise RuntimeError("call reset() before render()")
        return self._last_image.copy()

    def close(self) -> None:
        if self._task is not None:
            self._task.close()
            self._task = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _rebuild(self, seed: int) -> None:
        self.close()
        self._task = _build_task(self.maze_size, seed, self.image_size)
        self._task_seed = seed
        self._task_fresh = True

    def _observation(self, observation: dict) -> np.ndarray:
        # memory-maze reuses its image buffer between steps: copy so stored frames never change.
        self._last_image = np.array(observation["image"], dtype=np.uint8, copy=True)
        return self._last_image.copy()

    def _info(self, observation: dict) -> dict:
        agent_pos = np.asarray(observation["agent_pos"], dtype=np.float32)
        agent_dir = np.asarray(observation["agent_dir"], dtype=np.float32)
        yaw = np.float32(yaw_from_direction(agent_dir.astype(np.float64)))
        targets_pos = np.asarray(observation["targets_pos"], dtype=np.float32)
        target_pos = np.asarray(observation["target_pos"], dtype=np.float32)
        # The current target is the row of targets_pos equal to target_pos (memory-maze does not expose the index).
        target_index = int(np.argmin(np.abs(targets_pos - target_pos).sum(axis=1)))
        return {
            "pose": np.array([agent_pos[0], agent_pos[1], yaw], dtype=np.float32),
            "agent_pos": agent_pos,
            "agent_dir": agent_dir,
            "targets_pos": targets_pos,
            "target_pos": target_pos,
            "target_index": target_index,
            "target_color": np.asarray(observation["target_color"], dtype=np.float32),
            "maze_layout": np.asarray(observation["maze_layout"], dtype=np.uint8).copy(),
            "seed": self._task_seed,
        }


class ExploringRandomPolicy:
    """A persistent random policy that explores Memory Maze (for offline world-model data).

    Holds each chosen action for a random 1-4 steps, prefers moving forward (alone or while turning)
    and turns in place when the position stops changing (stuck against a wall), so that episodes
    cover corridors and rooms with a good mix of moves and turns. Stateless across episodes apart
    from what ``reset`` clears.

    Args:
        action_probabilities: probabilities of the 6 actions when a new one is drawn.
        max_repeat: an action is held for 1..max_repeat steps, uniformly.
    """

    # noop, forward, left, right, forward-left, forward-right: forward-biased, all actions present.
    DEFAULT_PROBABILITIES = (0.05, 0.40, 0.125, 0.125, 0.15, 0.15)

    def __init__(self, action_probabilities: tuple[float, ...] = DEFAULT_PROBABILITIES, max_repeat: int = 4,
                 stuck_distance: float = 0.02):
        probabilities = np.asarray(action_probabilities, dtype=np.float64)
        if probabilities.shape != (6,) or np.any(probabilities < 0) or not np.isclose(probabilities.sum(), 1.0):
            raise ValueError(f"action_probabilities must be 6 non-negative numbers summing to 1, got {action_probabilities}")
        if max_repeat < 1:
            raise ValueError(f"max_repeat must be >= 1, got {max_repeat}")
        self.probabilities, self.max_repeat, self.stuck_distance = probabilities, int(max_repeat), stuck_distance
        self.reset()

    def reset(self) -> None:
        self._action, self._left, self._last_position = 0, 0, None

    def __call__(self, info: dict, rng: np.random.Generator) -> int:
        position = np.asarray(info["pose"][:2], dtype=np.float64)
        stuck = (self._last_position is not None and self._action in (1, 4, 5)
                 and np.linalg.norm(position - self._last_position) < self.stuck_distance)
        self._last_position = position
        if stuck:
            # Pressing forward into a wall: turn away in place for a few steps.
            self._action, self._left = int(rng.choice([2, 3])), int(rng.integers(2, self.max_repeat + 3))
        elif self._left <= 0:
            self._action = int(rng.choice(6, p=self.probabilities))
            self._left = int(rng.integers(1, self.max_repeat + 1))
        self._left -= 1
        return self._action


class MazeSimulatorModel:
    """The simulator itself as the world model ("exact model"): ``imagine(actions)`` plays every candidate from the
    env's current physics state and renders its frames, then puts the state back, so the real episode goes on as if
    nothing had been imagined. It bounds what any learned model can give a planner: if the planner cannot reach a
    goal with it, the objective or the horizon is what is wrong, not the model.

    Saved and restored around each candidate: MuJoCo's state (qpos, qvel, act), the physics time (the task's time
    limit reads it), the task's random state (targets respawn from it), the env's step counter and last frame. The
    target the agent would touch in imagination is not re-drawn (its colour border stays), which changes no frame
    the planner compares, since targets respawn only on contact.

    Implements what planners and agents use of a world model: ``action_spec``, ``frame_shape``, ``reset``,
    ``observe`` and ``memorize`` (no-ops: the simulator needs no memory) and ``imagine``; after each ``imagine``,
    ``last_poses`` (B, H, 3) holds the pose of every imagined frame, and ``current_pose()`` the agent's pose now (what
    a place-aware objective, ``planners.objectives.PathObjective``, reads).
    """

    label = "simulator"

    def __init__(self, env: MemoryMazeEnv):
        if not isinstance(env, MemoryMazeEnv):
            raise TypeError(f"MazeSimulatorModel needs the MemoryMazeEnv the agent acts in, got {type(env).__name__}")
        self.env = env
        self.action_spec = env.action_spec
        self.frame_shape = (3, env.image_size, env.image_size)
        self.last_network_calls = 0
        self.last_poses = None
        self._last_pose: np.ndarray | None = None
        # what it "memorizes" is only where it saw what (the places a place-aware objective looks the goal up in)

        self.places = PlaceMemory()
        self._segment: list[tuple[np.ndarray, np.ndarray]] = []

    def reset(self) -> None:
        self.places.clear()
        self._segment = []

    def current_pose(self) -> np.ndarray:
        """(x, y, yaw) of the agent now: the pose last given to ``observe``."""
        if self._last_pose is None:
            raise RuntimeError("no pose observed yet: observe(frame, action, pose) the agent's frames")
        return self._last_pose

    def begin_segment(self) -> None:
        self._segment = []

    def observe(self, frame, action=None, pose=None) -> None:
        if pose is not None:
            self._last_pose = np.asarray(pose, np.float32)
            self._segment.append((np.asarray(frame), self._last_pose.copy()))

    def memorize(self, steps: int | None = None, generator=None, **overrides) -> dict:
        """The simulator needs no memory of how things look; it keeps where it saw what (``places``), as a model with
        a long-term memory does, so that a place-aware objective finds the goal with either."""
        import torch


        if self._segment:
            frames = np.stack([frame for frame, _ in self._segment])
            frames = frames_to_tensor(frames) if frames.dtype == np.uint8 else torch.as_tensor(frames)
            self.places.add(frames, torch.as_tensor(np.stack([pose for _, pose in self._segment])))
            self._segment = []
        return {"steps": 0, "seconds": 0.0, "note": "the simulator needs no memory"}

    def _random_states(self) -> list:
        """Every numpy RandomState the task holds (the composer env's, the task's)."""
        states, seen, stack = [], set(), [self.env._task]
        while stack:
            obj = stack.pop()
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            for name in ("_random_state", "random_state"):
                value = getattr(obj, name, None) if name in getattr(obj, "__dict__", {}) else None
                if isinstance(value, np.random.RandomState):
                    states.append(value)
            for name in ("_env", "env", "_task", "task"):
                child = obj.__dict__.get(name) if hasattr(obj, "__dict__") else None
                if child is not None:
                    stack.append(child)
        return states

    def imagine(self, actions, generator=None, seed: int | None = None, history=None):
        """actions (B, H, 6) one-hot -> frames (B, H, 3, size, size) in [-1, 1]: what the simulator renders."""
        import torch


        if history is not None:
            raise ValueError("the simulator imagines from the env's current state only (history is not supported)")
        env = self.env
        if env._task is None:
            raise RuntimeError("reset the env before imagining with the simulator")
        actions = np.asarray(actions.detach().cpu() if isinstance(actions, torch.Tensor) else actions, np.float32)
        if actions.ndim != 3 or actions.shape[-1] != self.action_spec.dim or min(actions.shape[:2]) < 1:
            raise ValueError(f"actions must have shape (batch, horizon, {self.action_spec.dim}), got {actions.shape}")
        physics = env._task.physics
        state, time0 = physics.get_state().copy(), float(physics.data.time)
        randoms = [(r, r.get_state()) for r in self._random_states()]
        steps, last_image = env._steps, env._last_image
        frames = np.empty((*actions.shape[:2], env.image_size, env.image_size, 3), np.uint8)
        poses = np.empty((*actions.shape[:2], 3), np.float32)
        try:
            for b, plan in enumerate(actions):
                for h, action in enumerate(plan):
                    time_step = env._task.step(int(self.action_spec.decode(action)))
                    frames[b, h] = time_step.observation["image"]
                    poses[b, h] = env._info(time_step.observation)["pose"]
                with physics.reset_context():
                    physics.set_state(state)
                    physics.data.time = time0
                for r, saved in randoms:
                    r.set_state(saved)
        finally:
            with physics.reset_context():
                physics.set_state(state)
                physics.data.time = time0
            for r, saved in randoms:
                r.set_state(saved)
            env._steps, env._last_image = steps, last_image
        self.last_poses = torch.from_numpy(poses)
        return frames_to_tensor(frames.reshape(-1, *frames.shape[2:])).reshape(*actions.shape[:2], *self.frame_shape)


def collection_env_and_policy(steps: int, image_size: int = 64, maze_size: int = 9):
    """The env and policy that record Memory Maze data sets (``python -m come_rl.collect``, ``data=online:memory_maze``):
    episodes of ``steps`` actions of :class:`ExploringRandomPolicy` (envs.registry)."""
    env = MemoryMazeEnv(maze_size=maze_size, image_size=image_size, max_episode_steps=steps)
    return env, ExploringRandomPolicy()
