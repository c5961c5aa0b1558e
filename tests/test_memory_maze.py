"""Memory Maze wrapper: gymnasium checks, seeding, action meanings, poses, bad input.

One env is built for the whole module (a build costs 1-4 s); episodes are kept short.
"""

import numpy as np
import pytest

import memory_maze  # noqa: F401  (a hard dependency: a broken install fails here, never skips)

import gymnasium as gym
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.memory_maze import ACTION_MEANINGS, ExploringRandomPolicy, MemoryMazeEnv
from come_rl.conventions import absolute_to_relative, relative_to_absolute, wrap_angle


@pytest.fixture(scope="module")
def maze_env():
    env = MemoryMazeEnv(maze_size=9, max_episode_steps=30)
    yield env
    env.close()


def test_check_env_passes(maze_env):
    check_env(maze_env, skip_render_check=False)


def test_spaces_info_and_action_spec(maze_env):
    frame, info = maze_env.reset(seed=7)
    assert maze_env.action_space == gym.spaces.Discrete(6) and len(ACTION_MEANINGS) == 6
    assert maze_env.action_spec.kind == "discrete" and maze_env.action_spec.dim == 6
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and frame.std() > 5
    assert info["pose"].dtype == np.float32 and info["pose"].shape == (3,)
    assert info["maze_layout"].shape == (9, 9) and set(np.unique(info["maze_layout"])) <= {0, 1}
    x, y, yaw = info["pose"]
    assert 0 < x < 9 and 0 < y < 9 and -np.pi <= yaw < np.pi
    # The agent spawns on a free cell of the layout (row 0 of the layout is y in [0, 1)).
    assert info["maze_layout"][int(y), int(x)] == 1
    np.testing.assert_allclose(np.linalg.norm(info["agent_dir"]), 1.0, atol=1e-5)
    assert info["targets_pos"].shape == (3, 2) and 0 <= info["target_index"] < 3
    np.testing.assert_allclose(info["targets_pos"][info["target_index"]], info["target_pos"])
    assert info["seed"] == 7


def test_same_seed_gives_identical_frames_and_poses(maze_env):
    actions = [1, 1, 2, 4, 5, 3, 1, 0]

    def rollout(seed):
        frame, info = maze_env.reset(seed=seed)
        frames, poses = [frame], [info["pose"]]
        for action in actions:
            frame, _, _, _, info = maze_env.step(action)
            frames.append(frame)
            poses.append(info["pose"])
        return np.stack(frames), np.stack(poses)

    frames_a, poses_a = rollout(11)
    frames_b, poses_b = rollout(11)
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(poses_a, poses_b)
    # Without a seed the task draws the next maze from its stream: a different start.
    frame_next, _ = maze_env.reset()
    assert not np.array_equal(frames_a[0], frame_next)


def test_action_meanings_move_the_pose_as_documented(maze_env):
    _, info = maze_env.reset()  # no seed: keeps the built task (a rebuild costs seconds)
    poses = [info["pose"]]
    taken = [2] * 3 + [3] * 3 + [0] * 2
    for action in taken:
        _, _, _, _, info = maze_env.step(action)
        poses.append(info["pose"])
    relative = absolute_to_relative(np.stack(poses))
    turns = relative[:, 2]
    assert np.all(turns[1:3] > 0.1), f"turn_left should increase yaw, got {turns[:3]}"
    assert np.all(turns[4:6] < -0.1), f"turn_right should decrease yaw, got {turns[3:6]}"
    # Turning in place barely moves the agent.
    assert np.abs(relative[:6, :2]).max() < 0.1
    # Integrating the relative motion reproduces the recorded poses.
    integrated = relative_to_absolute(relative, np.stack(poses)[0])
    np.testing.assert_allclose(integrated[:, :2], np.stack(poses)[:, :2], atol=1e-5)
    np.testing.assert_allclose(wrap_angle(integrated[:, 2] - np.stack(poses)[:, 2]), 0, atol=1e-5)


