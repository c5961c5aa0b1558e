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


def test_preload_then_keep_memory_with_the_point_mass() -> None:
    env = PointMassEnv(discrete=True)
    model = RecordingPointMassWorldModel(discrete=True)
    wrapped = WorldModelMemoryWrapper(env, model, memorize_every=0, memorize_steps=3)
    frames, poses, actions = [], [], [1, 1, 3]
    observation, info = env.reset(seed=0)
    frames.append(observation), poses.append(info["pose"])
    for action in actions:
        observation, _, _, _, info = env.step(action)
        frames.append(observation), poses.append(info["pose"])
    row = wrapped.preload(np.stack(frames), actions, np.stack(poses))
    assert row["preload/frames"] == 4 and row["preload/steps"] == 3 and row["preload/seconds"] >= 0
    assert [c[0] for c in model.calls] == ["reset", "observe", "observe", "observe", "observe", "memorize"]
    assert model.calls[1][2] is None and np.array_equal(model.calls[2][2], [0, 1, 0, 0, 0])
    # the kept memory: no reset, the start frame is observed as a new segment (no action)
    _, info = wrapped.reset(seed=0, keep_memory=True)
    assert model.calls[-1][0] == "observe" and model.calls[-1][2] is None and info["memory/kept"]
    assert model.memorized_steps == 3, "reset(keep_memory=True) must not wipe what was memorized"
    wrapped.reset(seed=0)
    assert model.calls[-2][0] == "reset" and model.memorized_steps == 0
    with pytest.raises(ValueError, match="T actions"):
        wrapped.preload(np.stack(frames), actions[:2])


def test_keep_memory_keeps_the_come_ltm_and_restarts_the_context() -> None:
    import torch

    from come_rl.diffusion import CosineSchedule
    from come_rl.experts.expert import DiffusionExpert
    from come_rl.nets.unet import UNetConfig, VideoUNet
    from come_rl.world_model import WorldModel
    from envs.memory_cards import MemoryCardsEnv

    torch.manual_seed(0)
    config = UNetConfig(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[16, 32, 32], cond_dim=32)
    expert = DiffusionExpert(VideoUNet(config), CosineSchedule())
    torch.nn.init.normal_(expert.backbone.out_conv.weight, std=0.02)
    from come_rl.experts.long_term import MemorizeConfig
    from come_rl.interfaces import ActionSpec

    model = WorldModel(expert.eval(), ActionSpec.discrete(5), 48, memorize_config=MemorizeConfig(batch_size=2, rank=2))
    env = MemoryCardsEnv()
    wrapped = WorldModelMemoryWrapper(env, model, memorize_every=0, memorize_steps=2)
    rng = np.random.default_rng(0)
    frames, actions, poses = [], [], []
    observation, info = env.reset(seed=4)
    frames.append(observation), poses.append(info["pose"])
    for _ in range(6):
        actions.append(env.random_policy_action(rng))
        observation, _, _, _, info = env.step(actions[-1])
        frames.append(observation), poses.append(info["pose"])
    row = wrapped.preload(np.stack(frames), actions, np.stack(poses))
    assert row["preload/steps"] == 2 and np.isfinite(row["preload/loss_last"])

    def adapter_norm() -> float:
        return sum(float(p.detach().abs().sum()) for n, p in model.ltm.backbone.named_parameters() if "lora_B" in n)

    assert len(model.memory) == 7 and adapter_norm() > 0, "memorize moved the LoRA adapters (B starts at 0)"
    learned = adapter_norm()
    observation, _ = wrapped.reset(seed=4, keep_memory=True)
    assert len(model.memory) == 1 and adapter_norm() == learned, "the LTM stays, the context restarts"
    assert torch.equal(model.memory.frames[0], torch.from_numpy(observation).float().div(127.5).sub(1).permute(2, 0, 1))
    wrapped.reset(seed=4)
    assert adapter_norm() == 0.0, "a plain reset forgets the episode"
