"""The gymnasium wrapper that streams every observation into the world model's memory.

The paper's streaming setting: the world model sees every frame the agent sees (its short-term
window and its long-term store grow with the episode) and fine-tunes its long-term memory on a
schedule, "memorize the last 50 frames for 25 steps, then predict":

    reset()  -> world_model.reset(); world_model.observe(first_frame, None, pose)
    reset(keep_memory=True) -> begin_segment(world_model) (keep the LTM); observe(first_frame, None, pose)
    preload(frames, actions, poses) -> reset; observe the recorded trajectory; memorize it once
    step(a)  -> world_model.observe(frame, action_spec.encode(a), pose)
                every ``memorize_every`` steps: world_model.memorize(steps=memorize_steps)

Memorization draws clips, noise levels and noise from ``memorize_generator`` (set by :meth:`set_memorize_seed`,
once per episode by the runner), passed to ``world_model.memorize(generator=...)`` where the model takes it; without a
seed it draws from torch's global generator, which torch seeds from OS entropy in every process.

The step's ``info`` carries ``memory/observed_frames``, ``memory/memorized`` (True on the steps that
memorized) and, on those steps, ``memory/seconds`` and the stats the world model returned, prefixed
with ``memory/`` (``memory/loss`` ...).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from come_rl.interfaces import WorldModelProtocol
from come_rl.seeding import accepts_keyword, torch_generator


def begin_segment(world_model: WorldModelProtocol) -> None:
    """Start a new segment of the current episode: restart the short-term context, keep the long-term memory.

    ``world_model.begin_segment()`` where the model has it; the CoME ``WorldModel`` (whose API has no segments yet)
    gets its episode store emptied without touching the LTM's adapters (what ``reset()`` does minus
    ``ltm.reset()``), so the next frame may be observed without an action. A model with neither is left as it is
    (the point mass accepts a first frame at any time).

    Why not observe the start frame with a zero action: the step from the last recorded frame to the start frame is
    a teleport, not a no-op, and the experts would condition on a context that mixes both places.
    """
    begin = getattr(world_model, "begin_segment", None)
    if callable(begin):
        begin()
        return
    memory = getattr(world_model, "memory", None)
    if memory is not None and callable(getattr(memory, "clear", None)):
        memory.clear()


def observe_trajectory(world_model: WorldModelProtocol, frames: Sequence[np.ndarray], action_vectors: Sequence | None,
                       poses: Sequence | None = None) -> None:
    """Reset the world model and let it observe a recorded trajectory: ``frames[0]`` without an action, then
    ``frames[t + 1]`` after ``action_vectors[t]`` (the world model's action encoding), each with its pose if given.

    The one replay path: :meth:`WorldModelMemoryWrapper.preload` and the open-loop protocol (``agents.nwm_protocol``)
    both go through it before they memorize.
    """
    world_model.reset()
    for index, frame in enumerate(frames):
        action = None if index == 0 else np.asarray(action_vectors[index - 1], dtype=np.float32)
        pose = None if poses is None else np.asarray(poses[index], dtype=np.float32)
        world_model.observe(frame, action, pose)


class WorldModelMemoryWrapper(gym.Wrapper):
    """Feed (frame, one-hot/continuous action vector, pose) into ``world_model.observe`` each step.

    Args:
        env: a gymnasium env whose observation is a uint8 (H, W, 3) frame or a dict holding one.
        world_model: anything implementing ``WorldModelProtocol`` (``action_spec``, reset, observe, memorize).
        memorize_every: call ``memorize`` after every this many env steps (0 or None: never).
        memorize_steps: gradient steps per ``memorize`` call.
        frame_key: key of the frame in a dict observation (None: the observation is the frame).
        pose_key: key of the (x, y, yaw) pose in ``info`` (or in a dict observation); a missing key
            means no pose is passed.
    """

    def __init__(self, env: gym.Env, world_model: WorldModelProtocol, memorize_every: int | None = 50,
                 memorize_steps: int = 25, frame_key: str | None = None, pose_key: str | None = "pose") -> None:
        super().__init__(env)
        for method in ("reset", "observe", "memorize"):
            if not callable(getattr(world_model, method, None)):
                raise TypeError(f"world_model {type(world_model).__name__} has no {method}(); see WorldModelProtocol")
        if not hasattr(world_model, "action_spec"):
            raise TypeError(f"world_model {type(world_model).__name__} has no action_spec; see WorldModelProtocol")
        memorize_every = 0 if memorize_every is None else int(memorize_every)
        if memorize_every < 0 or int(memorize_steps) < 0:
            raise ValueError(
                f"memorize_every and memorize_steps must be >= 0 (0 disables memorization), "
                f"got {memorize_every} and {memorize_steps}"
            )
        self.world_model = world_model
        self.memorize_every = memorize_every
        self.memorize_steps = int(memorize_steps)
        self.frame_key = frame_key
        self.pose_key = pose_key
        self.episode_steps = 0
        self.memorize_calls = 0
        self.memorize_generator: torch.Generator | None = None
        self._memorize_takes_generator = accepts_keyword(world_model.memorize, "generator")

    def set_memorize_seed(self, seed: int | None) -> None:
        """Draw every following memorization (preload and stream) from a generator seeded with ``seed``.

        Call it before an episode's :meth:`preload` / :meth:`reset` (``come_rl.run`` does, with the episode's
        ``memorize`` stream of ``come_rl.seeding``); the generator then runs through the episode's memorizations.
        None: torch's global generator (different in every process unless seeded).
        """
        self.memorize_generator = None if seed is None else torch_generator(seed)

    def _memorize(self, steps: int) -> dict:
        if self.memorize_generator is not None and self._memorize_takes_generator:
            return self.world_model.memorize(steps=steps, generator=self.memorize_generator) or {}
        return self.world_model.memorize(steps=steps) or {}

    def extract_frame(self, observation: Any) -> np.ndarray:
        """The uint8 (H, W, 3) frame of an observation."""
        if isinstance(observation, dict):
            if self.frame_key is None or self.frame_key not in observation:
                raise KeyError(
                    f"the observation is a dict with keys {sorted(observation)}; set frame_key to the key "
                    f"of the image (got frame_key={self.frame_key!r})"
                )
            observation = observation[self.frame_key]
        elif self.frame_key is not None:
            raise KeyError(f"frame_key={self.frame_key!r} was given but the observation is not a dict; set frame_key=None")
        frame = np.asarray(observation)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"the frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        return frame

    def extract_pose(self, observation: Any, info: dict) -> np.ndarray | None:
        """The (x, y, yaw) pose from info (or a dict observation), or None where the env has none."""
        if self.pose_key is None:
            return None
        if self.pose_key in info:
            return np.asarray(info[self.pose_key], dtype=np.float32)
        if isinstance(observation, dict) and self.pose_key in observation:
            return np.asarray(observation[self.pose_key], dtype=np.float32)
        return None

    def reset(self, *, keep_memory: bool = False, **kwargs: Any) -> tuple[Any, dict]:
        """Reset the env and start the world model's episode with the first frame.

        ``keep_memory=True`` keeps what the world model memorized before (e.g. a preloaded reference trajectory,
        see :meth:`preload`): the first frame starts a new *segment* of the same episode instead of a new episode
        (:func:`begin_segment`), so the short-term context restarts at this frame and the long-term memory stays.
        """
        observation, info = self.env.reset(**kwargs)
        if keep_memory:
            begin_segment(self.world_model)
        else:
            self.world_model.reset()
        self.world_model.observe(self.extract_frame(observation), None, self.extract_pose(observation, info))
        self.episode_steps = 0
        self.memorize_calls = 0
        info = dict(info)
        info.update({"memory/observed_frames": 1, "memory/memorized": False, "memory/kept": bool(keep_memory)})
        return observation, info

    def preload(self, frames: np.ndarray, actions: list | np.ndarray, poses: np.ndarray | None = None,
                memorize_steps: int | None = None) -> dict:
        """Let the world model live through a recorded trajectory, then memorize it ("the agent has been there").

        Args:
            frames: (T + 1, H, W, 3) uint8 recorded frames, start first.
            actions: T env actions (ints for discrete spaces, vectors for continuous ones); ``frames[t + 1]``
                follows ``actions[t]``.
            poses: (T + 1, 3) poses or None.
            memorize_steps: gradient steps of the one ``memorize`` call (default: the wrapper's ``memorize_steps``;
                0 = observe only).
        Returns:
            the memorize statistics prefixed with ``preload/`` plus ``preload/frames`` and ``preload/seconds``.

        Call :meth:`reset` with ``keep_memory=True`` afterwards, or the world model forgets it again.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or len(actions) != len(frames) - 1:
            raise ValueError(f"preload needs frames (T + 1, H, W, 3) and T actions, got frames {frames.shape} and "
                             f"{len(actions)} actions")
        if poses is not None and len(poses) != len(frames):
            raise ValueError(f"preload got {len(poses)} poses for {len(frames)} frames; give one pose per frame or none")
        steps = self.memorize_steps if memorize_steps is None else int(memorize_steps)
        if steps < 0:
            raise ValueError(f"memorize_steps must be >= 0, got {memorize_steps}")
        start = time.perf_counter()
        spec = self.world_model.action_spec
        observe_trajectory(self.world_model, [self.extract_frame(frame) for frame in frames],
                           [spec.encode(action) for action in actions], poses)
        stats = self._memorize(steps) if steps > 0 else {"steps": 0}
        row = {f"preload/{key}": value for key, value in stats.items() if np.isscalar(value)}
        row.update({"preload/frames": len(frames), "preload/seconds": time.perf_counter() - start})
        return row

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        action_vector = self.world_model.action_spec.encode(action)
        self.world_model.observe(self.extract_frame(observation), action_vector, self.extract_pose(observation, info))
        self.episode_steps += 1
        info = dict(info)
        info.update({"memory/observed_frames": self.episode_steps + 1, "memory/memorized": False})
        if self.memorize_every and self.episode_steps % self.memorize_every == 0:
            start = time.perf_counter()
            stats = self._memorize(self.memorize_steps)
            self.memorize_calls += 1
            info["memory/memorized"] = True
            info["memory/seconds"] = time.perf_counter() - start
            info["memory/calls"] = self.memorize_calls
            info.update({f"memory/{key}": value for key, value in stats.items()})
        return observation, reward, terminated, truncated, info
