"""The gymnasium wrapper that streams every observation into the world model's memory.

The paper's streaming setting: the world model sees every frame the agent sees (its short-term
window and its long-term store grow with the episode) and fine-tunes its long-term memory on a
schedule, "memorize the last 50 frames for 25 steps, then predict":

    reset()  -> world_model.reset(); world_model.observe(first_frame, None, pose)
    step(a)  -> world_model.observe(frame, action_spec.encode(a), pose)
                every ``memorize_every`` steps: world_model.memorize(steps=memorize_steps)

The step's ``info`` carries ``memory/observed_frames``, ``memory/memorized`` (True on the steps that
memorized) and, on those steps, ``memory/seconds`` and the stats the world model returned, prefixed
with ``memory/`` (``memory/loss`` ...).
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np

from come_rl.interfaces import WorldModelProtocol


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

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        observation, info = self.env.reset(**kwargs)
        self.world_model.reset()
        self.world_model.observe(self.extract_frame(observation), None, self.extract_pose(observation, info))
        self.episode_steps = 0
        self.memorize_calls = 0
        info = dict(info)
        info.update({"memory/observed_frames": 1, "memory/memorized": False})
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        action_vector = self.world_model.action_spec.encode(action)
        self.world_model.observe(self.extract_frame(observation), action_vector, self.extract_pose(observation, info))
        self.episode_steps += 1
        info = dict(info)
        info.update({"memory/observed_frames": self.episode_steps + 1, "memory/memorized": False})
        if self.memorize_every and self.episode_steps % self.memorize_every == 0:
            start = time.perf_counter()
            stats = self.world_model.memorize(steps=self.memorize_steps) or {}
            self.memorize_calls += 1
            info["memory/memorized"] = True
            info["memory/seconds"] = time.perf_counter() - start
            info["memory/calls"] = self.memorize_calls
            info.update({f"memory/{key}": value for key, value in stats.items()})
        return observation, reward, terminated, truncated, info
