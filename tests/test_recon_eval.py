"""RECON evaluation end to end on a synthetic RECON-layout fixture: exact paths give zero error, the CLI writes the table."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.recon_protocol import evaluate_recon
from come_rl.interfaces import ActionSpec
from envs.recon import ReconGoalTaskSpec, _jpeg_bytes, nwm_step_actions
from planners.objectives import PixelGoalObjective

BOUNDS = ([-2.0, -2.0, -3.2], [2.0, 2.0, 3.2])
TINY_RECON = dict(frame_size=48, unshuffle=3, action_dim=3, context_frames=3, widths=[16, 32, 32], cond_dim=32)


def write_fixture(root: Path) -> tuple[list[ReconGoalTaskSpec], Path]:
    """Two trajectories in NWM's processed layout (jpg frames + traj_data.pkl) and a 3-case navigation CSV."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(["traj_a", "traj_b"]):
        folder = root / name
        folder.mkdir(parents=True)
        steps = 20
        yaw = np.cumsum(rng.uniform(-0.3, 0.3, steps)) + index
        forward = rng.uniform(0.1, 0.3, steps)
        position = np.cumsum(np.stack([forward * np.cos(yaw), forward * np.sin(yaw)], axis=1), axis=0)
        for t in range(steps):
            frame = np.zeros((60, 80, 3), np.uint8)
            frame[..., 0], frame[..., 1] = 10 * t, 100 * index
            (folder / f"{t}.jpg").write_bytes(_jpeg_bytes(frame))
        with open(folder / "traj_data.pkl", "wb") as handle:
            pickle.dump({"position": position, "yaw": yaw}, handle)
    specs = [ReconGoalTaskSpec("traj_a", 3), ReconGoalTaskSpec("traj_a", 8), ReconGoalTaskSpec("traj_b", 5)]
    csv_path = root / "cases.csv"
    csv_path.write_text("traj_name,curr_time,goal_offset,len_traj_pred\n"
                        + "".join(f"{s.traj_name},{s.curr_time},8,8\n" for s in specs))
    return specs, csv_path


class QueuePlanner:
    """Plans given action sequences in order, one per case (a planner whose path is known)."""

    def __init__(self, plans: list[np.ndarray]) -> None:
        self.plans = list(plans)

    def reset(self) -> None:
        pass

    def plan(self, objective, action_spec: ActionSpec, horizon: int) -> torch.Tensor:
        plan = torch.as_tensor(self.plans.pop(0), dtype=torch.float32)
        objective(plan[None])  # the world model imagines it like any candidate
        return plan


def tiny_model(tmp_path: Path):
    from test_nwm_protocol import save_tiny_world_model

    from come_rl.world_model import WorldModel

    spec = {"kind": "continuous", "dim": 3, "low": BOUNDS[0], "high": BOUNDS[1]}
    return save_tiny_world_model(tmp_path / "recon_wm", TINY_RECON, spec), WorldModel


def test_recorded_step_actions_give_zero_error(tmp_path: Path) -> None:
    specs, _ = write_fixture(tmp_path / "recon")
    checkpoint, world_model_class = tiny_model(tmp_path)
    model = world_model_class.load(checkpoint, sampler={"steps": 1}, experts=["base"])
    assert model.action_spec.kind == "continuous" and model.action_spec.dim == 3
    true_plans = []
    for spec in specs:
        with open(tmp_path / "recon" / spec.traj_name / "traj_data.pkl", "rb") as handle:
            data = pickle.load(handle)
        true_plans.append(nwm_step_actions(data["position"], data["yaw"], spec.curr_time, 8))
    rows = evaluate_recon(model, QueuePlanner(true_plans), tmp_path / "recon", specs,
                          objective_factory=PixelGoalObjective, progress=False)
    assert len(rows) == 3
    for row in rows:
        assert row["ate"] == pytest.approx(0.0, abs=1e-5) and row["rpe"] == pytest.approx(0.0, abs=1e-5)
        assert row["final_distance"] == pytest.approx(0.0, abs=1e-5)
    # standing still: every predicted pose is the start pose; ATE = RMSE over the 9 poses of |p_t - p_start| / 0.25
    standing = [np.zeros((8, 3)) for _ in specs]
    rows = evaluate_recon(model, QueuePlanner(standing), tmp_path / "recon", specs,
                          objective_factory=PixelGoalObjective, progress=False)
    for row, spec in zip(rows, specs):
        with open(tmp_path / "recon" / spec.traj_name / "traj_data.pkl", "rb") as handle:
            position = pickle.load(handle)["position"]
        path = position[spec.curr_time: spec.curr_time + 9] / 0.25
        hand_ate = np.sqrt(np.mean(np.sum((path - path[0]) ** 2, axis=1)))
        assert row["ate"] == pytest.approx(hand_ate, rel=1e-6)
        assert row["final_distance"] == pytest.approx(np.linalg.norm(path[-1] - path[0]), rel=1e-6)
        assert row["start_distance"] == pytest.approx(row["final_distance"], rel=1e-9)


