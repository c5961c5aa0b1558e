"""envs.registry: one table of env names for the data tools (collect, online sources, evaluator kinds)."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

import envs  # noqa: F401  (registers the gym ids)
from come_rl.data_sources import OnlineEpisodePool, open_data_source
from come_rl.evaluate import transition_kinds
from envs.registry import ENVS, env_entry, env_name_of_data

CONF = Path(__file__).resolve().parents[1] / "come_rl" / "conf" / "env"


@pytest.mark.parametrize("name", sorted(ENVS))
def test_each_entry_names_a_registered_gym_id_and_its_run_config(name):
    entry = ENVS[name]
    assert entry.gym_id in gym.registry
    assert gym.registry[entry.gym_id].entry_point.split(":")[0] == entry.module
    target = yaml.safe_load((CONF / f"{entry.run_config}.yaml").read_text())["_target_"]
    assert target.rsplit(".", 1)[0] == entry.module


def test_the_cards_collector_records_frames_of_the_default_size_and_its_actions():
    entry = env_entry("memory_cards")
    env, policy = entry.collector(steps=5)
    frame, info = env.reset(seed=0)
    assert frame.shape == (entry.image_size, entry.image_size, 3)
    actions = {policy(info, np.random.default_rng(seed)) for seed in range(50)}
    assert actions <= set(range(len(entry.action_meanings()))) and len(actions) == 5
    assert env_entry("memory_maze").manifest_env_kwargs(64, maze_size=11) == {"maze_size": 11, "image_size": 64}
    assert entry.manifest_env_kwargs(32, maze_size=11) == {"size": 32}


def test_unknown_names_and_wrong_pool_kinds_are_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"unknown env 'atari'.*memory_cards.*memory_maze"):
        env_entry("atari")
    with pytest.raises(ValueError, match="online:atari.*come_rl.collect"):
        open_data_source("online:atari")
    with pytest.raises(ValueError, match="seeded online pool, not a refreshed one"):
        OnlineEpisodePool("memory_maze", episodes=1, steps=2)


def test_data_specs_map_to_registered_names_and_kinds_follow_the_entry():
    assert env_name_of_data("online:memory_maze") == "memory_maze"
    assert env_name_of_data("/data/x", {"env": "memory_cards"}) == "memory_cards"
    assert env_name_of_data("/data/x", {"env": "pong"}) == env_name_of_data("/data/x") == ""
    frames = np.zeros((3, 2, 4, 4, 3), np.uint8)
    frames[1, 1] = 9  # only clip 1's view changes
    actions = np.eye(6, dtype=np.float32)[[2, 1, 0]][:, None]  # turn_left, forward, noop
    maze = transition_kinds({"frames": frames, "actions": actions}, "memory_maze")
    assert maze["turn"].tolist() == [True, False, False] and maze["move"].tolist() == [False, True, False]
    assert maze["view_change"].tolist() == [False, True, False]
    unknown = transition_kinds({"frames": frames, "actions": actions}, "")
    assert set(unknown) == {"all", "view_change", "static"} and unknown["static"].tolist() == [True, False, True]
