"""The NWM protocol on recorded trajectories: exact replay, hand-checkable ATE/RPE, the CLI's table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.nwm_protocol import make_cases, parse_arguments, replay_to_start, run_protocol
from come_rl.checkpoint import expert_spec, save_expert
from come_rl.collect import collect
from come_rl.data import EpisodeDataset
from come_rl.diffusion import CosineSchedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.interfaces import ActionSpec
from come_rl.metrics.trajectory import absolute_trajectory_error, relative_pose_error
from come_rl.nets.unet import UNetConfig, VideoUNet
from envs.memory_cards import MemoryCardsEnv
from planners.objectives import PixelGoalObjective

TINY_CARDS = dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[16, 32, 32], cond_dim=32)


def save_tiny_world_model(directory: Path, backbone_kwargs: dict, action_spec: dict) -> Path:
    """A random-init (untrained) U-Net base expert saved as a checkpoint directory WorldModel.load reads."""
    torch.manual_seed(0)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**backbone_kwargs)), CosineSchedule())
    torch.nn.init.normal_(expert.backbone.out_conv.weight, std=0.02)  # break the zero-init: an untrained generic net
    spec = expert_spec(expert, "unet", backbone_kwargs,
                       extra={"action_spec": action_spec, "frame_size": backbone_kwargs["frame_size"]})
    save_expert(directory, expert, spec)
    return directory


@pytest.fixture(scope="module")
def cards_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cards_data")
    collect({"env": "memory_cards", "episodes": 2, "steps": 30, "out": str(out), "seed": 7, "workers": 1,
             "episodes_per_shard": 2, "maze_size": 9, "image_size": 48})
    return out


class ReplayPlanner:
    """Returns a fixed action sequence (one-hot), ignoring the objective: a planner whose path is known."""

    def __init__(self, env_actions: list[int], num_actions: int = 5) -> None:
        self.env_actions = env_actions
        self.num_actions = num_actions

    def reset(self) -> None:
        pass

    def plan(self, objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        objective(torch.nn.functional.one_hot(torch.tensor(self.env_actions[:horizon]), self.num_actions)[None].float())
        return torch.nn.functional.one_hot(torch.tensor(self.env_actions[:horizon]), self.num_actions).float()


def test_recorded_actions_give_zero_error_and_toggles_give_hand_computed_error(cards_data: Path, tmp_path: Path) -> None:
    from come_rl.world_model import WorldModel

    dataset = EpisodeDataset(cards_data)
    cases = make_cases(dataset, num_cases=2, context=4, goal_offset=8, horizon=8, memory_frames=6, max_start=15)
    assert [case.episode for case in cases] == [0, 1]
    for case in cases:
        assert 5 <= case.start <= 15 and case.observed_frames.shape == (6, 48, 48, 3)
        # the goal frame is the recorded frame 8 steps after the start
        assert np.array_equal(case.goal_frame, dataset.frames[case.episode][case.start + 8])
    model = WorldModel.load(save_tiny_world_model(tmp_path / "wm", TINY_CARDS, {"kind": "discrete", "dim": 5}),
                            experts=["base", "ltm"], sampler={"steps": 1}, memorize={"batch_size": 2})
    # run_protocol asks the factories for a fresh planner per case, in case order
    recorded = [[int(np.argmax(a)) for a in dataset.actions[case.episode][case.start:case.start + 8]] for case in cases]
    planners = {"oracle": lambda: ReplayPlanner(recorded.pop(0)), "toggle": lambda: ReplayPlanner([4] * 8)}
    rows = run_protocol({"base+ltm": model}, planners, cases, lambda: MemoryCardsEnv(size=48), horizon=8,
                        memorize_steps=1, objective_factory=PixelGoalObjective, progress=False)
    assert len(rows) == 4
    for row in rows:
        case = cases[row["case"]]
        if row["planner"] == "oracle":
            # executing the recorded actions from the replayed start reproduces the recorded path exactly
            assert row["ate"] == pytest.approx(0.0, abs=1e-9) and row["rpe"] == pytest.approx(0.0, abs=1e-9)
            assert row["final_distance"] == pytest.approx(0.0, abs=1e-9)
        else:
            # toggling never moves the cursor: the path stays at the start pose
            standing = np.repeat(case.reference_poses[:1], 9, axis=0)
            reference = case.reference_poses
            hand_ate = np.sqrt(np.mean(np.sum((reference[:, :2] - standing[:, :2]) ** 2, axis=1)))
            assert row["ate"] == pytest.approx(hand_ate, abs=1e-9)
            assert row["ate"] == pytest.approx(absolute_trajectory_error(standing, reference), abs=1e-9)
            assert row["rpe"] == pytest.approx(relative_pose_error(standing, reference), abs=1e-9)
            assert row["final_distance"] == pytest.approx(row["start_distance"], abs=1e-9)
        assert np.isfinite(row["memorize_loss"]), "the LTM memorized the observed frames"


def test_replay_refuses_a_wrong_recording(cards_data: Path) -> None:
    dataset = EpisodeDataset(cards_data)
    case = make_cases(dataset, num_cases=1, max_start=10)[0]
    env = MemoryCardsEnv(size=48)
    replay_to_start(env, case)  # the recorded state is reached exactly
    case.seed += 1
    with pytest.raises(RuntimeError, match="does not reach the recorded state"):
        replay_to_start(env, case)


def test_memory_maze_replay_is_exact() -> None:
    from agents.goal_tasks import record_reference_task
    from agents.nwm_protocol import TrajectoryCase
    from envs.memory_maze import ExploringRandomPolicy, MemoryMazeEnv

    env = MemoryMazeEnv(maze_size=9, image_size=64)
    task = record_reference_task(env, seed=3, goal_offset=6, policy=ExploringRandomPolicy())
    case = TrajectoryCase(episode=0, seed=3, start=6, observed_frames=task.reference_frames[-1:],
                          observed_actions=np.zeros((0, 6)), observed_poses=None,
                          prefix_actions=list(task.reference_actions), goal_frame=task.goal_frame,
                          goal_pose=task.goal_pose, reference_poses=task.reference_poses[-1:])
    observation, info = replay_to_start(env, case)  # raises unless frame and pose match exactly
    assert np.array_equal(observation, task.reference_frames[-1])
    env.close()


def test_cli_writes_planner_by_world_model_table(cards_data: Path, tmp_path: Path) -> None:
    from agents.nwm_protocol import main

    checkpoint = save_tiny_world_model(tmp_path / "wm", TINY_CARDS, {"kind": "discrete", "dim": 5})
    out = tmp_path / "results"
    assert main([f"checkpoint={checkpoint}", f"data={cards_data}", "cases=1", "planners=nwm,random_shooting",
                 "experts=base|base,ltm", "population=4", "elites=2", "sampler_steps=1", "memorize_steps=1",
                 "horizon=4", "goal_offset=4", f"out={out}", "name=tiny", "progress=false"]) == 0
    with open(out / "tiny.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["planner"], row["world_model"]) for row in rows} == {
        ("nwm", "base"), ("nwm", "base+ltm"), ("random_shooting", "base"), ("random_shooting", "base+ltm")}
    for row in rows:
        assert float(row["ate"]) >= 0 and float(row["final_distance"]) >= 0
        # a 4x4 grid: 4 steps move the cursor at most 4 cells, so the final distance is at most start + 4
        assert float(row["final_distance"]) <= float(row["start_distance"]) + 4 + 1e-9
    table = (out / "tiny.md").read_text()
    assert "| planner | base | base+ltm |" in table and "| nwm |" in table
    # one record per finished case: the same command again reads them back (the same table, nothing replayed) ...
    records = out / "records" / "tiny" / "episode_records"
    assert (records / "case_0.npz").is_file()
    # precision=auto is recorded as what it resolved to: fp32 for a checkpoint that declares no cpu_precision
    assert json.loads((records / "run_config.json").read_text())["precision"] == "fp32"
    before = (out / "tiny.csv").read_text()
    (out / "tiny.csv").unlink()
    args = [f"checkpoint={checkpoint}", f"data={cards_data}", "cases=1", "planners=nwm,random_shooting",
            "experts=base|base,ltm", "population=4", "elites=2", "sampler_steps=1", "memorize_steps=1", "horizon=4",
            "goal_offset=4", f"out={out}", "name=tiny", "progress=false"]
    import agents.nwm_protocol as protocol

    played = []
    original = protocol.run_protocol
    protocol.run_protocol = lambda *a, **k: played.append(1) or original(*a, **k)
    try:
        assert main(args) == 0
    finally:
        protocol.run_protocol = original
    assert not played and (out / "tiny.csv").read_text() == before
    # ... and a rerun with other settings into the same records is refused
    with pytest.raises(ValueError, match="other settings"):
        main([*args[:-3], "population=6", *args[-3:]])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="give checkpoint"):
        parse_arguments(["cases=2"])
    with pytest.raises(ValueError, match="unknown planners"):
        parse_arguments(["checkpoint=x", "data=y", "planners=cem,foo"])
    with pytest.raises(ValueError, match="unknown key"):
        parse_arguments(["checkpoint=x", "data=y", "horizn=3"])
    with pytest.raises(ValueError, match="backend must be one of"):
        parse_arguments(["checkpoint=x", "data=y", "backend=slurm"])


@pytest.mark.slow  # the same come_rl.fanout path as test_reproducibility's Ray run (kept in CI); -m slow runs it
def test_cases_on_ray_give_the_local_rows(cards_data: Path, tmp_path: Path) -> None:
    """Cases fanned out over 2 Ray actors (a local 2-CPU cluster) give the rows of the local run, timing aside."""
    import ray

    from agents.nwm_protocol import main

    checkpoint = save_tiny_world_model(tmp_path / "wm", TINY_CARDS, {"kind": "discrete", "dim": 5})
    common = [f"checkpoint={checkpoint}", f"data={cards_data}", "cases=2", "planners=cem,random_shooting",
              "experts=base|base,ltm", "population=4", "elites=2", "sampler_steps=1", "memorize_steps=1",
              "horizon=4", "goal_offset=4", "name=tiny", "progress=false"]
    assert main([*common, f"out={tmp_path / 'local'}"]) == 0
    try:
        assert main([*common, f"out={tmp_path / 'ray'}", "backend=ray", "workers=2"]) == 0
    finally:
        ray.shutdown()
    timing = ("plan_seconds", "memorize_seconds")
    tables = []
    for name in ("local", "ray"):
        with open(tmp_path / name / "tiny.csv") as handle:
            tables.append([{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(handle)])
    assert len(tables[0]) == 8 and tables[0] == tables[1]
