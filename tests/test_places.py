"""Places: the odometry head gives imagined frames poses, the long-term memory keeps where it saw what, and the place
objective looks the goal up there and scores rollouts by where they end. One maze env for the module."""

import numpy as np
import pytest
import torch

from come_rl.data.episodes import Episode, EpisodeDataset
from come_rl.odometry import (
    OdometryConfig,
    OdometryNet,
    OdometryPoseModel,
    evaluate_segments,
    load_odometry,
    reference_models,
    save_odometry,
)
from envs.memory_maze import ExploringRandomPolicy, MazeSimulatorModel, MemoryMazeEnv

FORWARD, TURN_LEFT, TURN_RIGHT = 1, 2, 3


@pytest.fixture(scope="module")
def maze_env():
    env = MemoryMazeEnv(maze_size=9)
    yield env
    env.close()


def explored_episode(env, seed: int, steps: int) -> Episode:
    """``steps`` steps of the exploring policy from ``reset(seed)`` (a seed the shipped data never used)."""
    frame, info = env.reset(seed=seed)
    policy, rng = ExploringRandomPolicy(), np.random.default_rng(seed)
    frames, poses, actions = [frame], [info["pose"]], []
    for _ in range(steps):
        action = policy(info, rng)
        frame, _, _, _, info = env.step(action)
        frames.append(frame)
        poses.append(info["pose"])
        actions.append(np.eye(6, dtype=np.float32)[action])
    return Episode(np.stack(frames), np.stack(actions), np.zeros(steps, np.float32), np.stack(poses).astype(np.float32),
                   seed, 0)


def test_the_shipped_odometry_head_tracks_real_poses_better_than_the_mean_motion_of_each_action(maze_env):
    from come_rl.checkpoint import packaged_checkpoints_dir

    episode = explored_episode(maze_env, seed=424242, steps=120)
    dataset = EpisodeDataset.from_episodes([episode], maze_env.action_spec)
    head = load_odometry(packaged_checkpoints_dir() / "memory_maze")
    # the references are fitted on this very episode (an advantage they would not have on held-out data)
    errors = evaluate_segments(head, dataset, horizon=8, segments=24, seed=0, references=reference_models(dataset))
    assert errors["odometry"]["end8"] < errors["action_mean"]["end8"], errors
    assert errors["odometry"]["ate"] < 0.25, errors  # maze cells; a forward step is ~0.14


def test_odometry_rolls_poses_out_and_its_file_round_trips_with_checks(tmp_path):
    net = OdometryNet(OdometryConfig())
    model = OdometryPoseModel(net)
    frames = torch.zeros(3, 3, 64, 64)
    actions = torch.eye(6)[[FORWARD, FORWARD, TURN_LEFT]]
    poses = model.rollout(np.array([1.0, 2.0, 0.5]), np.array([1.0, 2.0, 0.5]), frames, actions)
    assert poses.shape == (3, 3) and torch.isfinite(poses).all()
    with pytest.raises(ValueError, match="pass frame="):
        model(torch.zeros(1, 3), actions[:1])
    save_odometry(tmp_path, net, {"note": "untrained"})
    again = load_odometry(tmp_path)
    assert torch.equal(again.rollout([1.0, 2.0, 0.5], [1.0, 2.0, 0.5], frames, actions), poses)
    weights = tmp_path / "odometry.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="SHA-256"):
        load_odometry(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m come_rl.odometry"):
        load_odometry(tmp_path / "nowhere")


def test_the_world_model_keeps_the_places_it_memorized_and_imagines_poses(maze_env):
    from come_rl.world_model import WorldModel

    episode = explored_episode(maze_env, seed=424243, steps=6)
    for experts, expected in ((["base", "ltm"], 7), (["base"], 0)):
        wm = WorldModel.load("memory_maze", experts=experts, sampler={"steps": 1}, device="cpu")
        wm.reset()
        for t in range(len(episode.frames)):
            wm.observe(episode.frames[t], None if t == 0 else episode.actions[t - 1], pose=episode.poses[t])
        wm.memorize(steps=1)
        assert len(wm.places) == expected  # no long-term memory, no places
        wm.begin_segment()
        wm.observe(episode.frames[0], None, pose=episode.poses[0])
        assert len(wm.places) == expected  # a new segment keeps them
        frames = wm.imagine(torch.eye(6)[[FORWARD, FORWARD]][None].repeat(2, 1, 1), seed=0)
        assert frames.shape == (2, 2, 3, 64, 64) and wm.last_poses.shape == (2, 2, 3)
        moved = np.linalg.norm(wm.last_poses[0, -1, :2].numpy() - episode.poses[0, :2])
        assert 0.05 < moved < 0.6, moved  # two forward steps from a standstill: about 0.1-0.3 cells
        if expected:
            assert np.allclose(wm.places.poses, episode.poses, atol=1e-6)
        wm.reset()
        assert len(wm.places) == 0


def test_the_place_objective_finds_the_goal_in_memory_and_prefers_reaching_its_place(maze_env, caplog):
    import functools
    import logging

    from agents.goal_tasks import _say_why_the_place_is_unknown
    from agents.mpc import MPCAgent
    from planners.objectives import LPIPSGoalObjective, PlaceObjective
    from planners.random_shooting import RandomShootingPlanner

    model = MazeSimulatorModel(maze_env)
    frame, info = maze_env.reset(seed=424244)
    model.reset()
    model.observe(frame, None, info["pose"])
    plan = [FORWARD] * 6
    for action in plan:
        frame, _, _, _, info = maze_env.step(action)
        model.observe(frame, None, info["pose"])
    goal_frame, goal_pose = frame, info["pose"]
    # before memorizing nothing is known: the goal view alone (LPIPS)
    blind = PlaceObjective(model, goal_frame, lpips=lambda a, b: ((a - b) ** 2).flatten(1).mean(1))
    assert not blind.knows_place and isinstance(blind.inner, LPIPSGoalObjective)
    model.memorize()
    start, start_info = maze_env.reset(seed=424244)
    model.begin_segment()
    model.observe(start, None, start_info["pose"])
    objective = PlaceObjective(model, goal_frame, lookahead=0.5)
    assert objective.knows_place and objective.goal_index == len(plan)
    assert np.allclose(objective.route[-1], goal_pose, atol=1e-5)
    assert np.allclose(objective.route[0, :2], start_info["pose"][:2], atol=1e-5)
    candidates = torch.zeros(3, 4, 6)
    candidates[0, :, FORWARD] = 1  # along the memorized way to the goal's place
    candidates[1, :, TURN_LEFT] = 1
    candidates[2, :, TURN_RIGHT] = 1
    scores = objective(candidates)
    assert scores[0] > scores[1] and scores[0] > scores[2], scores
    other = np.full_like(goal_frame, 17)
    assert not PlaceObjective(model, other, lpips=lambda a, b: torch.zeros(len(a))).knows_place
    # an episode whose goal was never memorized says so (a warning: the model has places, just not this one)
    agent = MPCAgent(model, RandomShootingPlanner(population=2),
                     functools.partial(PlaceObjective, lpips=lambda a, b: torch.zeros(len(a))), horizon=2)
    agent.reset(goal_frame=other)
    with caplog.at_level(logging.INFO, logger="agents.goal_tasks"):
        _say_why_the_place_is_unknown(agent, 3)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "episode 3" in caplog.text and "not among the memorized frames" in caplog.text
    with pytest.raises(ValueError, match="match_mse"):
        PlaceObjective(model, goal_frame, match_mse=-1.0)
