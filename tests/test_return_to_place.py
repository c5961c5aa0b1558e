"""Memory Maze, return to a seen place: the task is seeded, its goal is out of view, the oracle reaches it, and bad
settings fail before any episode. One env for the module (a maze build costs 1-4 s); world-model budgets are tiny."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from agents.return_to_place import (
    OracleAgent,
    RandomAgent,
    ReturnConfig,
    evaluate,
    explore,
    goal_in_view,
    grid_path,
    line_of_sight,
    main,
    run_episode,
)
from come_rl.checkpoint import precision_for
from come_rl.seeding import episode_seeds
from envs.memory_maze import MemoryMazeEnv

FORWARD, TURN_LEFT, FORWARD_RIGHT = 1, 2, 5

CONFIG = ReturnConfig(lpips_metric=False, gifs=False)


@pytest.fixture(scope="module")
def maze_env():
    env = MemoryMazeEnv(maze_size=9)
    yield env
    env.close()


def test_the_view_and_path_geometry_on_a_toy_layout():
    layout = np.ones((3, 5), np.uint8)
    layout[0:2, 2] = 0  # a wall at x in [2, 3), y in [0, 2)
    facing_east = np.array([0.5, 0.5, 0.0])
    assert goal_in_view(layout, facing_east, np.array([1.5, 0.5]))
    assert not goal_in_view(layout, facing_east, np.array([3.5, 0.5]))  # behind the wall
    assert not goal_in_view(layout, np.array([1.5, 0.5, np.pi]), np.array([1.5, 2.5]))  # behind the camera (90 deg)
    assert line_of_sight(layout, [0.5, 2.5], [4.5, 2.5]) and not line_of_sight(layout, [0.5, 0.5], [4.5, 0.5])
    assert grid_path(layout, [0.5, 0.5], [3.5, 0.5]) == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (1, 3), (0, 3)]


# episodes whose first exploration already leaves a goal (no redraw: each redraw rebuilds the maze, 1-5 s)
EPISODES = [episode_seeds(123, 2), episode_seeds(123, 3)]


@pytest.fixture(scope="module")
def explored(maze_env):
    """(task, last observation, last info) of each of EPISODES."""
    return [explore(maze_env, seeds.env, seeds.policy, CONFIG.explore_steps, CONFIG.min_goal_distance)
            for seeds in EPISODES]


def test_the_task_is_deterministic_per_seed(maze_env, explored):
    first = explored[0][0]
    again, _, info = explore(maze_env, EPISODES[0].env, EPISODES[0].policy, CONFIG.explore_steps,
                             CONFIG.min_goal_distance)
    np.testing.assert_allclose(info["pose"], again.start_pose, atol=1e-6)  # the env is left where exploration ended
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.poses, again.poses)
    assert (first.goal_index, first.actions, first.attempt) == (again.goal_index, again.actions, again.attempt)
    assert not np.array_equal(first.frames[0], explored[1][0].frames[0])


def test_the_goal_is_far_and_out_of_view_when_planning_starts(explored):
    for task, observation, _ in explored:
        assert np.linalg.norm(task.goal_pose[:2] - task.start_pose[:2]) >= CONFIG.min_goal_distance
        assert not goal_in_view(task.layout, task.start_pose, task.goal_pose)
        assert not np.array_equal(observation, task.goal_frame)
        # the latest such frame: every later one is near the end or in view
        for later in range(task.goal_index + 1, len(task.poses) - 1):
            assert (np.linalg.norm(task.poses[later, :2] - task.start_pose[:2]) < CONFIG.min_goal_distance
                    or goal_in_view(task.layout, task.start_pose, task.poses[later]))
        assert task.return_reference.shape == (len(task.poses) - task.goal_index, 3)


def test_the_oracle_returns_and_random_is_seeded(maze_env):
    rows = [run_episode(maze_env, OracleAgent(), seeds, CONFIG)[0] for seeds in EPISODES + [episode_seeds(9000, 0)]]
    assert all(row["success"] for row in rows), rows
    assert all(row["final_distance"] < CONFIG.success_distance <= row["start_distance"] for row in rows)
    draws = []
    for _ in range(2):
        agent = RandomAgent()
        agent.begin(None, EPISODES[0])
        draws.append([agent.act(None, {}) for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_the_world_model_agent_and_the_outputs(tmp_path):
    config = ReturnConfig(agents="base,base_places", episodes=1, decisions=1, horizon=1, replan_every=1, population=2,
                          elites=1, sampler_steps=1, memorize_steps=0, threads=1, out_dir=str(tmp_path))
    rows = {row["agent"]: row for row in evaluate(config, progress=False)}
    assert rows["base"]["experts"] == "base" and rows["base"]["seconds_per_decision"] > 0
    # no memory: the place objective cannot find the goal and scores by LPIPS; the same base with a place memory can
    assert rows["base"]["knows_place"] == 0.0
    assert rows["base_places"]["experts"] == "base+places" and rows["base_places"]["knows_place"] == 1.0
    assert np.isfinite(rows["base"]["lpips_imagined_real"]) and np.isfinite(rows["base"]["lpips_to_goal"])
    assert rows["base"]["ci95_low"] <= rows["base"]["success_rate"] <= rows["base"]["ci95_high"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.csv", "summary.md", "episodes.csv", "episodes.md", "success.png", "base_failure.gif"} <= names
    # the precision the world-model agents ran in is recorded resolved (the checkpoint's cpu_precision on this CPU)
    settings = json.loads((tmp_path / "episode_records" / "run_config.json").read_text())
    assert settings["precision"] == precision_for("memory_maze") in ("fp32", "bf16")


@pytest.mark.parametrize("overrides, message", [
    (dict(episodes=0), "episodes must be an integer >= 1"),
    (dict(episodes=-3), "episodes must be an integer >= 1"),
    (dict(agents="random,psychic"), "unknown agents"),
    (dict(agents=""), "unknown agents"),
    (dict(success_distance=3.0), "success_distance <= min_goal_distance"),
    (dict(replan_every=5), "replan_every <= horizon"),
    (dict(objective="telepathy"), "objective must be one of"),
    (dict(scoring="euclid"), "scoring must be one of"),
    (dict(lookahead=0.0), "lookahead must be a distance > 0"),
    (dict(precision="fp16"), "unknown precision 'fp16'"),
])
def test_bad_settings_fail_before_any_episode(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate(ReturnConfig(out_dir=str(tmp_path), **overrides))
    assert not any(tmp_path.iterdir())


def test_the_command_line_reports_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="episodes must be an integer >= 1"):
        main(["episodes=0", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown agents"):
        main(["agents=oracle,teleport", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown key"):
        main(["episode=3"])


@pytest.mark.slow  # the same come_rl.fanout path as test_reproducibility's Ray run (kept in CI); -m slow runs it
def test_ray_backend_gives_the_local_rows(tmp_path):
    """Episodes fanned out over 2 Ray actors (a local 2-CPU cluster) give the same rows as the local run."""
    import ray

    common = dict(agents="random,base", episodes=2, decisions=1, horizon=1, replan_every=1, population=2, elites=1,
                  sampler_steps=1, memorize_steps=0, threads=1, lpips_metric=False, gifs=False)
    local = evaluate(ReturnConfig(**common, out_dir=str(tmp_path / "local")), progress=False)
    try:
        fanned = evaluate(ReturnConfig(**common, backend="ray", workers=2, out_dir=str(tmp_path / "ray")),
                          progress=False)
    finally:
        ray.shutdown()
    from come_rl.results import read_rows

    local_rows, ray_rows = (read_rows(tmp_path / name / "episodes.csv")[1] for name in ("local", "ray"))
    for row in local_rows + ray_rows:
        row.pop("seconds_per_decision")
    assert len(local_rows) == 4 and local_rows == ray_rows
    assert [r["success_rate"] for r in local] == [r["success_rate"] for r in fanned]


def test_bad_backend_fails_before_any_episode(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate(ReturnConfig(backend="dask", out_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_an_interrupted_evaluation_resumes_from_its_episode_records(tmp_path):
    # a short exploration and a near goal: the records and the resume are under test, not the task
    config = ReturnConfig(agents="random", episodes=2, decisions=2, explore_steps=16, min_goal_distance=1.0,
                          lpips_metric=False, gifs=False, threads=1, out_dir=str(tmp_path))
    first = evaluate(config, progress=False)
    records = tmp_path / "episode_records"
    kept, lost = records / "random_000000.npz", records / "random_000001.npz"
    before = kept.stat().st_mtime_ns
    lost.unlink()
    assert evaluate(config, progress=False) == first
    assert kept.stat().st_mtime_ns == before and lost.exists()
    with pytest.raises(ValueError, match="other settings"):
        evaluate(dataclasses.replace(config, decisions=3), progress=False)



def test_the_simulator_imagines_exactly_and_leaves_the_episode_as_it_was():
    from come_rl.conventions import frames_to_tensor
    from envs.memory_maze import MazeSimulatorModel

    env, twin = MemoryMazeEnv(), MemoryMazeEnv()
    for e in (env, twin):
        e.reset(seed=11)
        for action in (FORWARD, FORWARD, TURN_LEFT, FORWARD):
            e.step(action)
    model = MazeSimulatorModel(env)
    plans = np.zeros((2, 5, 6), np.float32)
    plans[0, :, FORWARD_RIGHT] = 1
    plans[1, :, TURN_LEFT] = 1
    imagined = model.imagine(torch.from_numpy(plans))
    assert imagined.shape == (2, 5, 3, 64, 64)
    assert not torch.equal(imagined[0, -1], imagined[1, -1])
    # The real env, after imagining, goes on exactly as its twin that never imagined (state, time, random state), and
    # what the simulator imagined for the first plan is what then happens.
    for h in range(5):
        frame, _, _, _, info = env.step(FORWARD_RIGHT)
        twin_frame, _, _, _, twin_info = twin.step(FORWARD_RIGHT)
        assert np.array_equal(frame, twin_frame) and np.allclose(info["pose"], twin_info["pose"])
        assert torch.equal(imagined[0, h], frames_to_tensor(frame))
    with pytest.raises(ValueError, match="actions must have shape"):
        model.imagine(torch.zeros(2, 5))


def test_the_exact_agent_imagines_what_then_happens(tmp_path):
    from come_rl.results import read_rows

    config = ReturnConfig(agents="exact", episodes=1, decisions=2, horizon=2, replan_every=2, population=3, elites=1,
                          threads=1, out_dir=str(tmp_path))
    evaluate(config, progress=False)
    episodes = read_rows(tmp_path / "episodes.csv")[1]
    assert episodes[0]["experts"] == "simulator" and int(episodes[0]["decisions"]) == 2
    assert float(episodes[0]["lpips_imagined_real"]) == pytest.approx(0.0, abs=1e-6)


def test_the_place_objective_prefers_the_rollout_that_reaches_the_waypoint():
    from envs.memory_maze import MazeSimulatorModel
    from planners.objectives import PathObjective

    env = MemoryMazeEnv()
    frame, info = env.reset(seed=11)
    model = MazeSimulatorModel(env)
    model.observe(frame, None, info["pose"])
    start = np.asarray(info["pose"], np.float64)
    heading = np.array([np.cos(start[2]), np.sin(start[2])])
    # A path straight ahead of the agent: its waypoint lies in front, so going forward must beat turning away.
    path = np.stack([np.r_[start[:2] + heading * 0.1 * k, start[2]] for k in range(12)])
    objective = PathObjective(model, frame, path, lookahead=0.4)
    plans = torch.zeros(2, 4, 6)
    plans[0, :, FORWARD] = 1
    plans[1, :, TURN_LEFT] = 1
    scores = objective(plans)
    assert scores[0] > scores[1]
    assert model.last_poses.shape == (2, 4, 3)
    with pytest.raises(ValueError, match="path must be finite"):
        PathObjective(model, frame, np.zeros((3, 2)))
    # A waypoint behind the agent: turning towards it moves no nearer, so only the turn term tells turning from waiting.
    behind = np.stack([np.r_[start[:2] - heading * 0.1 * k, start[2]] for k in range(12)])
    waiting_or_turning = torch.zeros(2, 4, 6)
    waiting_or_turning[0, :, 0] = 1  # noop
    waiting_or_turning[1, :, TURN_LEFT] = 1
    blind = PathObjective(model, frame, behind, lookahead=0.4)(waiting_or_turning)
    assert abs(float(blind[1] - blind[0])) < 0.05
    turned = np.abs(np.asarray(model.last_poses)[1, -1, 2] - start[2])
    pricing = PathObjective(model, frame, behind, lookahead=0.4, turn_weight=0.6)(waiting_or_turning)
    assert float(pricing[1] - pricing[0]) == pytest.approx(0.6 * min(turned, 2 * np.pi - turned), abs=0.1)
    with pytest.raises(ValueError, match="turn_weight must be >= 0"):
        PathObjective(model, frame, path, turn_weight=-1.0)


def test_the_exact_model_with_the_place_objective_reaches_the_goal(tmp_path):
    # the goal's place looked up in what the simulator memorized during the exploration (no oracle path given)
    config = ReturnConfig(agents="exact", episodes=1, population=8, elites=2, threads=1, lpips_metric=False,
                          gifs=False, out_dir=str(tmp_path))
    rows = evaluate(config, progress=False)
    assert rows[0]["agent"] == "exact" and rows[0]["successes"] == 1 and rows[0]["knows_place"] == 1.0, rows


def test_a_checkpoint_without_a_pose_head_is_refused_for_the_place_objective(tmp_path):
    """Agents that score by memorized places need poses of imagined frames: a checkpoint without the odometry head is
    refused before any episode, naming the command that trains one (or objective=lpips)."""
    from come_rl.checkpoint import resolve_checkpoint

    shipped = resolve_checkpoint("memory_maze")
    posed = tmp_path / "no_pose_head"
    posed.mkdir()
    for path in shipped.iterdir():
        if not path.name.startswith("odometry."):
            (posed / path.name).symlink_to(path.resolve())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no odometry head: train one \(python -m come_rl.odometry .*objective=lpips"):
        evaluate(ReturnConfig(checkpoint=str(posed), agents="ltm", out_dir=str(out)))
    assert not out.exists() or not any(out.iterdir())
