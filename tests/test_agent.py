"""The MPC agent with the exact point-mass world model must reach goals; custom planners plug in via Hydra."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from agents.goal_tasks import record_reference_task, run_goal_episode
from agents.mpc import MPCAgent
from come_rl.interfaces import ActionSpec
from envs.memory_wrapper import WorldModelMemoryWrapper
from envs.point_mass import PointMassEnv, PointMassWorldModel
from planners import CEMPlanner, LPIPSGoalObjective, NWMPlanner, PixelGoalObjective

SUCCESS_THRESHOLD = 0.1  # world units; the arena is [-1, 1]^2 and one step moves at most 0.2 per axis


class ConstantGridPlanner:
    """A custom planner defined here: tries every constant action on a grid, keeps the best.

    It takes its own settings only, not the default planner's (population, elites, ...), so the CLI
    must drop those when ``planner._target_`` points here.
    """

    def __init__(self, points_per_axis: int = 9) -> None:
        self.points_per_axis = points_per_axis
        self.calls = 0

    def reset(self) -> None:
        pass

    def plan(self, objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        self.calls += 1
        axes = [torch.linspace(low, high, self.points_per_axis) for low, high in zip(action_spec.low, action_spec.high)]
        grid = torch.cartesian_prod(*axes)  # (points^dim, dim)
        candidates = grid.unsqueeze(1).expand(-1, horizon, -1).contiguous()
        return candidates[int(torch.argmax(objective(candidates)))].clone()


def run_episodes(agent: MPCAgent, env: PointMassEnv, world_model: PointMassWorldModel, seeds, max_steps: int,
                 goal_offset: int = 8) -> list[dict]:
    wrapped = WorldModelMemoryWrapper(env, world_model, memorize_every=0)
    rows = []
    for seed in seeds:
        task = record_reference_task(env, seed, goal_offset)
        rows.append(run_goal_episode(wrapped, agent, task, max_steps, SUCCESS_THRESHOLD, record_frames=False).episode_row)
    return rows


def test_point_mass_world_model_is_exact() -> None:
    env, world_model = PointMassEnv(), PointMassWorldModel()
    observation, info = env.reset(seed=3)
    world_model.reset()
    world_model.observe(observation, None, info["pose"])
    actions = torch.tensor([[[0.2, 0.0], [0.1, -0.3], [-0.05, 0.05]]])  # -0.3 clips to -0.2
    imagined = world_model.imagine(actions)
    assert imagined.shape == (1, 3, 3, 32, 32)
    position = info["pose"][:2].astype(np.float64)
    for step, action in enumerate(actions[0].numpy()):
        observation, _, _, _, info = env.step(np.clip(action, -0.2, 0.2))
        position = np.clip(position + np.clip(action, -0.2, 0.2), -1, 1)
        assert np.allclose(info["pose"][:2], position, atol=1e-6)
        real = torch.from_numpy(observation.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert torch.max(torch.abs(imagined[0, step] - real)).item() <= 1 / 127.5 + 1e-6  # uint8 rounding only


def test_mpc_agent_reaches_goal_with_pixel_objective() -> None:
    env, world_model = PointMassEnv(), PointMassWorldModel()
    planner = CEMPlanner(population=64, elites=8, iterations=4, seed=0)
    agent = MPCAgent(world_model, planner, functools.partial(PixelGoalObjective, frames="all"), horizon=4)
    rows = run_episodes(agent, env, world_model, seeds=range(4), max_steps=12)
    for row in rows:
        assert row["start_distance"] > SUCCESS_THRESHOLD, "the goal must not be trivially at the start"
        assert row["success"], row
    assert np.mean([row["final_distance"] for row in rows]) < 0.06


def test_mpc_agent_reaches_goal_with_lpips_objective() -> None:
    import come_rl.metrics.lpips_metric  # noqa: F401
    env, world_model = PointMassEnv(), PointMassWorldModel()
    planner = CEMPlanner(population=100, elites=10, iterations=5, seed=1)
    # NWM-style: plan the 8 steps to the goal once (replan_every = horizon), score the last frame
    agent = MPCAgent(world_model, planner, LPIPSGoalObjective, horizon=8, replan_every=8)
    rows = run_episodes(agent, env, world_model, seeds=range(2), max_steps=8)
    for row in rows:
        assert row["start_distance"] > SUCCESS_THRESHOLD
        assert row["success"], row


def test_nwm_planner_on_discrete_point_mass() -> None:
    env, world_model = PointMassEnv(discrete=True), PointMassWorldModel(discrete=True)
    # horizon 1: the constant-action proposals are the five actions, so the planner is greedy
    agent = MPCAgent(world_model, NWMPlanner(repeats=1), PixelGoalObjective, horizon=1)
    wrapped = WorldModelMemoryWrapper(env, world_model, memorize_every=0)
    observation, info = env.reset(options={"start": [0.0, 0.0]})
    goal = env.dynamics.render_uint8(np.array([0.6, -0.4], dtype=np.float32))
    wrapped.reset(options={"start": [0.0, 0.0]})
    agent.reset(goal_frame=goal)
    for _ in range(6):
        observation, _, _, _, info = wrapped.step(agent.act(observation, info))
    # 3 steps of +x (0.6) and 2 of -y (-0.4) reach the goal exactly; the sixth must be 'stay'
    assert np.allclose(info["pose"][:2], [0.6, -0.4], atol=1e-6)


def test_agent_validates_its_settings() -> None:
    world_model = PointMassWorldModel()
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        MPCAgent(world_model, CEMPlanner(), PixelGoalObjective, horizon=0)
    with pytest.raises(ValueError, match="replan_every must be in"):
        MPCAgent(world_model, CEMPlanner(), PixelGoalObjective, horizon=4, replan_every=5)
    agent = MPCAgent(world_model, CEMPlanner(), PixelGoalObjective, horizon=4)
    with pytest.raises(RuntimeError, match="no goal"):
        agent.act()
    with pytest.raises(ValueError, match="resize the goal to 32x32"):
        agent.reset(goal_frame=np.zeros((64, 64, 3), dtype=np.uint8))


def test_custom_planner_plugs_in_through_hydra_target(tmp_path: Path) -> None:
    import come_rl.run
    from come_rl.run import run

    target = f"{__name__}.ConstantGridPlanner"
    config_dir = str(Path(come_rl.run.__file__).parent / "conf")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "env=point_mass", "model=point_mass", "agent=cem", f"planner._target_={target}",
            "+planner.points_per_axis=5", "run.name=custom", f"run.out_dir={tmp_path}", "run.episodes=1",
            "run.lpips_metric=false", "run.gif_episodes=0", "run.progress=false", "run.threads=1",
            "agent.objective._target_=planners.objectives.PixelGoalObjective", "agent.horizon=4",
            "agent.replan_every=1", "env.task.max_steps=3",
        ])
    summary = run(cfg)
    assert summary["planner_target"] == target
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 3
    # the grid planner executes constant grid actions: every action is a multiple of 0.1 (5 points on [-0.2, 0.2])
    actions = [float(v) for line in steps[1:] for v in line.split(",")[2].split()]
    assert all(abs(v * 10 - round(v * 10)) < 1e-5 for v in actions), actions


def test_goal_episode_preloads_the_reference_into_memory() -> None:
    env, world_model = PointMassEnv(), PointMassWorldModel()
    wrapped = WorldModelMemoryWrapper(env, world_model, memorize_every=0)
    task = record_reference_task(env, seed=5, goal_offset=6)
    agent = MPCAgent(world_model, CEMPlanner(population=32, elites=4, iterations=2, seed=0), PixelGoalObjective,
                     horizon=4)
    row = run_goal_episode(wrapped, agent, task, max_steps=3, success_threshold=SUCCESS_THRESHOLD,
                           record_frames=False, preload_memory=True, memorize_steps=7).episode_row
    # the reference (7 frames) was observed and memorized with 7 steps before the env was reset to the start
    assert row["preload/frames"] == 7 and row["preload/steps"] == 7
    assert world_model.memorized_steps == 7 and world_model.observed_frames == 7 + 1 + 3
    with pytest.raises(TypeError, match="needs the memory wrapper"):
        run_goal_episode(env, agent, task, max_steps=1, success_threshold=0.1, preload_memory=True)


def test_reference_tasks_redraw_goals_closer_than_min_goal_distance() -> None:
    env = PointMassEnv()
    distances = []
    for seed in range(6):
        task = record_reference_task(env, seed=seed, goal_offset=4, min_goal_distance=0.15)
        distance = float(np.linalg.norm(task.goal_pose[:2] - task.reference_poses[0, :2]))
        distances.append(distance)
        assert distance >= 0.15
        # the start state is the seed's: redrawing changes the policy's path, not where the agent starts
        _, info = env.reset(seed=seed)
        assert np.allclose(task.reference_poses[0], np.asarray(info["pose"])[:3])
    with pytest.raises(ValueError, match="min_goal_distance"):
        record_reference_task(env, seed=0, goal_offset=1, min_goal_distance=100.0, max_attempts=3)