def test_cli_recon_writes_ate_rpe_table(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    import come_rl.run
    from come_rl.run import run

    _, csv_path = write_fixture(tmp_path / "recon")
    checkpoint, _ = tiny_model(tmp_path)
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(Path(come_rl.run.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "env=recon", "agent=nwm", f"data_dir={tmp_path / 'recon'}", f"env.cases_csv={csv_path}",
            f"model.checkpoint={checkpoint}", "model.sampler_steps=1", "planner.num_samples=4", "planner.top_k=2",
            "planner.repeats=1", "agent.objective._target_=planners.objectives.PixelGoalObjective",
            "run.name=recon_test", f"run.out_dir={out}", "run.progress=false", "run.threads=1"])
    summary = run(cfg)
    assert summary["cases"] == 3 and np.isfinite(summary["ate"]) and np.isfinite(summary["rpe"])
    with open(out / "recon_cases.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["traj_name"] for row in rows] == ["traj_a", "traj_a", "traj_b"]
    for row in rows:
        plan = np.array([[float(v) for v in step.split("/")] for step in row["plan"].split()])
        # NWM's plan is one constant (dx, dy, dyaw) delta repeated over the 8 steps, inside the model's bounds
        assert plan.shape == (8, 3) and np.allclose(plan, plan[0], atol=1e-3)
        assert np.all(plan >= np.array(BOUNDS[0]) - 1e-6) and np.all(plan <= np.array(BOUNDS[1]) + 1e-6)
    table = (out / "recon_cases.md").read_text()
    assert "waypoint spacings of 0.25 m" in table and "| NWMPlanner | base |" in table  # no Hydra run: the class names the planner


def test_missing_recon_folder_fails_before_work(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    import come_rl.run
    from come_rl.run import run

    with initialize_config_dir(config_dir=str(Path(come_rl.run.__file__).parent / "conf"), version_base="1.3"):
        missing = compose(config_name="config", overrides=["env=recon", "agent=nwm", "run.name=x",
                                                           f"data_dir={tmp_path / 'nope'}"])
        unset = compose(config_name="config", overrides=["env=recon", "agent=nwm", "run.name=x"])
    with pytest.raises(FileNotFoundError, match="RECON data_dir .* does not exist"):
        run(missing)
    with pytest.raises(ValueError, match="pass data_dir=PATH"):
        run(unset)


def test_an_interrupted_recon_evaluation_resumes_from_its_case_records(tmp_path: Path) -> None:
    """Each finished case is recorded; a rerun of the same command plays only the missing ones and writes the table an
    uninterrupted run writes (plan seconds aside); another configuration is refused; max_cases may grow."""
    from hydra import compose, initialize_config_dir

    import come_rl.run
    from come_rl.run import run

    _, csv_path = write_fixture(tmp_path / "recon")
    checkpoint, _ = tiny_model(tmp_path)

    def config(out: Path, *extra: str):
        with initialize_config_dir(config_dir=str(Path(come_rl.run.__file__).parent / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=[
                "env=recon", "agent=cem", f"data_dir={tmp_path / 'recon'}", f"env.cases_csv={csv_path}",
                f"model.checkpoint={checkpoint}", "model.sampler_steps=1", "planner.population=6",
                "agent.objective._target_=planners.objectives.PixelGoalObjective",
                "run.name=recon_resume", f"run.out_dir={out}", "run.progress=false", "run.threads=1", *extra])

    def table(out: Path) -> list[dict]:
        with open(out / "recon_cases.csv") as handle:
            return [{k: v for k, v in row.items() if k != "plan_seconds"} for row in csv.DictReader(handle)]

    run(config(tmp_path / "whole"))
    run(config(tmp_path / "parts", "env.max_cases=2"))  # a run stopped after two cases ...
    records = tmp_path / "parts" / "episode_records"
    first = (records / "recon_case_0000.npz").stat().st_mtime_ns
    (records / "recon_case_0001.npz").unlink()  # ... and killed while the second was being recorded
    run(config(tmp_path / "parts"))  # the same command: cases 1 and 2 played, case 0 read back
    assert (records / "recon_case_0000.npz").stat().st_mtime_ns == first
    assert sorted(p.name for p in records.glob("recon_case_*.npz")) == [f"recon_case_000{i}.npz" for i in range(3)]
    assert table(tmp_path / "parts") == table(tmp_path / "whole")
    assert len(table(tmp_path / "whole")) == 3 and len({row["plan"] for row in table(tmp_path / "whole")}) > 1
    with pytest.raises(ValueError, match="other settings"):
        run(config(tmp_path / "parts", "planner.population=8"))
