"""The memory wrapper feeds every frame, action and pose to the world model and memorizes on schedule."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from envs.memory_wrapper import WorldModelMemoryWrapper
from envs.point_mass import PointMassEnv, PointMassWorldModel


class RecordingPointMassWorldModel(PointMassWorldModel):
    """The real point-mass model, with a log of every call the wrapper makes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple] = []

    def reset(self) -> None:
        super().reset()
        self.calls.append(("reset",))

    def observe(self, frame, action=None, pose=None) -> None:
        super().observe(frame, action, pose)
        self.calls.append(("observe", frame.copy(), None if action is None else np.array(action), pose))

    def memorize(self, steps=None) -> dict:
        stats = super().memorize(steps)
        self.calls.append(("memorize", steps, self.observed_frames))
        return stats


def test_observe_and_memorize_schedule() -> None:
    env = PointMassEnv(discrete=True)
    model = RecordingPointMassWorldModel(discrete=True)
    wrapped = WorldModelMemoryWrapper(env, model, memorize_every=3, memorize_steps=2)
    observation, info = wrapped.reset(seed=0)
    assert [c[0] for c in model.calls] == ["reset", "observe"]
    assert model.calls[1][2] is None, "the first frame of an episode has no action"
    assert np.array_equal(model.calls[1][1], observation)
    assert np.array_equal(model.calls[1][3], info["pose"])

    actions = [1, 3, 0, 2, 4, 4, 1, 1, 3, 0]
    memorized_at = []
    for step, action in enumerate(actions, start=1):
        observation, _, _, _, info = wrapped.step(action)
        call = [c for c in model.calls if c[0] == "observe"][-1]
        expected = np.zeros(5, dtype=np.float32)
        expected[action] = 1.0
        assert np.array_equal(call[2], expected), "actions arrive one-hot"
        assert np.array_equal(call[1], observation) and np.array_equal(call[3], info["pose"])
        assert info["memory/observed_frames"] == step + 1
        if info["memory/memorized"]:
            memorized_at.append(step)
            assert info["memory/steps"] == 2 and info["memory/frames"] == step + 1
            assert info["memory/seconds"] >= 0.0
    assert memorized_at == [3, 6, 9]
    memorize_calls = [c for c in model.calls if c[0] == "memorize"]
    # memorize(steps=2) after the 4th, 7th and 10th frame (3, 6, 9 steps)
    assert memorize_calls == [("memorize", 2, 4), ("memorize", 2, 7), ("memorize", 2, 10)]
    assert model.memorized_steps == 6
    # the wrapper kept the model's state exact: its position is the env's
    assert np.allclose(model.position, env.position)

    # a new episode resets the model and the schedule
    wrapped.reset(seed=1)
    assert model.calls[-2][0] == "reset" and model.memorized_steps == 0
    for _ in range(2):
        _, _, _, _, info = wrapped.step(0)
    assert not info["memory/memorized"]
    _, _, _, _, info = wrapped.step(0)
    assert info["memory/memorized"]


def test_memorize_disabled_and_continuous_actions() -> None:
    model = RecordingPointMassWorldModel()
    wrapped = WorldModelMemoryWrapper(PointMassEnv(), model, memorize_every=0)
    wrapped.reset(seed=0)
    for _ in range(5):
        wrapped.step(np.array([0.1, -0.05], dtype=np.float32))
    assert not any(c[0] == "memorize" for c in model.calls)
    assert np.allclose(model.calls[-1][2], [0.1, -0.05])


class DictObservationEnv(gym.ObservationWrapper):
    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Dict({"image": env.observation_space})

    def observation(self, observation):
        return {"image": observation}


def test_dict_observations_need_frame_key() -> None:
    model = RecordingPointMassWorldModel()
    with pytest.raises(KeyError, match="set frame_key"):
        WorldModelMemoryWrapper(DictObservationEnv(PointMassEnv()), model).reset(seed=0)
    wrapped = WorldModelMemoryWrapper(DictObservationEnv(PointMassEnv()), model, frame_key="image")
    observation, _ = wrapped.reset(seed=0)
    assert np.array_equal(model.calls[-1][1], observation["image"])


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="memorize_every and memorize_steps must be >= 0"):
        WorldModelMemoryWrapper(PointMassEnv(), PointMassWorldModel(), memorize_every=-1)
    with pytest.raises(TypeError, match="has no reset"):
        WorldModelMemoryWrapper(PointMassEnv(), object())