def test_forward_moves_along_heading_and_policy_explores(maze_env):
    _, info = maze_env.reset(seed=5)
    policy, rng = ExploringRandomPolicy(), np.random.default_rng(0)
    poses, actions = [info["pose"]], []
    for _ in range(29):
        action = policy(info, rng)
        _, _, terminated, truncated, info = maze_env.step(action)
        actions.append(action)
        poses.append(info["pose"])
        assert not terminated
    relative = absolute_to_relative(np.stack(poses))
    forward_steps = np.isin(actions, [1, 4, 5])
    # Displacement along the heading is positive on forward steps that were not blocked.
    moving = forward_steps & (np.linalg.norm(relative[:, :2], axis=1) > 0.05)
    assert moving.sum() >= 3 and np.all(relative[moving, 0] > 0)
    assert len(set(actions)) >= 3
    # max_episode_steps=30 truncates on the 30th step.
    _, _, terminated, truncated, _ = maze_env.step(1)
    assert truncated and not terminated


def test_bad_input_is_rejected(maze_env):
    maze_env.reset()
    with pytest.raises(ValueError, match="action must be an int"):
        maze_env.step(6)
    with pytest.raises(ValueError, match="action must be an int"):
        maze_env.step(np.ones(6))
    with pytest.raises(TypeError, match="seed must be an int"):
        maze_env.reset(seed="1")
    with pytest.raises(ValueError, match="maze_size"):
        MemoryMazeEnv(maze_size=10)


def test_registered_ids_are_import_light():
    import importlib
    import sys

    for name in [name for name in sys.modules if name == "envs" or name.startswith("envs.")]:
        if name == "envs":
            importlib.reload(sys.modules[name])
    spec = gym.spec("come_rl/MemoryMaze9x9-v0")
    assert spec.entry_point == "envs.memory_maze:MemoryMazeEnv" and spec.kwargs == {"maze_size": 9}
    assert gym.spec("come_rl/MemoryMaze15x15-v0").kwargs == {"maze_size": 15}
    assert gym.spec("come_rl/MemoryCards-v0").entry_point == "envs.memory_cards:MemoryCardsEnv"


QUIET_SCRIPT = """
import logging
import warnings

warnings.simplefilter("default")  # every warnings-module warning shows, as with python -W default
logging.basicConfig(level=logging.INFO)  # as Hydra configures logging for come_rl.run
from envs.memory_maze import MemoryMazeEnv

env = MemoryMazeEnv(maze_size=9, max_episode_steps=10)
env.reset(seed=0)  # a build, then a reset
for action in (1, 2, 4):
    env.step(action)
env.reset()  # a reset of the built maze
env.close()
logging.getLogger("absl").warning("come_rl test: other absl warnings still show")
logging.getLogger("absl").info("come_rl test: other absl info still shows")
print("built, reset and stepped")
"""


def test_building_resetting_and_stepping_prints_no_dependency_noise():
    """dm_control's no-free-joint velocity warning (one per reset), its and PyOpenGL's INFO lines on import and gym's
    deprecation banner (on import) are filtered at their source; other absl warnings still reach the user. A fresh process: gym prints its banner once
    per process, on first import, and another test may have imported it already."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from envs.memory_maze import NO_FREE_JOINT_MESSAGE

    result = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "built, reset and stepped" in result.stdout, result.stderr[-3000:]
    assert NO_FREE_JOINT_MESSAGE not in result.stderr, result.stderr
    assert "Gym has been unmaintained" not in result.stderr and "import gymnasium as gym" not in result.stderr, \
        result.stderr
    assert "come_rl test: other absl warnings still show" in result.stderr, "the absl filter must stay narrow"
    assert "come_rl test: other absl info still shows" in result.stderr, "the absl filter must stay narrow"
    # dm_control's and PyOpenGL's INFO lines on import (shown by an entry point logging INFO, as Hydra's does)
    for noise in ("MUJOCO_GL=", "MuJoCo library version", "OpenGL_accelerate"):
        assert noise not in result.stderr, result.stderr
