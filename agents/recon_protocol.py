"""NWM's RECON goal reaching, open loop (``python -m come_rl.run env=recon agent=nwm data_dir=...``).

Per navigation-eval case (NWM's 100 shipped in ``envs/data/recon_navigation_eval.csv``): the world model observes the
4 context frames (and may memorize them), a planner picks ``len_traj_pred`` (dx, dy, dyaw) steps toward the goal frame
once, the steps are integrated from the start pose (``envs.recon.step_actions_to_poses``) and scored against the
recorded poses: ATE, RPE (``agents.goal_tasks.path_errors``, NWM's convention) and the final distance, in NWM's units
(waypoint spacings of 0.25 m). The protocol on recorded Memory Maze / Memory Cards episodes is ``agents.nwm_protocol``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from agents.goal_tasks import path_errors
from agents.nwm_protocol import observe_case
from come_rl.episode_records import recorded_episode
from come_rl.interfaces import ActionSpec
from come_rl.seeding import accepts_keyword, derive_seed
from envs.recon import (
    WAYPOINT_SPACING_METRES,
    iterate_goal_tasks,
    load_navigation_eval_tasks,
    load_recon_trajectory,
    nwm_step_actions,
    step_actions_to_poses,
)


def recon_context_actions(trajectory: Any, spec: Any, action_spec: ActionSpec) -> np.ndarray:
    """(context - 1, 3) NWM step actions between consecutive context frames, clipped to the model's bounds."""
    first = spec.curr_time - spec.context_size + 1
    actions = np.stack([nwm_step_actions(trajectory.position, trajectory.yaw, time_, 1)[0]
                        for time_ in range(first, spec.curr_time)]) if spec.context_size > 1 else np.zeros((0, 3))
    return np.clip(actions, action_spec.low, action_spec.high).astype(np.float32)


def evaluate_recon(world_model: Any, planner: Any, root: str | Path, specs: list | None = None,
                   objective_factory: Callable[..., Any] | None = None, memorize_steps: int = 0,
                   max_cases: int | None = None, progress: bool = True, records: Path | None = None,
                   seed: int = 0) -> list[dict]:
    """NWM's RECON protocol: per navigation-eval case (default the 100 shipped ones), observe the 4 context frames,
    plan ``len_traj_pred`` (dx, dy, dyaw) steps toward the goal frame, integrate them from the start pose and
    score against the recorded poses. ATE, RPE and final distance are in NWM's units (waypoint spacings, 0.25 m).

    Every case seeds the planner and torch's global generator (imagination, memorization) from (``seed``, case), so a
    case gives the same row whether it runs first, last or alone. ``records`` (a directory checked by
    ``come_rl.episode_records.check_records``): each finished case is recorded there atomically and a rerun skips it.
    """
    action_spec = world_model.action_spec
    if action_spec.kind != "continuous" or action_spec.dim != 3:
        raise ValueError(f"RECON needs a world model with continuous (dx, dy, dyaw) actions, got {action_spec.kind} "
                         f"dim {action_spec.dim}; train one on RECON (come_rl.train) and pass model.checkpoint=PATH")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"RECON data_dir {root} does not exist; pass data_dir=<folder of processed RECON "
                                "trajectories> (see envs.recon for the layout and the hdf5 converter)")
    if objective_factory is None:
        from come_rl.metrics.lpips_metric import get_lpips
        from planners.objectives import LPIPSGoalObjective

        lpips = get_lpips()

        def objective_factory(world_model, goal_frame):
            return LPIPSGoalObjective(world_model, goal_frame, lpips=lpips)
    specs = list(specs if specs is not None else load_navigation_eval_tasks())
    if max_cases is not None:
        specs = specs[:max_cases]
    trajectories: dict[str, Any] = {}
    rows = []
    size = world_model.frame_shape[-1]
    for index, task in enumerate(tqdm(iterate_goal_tasks(root, specs, image_size=size), total=len(specs),
                                      desc="RECON cases", unit="case", disable=not progress)):
        row, _ = recorded_episode(records, f"recon_case_{index:04d}",
                                  lambda index=index, task=task: (_play_recon_case(  # noqa: B023
                                      world_model, planner, objective_factory, trajectories, root, index, task,
                                      memorize_steps, seed), []))
        rows.append(row)
    return rows


def _play_recon_case(world_model, planner, objective_factory, trajectories: dict, root: Path, index: int, task,
                     memorize_steps: int, seed: int) -> dict:
    action_spec = world_model.action_spec
    torch.manual_seed(derive_seed(seed, "recon_case_torch", index))
    spec = task.spec
    if spec.traj_name not in trajectories:
        trajectories[spec.traj_name] = load_recon_trajectory(root, spec.traj_name)
    context_actions = recon_context_actions(trajectories[spec.traj_name], spec, action_spec)
    stats = observe_case(world_model, task.context_frames, context_actions, None, memorize_steps)
    if accepts_keyword(planner.reset, "seed"):
        planner.reset(seed=derive_seed(seed, "recon_case_planner", index))
    else:  # a user's planner without seed=: its own generator keeps running across cases
        planner.reset()
    objective = objective_factory(world_model=world_model, goal_frame=task.goal_frame)
    start = time.perf_counter()
    plan = torch.as_tensor(planner.plan(objective, action_spec, spec.len_traj_pred), dtype=torch.float32)
    plan_seconds = time.perf_counter() - start
    poses = step_actions_to_poses(plan.numpy().astype(np.float64), task.start_pose)
    units = np.array([WAYPOINT_SPACING_METRES, WAYPOINT_SPACING_METRES, 1.0])
    predicted = np.concatenate([task.start_pose[None], poses]) / units
    reference = np.concatenate([task.start_pose[None], task.true_poses]) / units
    ate, rpe = path_errors(predicted, reference)
    goal = task.goal_pose / units
    return {
        "case": index, "traj_name": spec.traj_name, "curr_time": spec.curr_time,
        "ate": ate, "rpe": rpe,
        "final_distance": float(np.linalg.norm(predicted[-1, :2] - goal[:2])),
        "start_distance": float(np.linalg.norm(predicted[0, :2] - goal[:2])),
        "plan_seconds": plan_seconds, "memorize_loss": float(stats.get("loss_last", math.nan)),
        "plan": " ".join("/".join(f"{v:.3g}" for v in row) for row in plan.numpy()),
    }
