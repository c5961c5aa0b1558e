"""Goal-reaching tasks: a goal image from a recorded trajectory, the agent's episode, and its metrics.

One protocol serves Memory Maze, the point mass and (open loop) RECON-style cases:

1. :func:`record_reference_task`: reset the env with a seed, replay a recorded (or seeded random)
   policy for ``goal_offset`` steps, keep the frames and poses; the goal image is the frame at
   ``goal_offset`` and the reference path is the recorded poses.
2. :func:`run_goal_episode`: reset the env with the same seed (the memory wrapper resets and feeds
   the world model), let the MPC agent act for ``max_steps`` steps towards the goal image, and log
   per-step rows and one episode row: success (final distance to the goal pose < threshold), final
   distance, ATE/RPE of the executed path against the reference path (NWM's convention: translation,
   RMSE, no alignment, RPE delta 1 frame; over the common length of both paths), LPIPS of the final
   frame to the goal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.mpc import MPCAgent
from come_rl.conventions import frames_to_tensor, tensor_to_frames
from come_rl.metrics.trajectory import absolute_trajectory_error, relative_pose_error
from come_rl.seeding import EpisodeSeeds, torch_generator

log = logging.getLogger(__name__)

# policy(info, rng) -> env action
ReferencePolicy = Callable[[dict, np.random.Generator], Any]


@dataclass
class GoalTask:
    """A goal-reaching case.

    Attributes:
        seed: env seed of the start state (the reference was recorded from it).
        goal_frame: uint8 (H, W, 3) goal image.
        goal_pose: (3,) (x, y, yaw) pose at the goal.
        reference_poses: (goal_offset + 1, 3) poses of the recorded path, start included.
        reference_actions: the goal_offset recorded env actions.
        reference_frames: (goal_offset + 1, H, W, 3) uint8 recorded frames.
        reset_options: options passed to ``env.reset`` with the seed.
    """

    seed: int | None
    goal_frame: np.ndarray
    goal_pose: np.ndarray
    reference_poses: np.ndarray
    reference_actions: list = field(default_factory=list)
    reference_frames: np.ndarray | None = None
    reset_options: dict | None = None


def uniform_random_policy(action_space: gym.Space) -> ReferencePolicy:
    """A seeded uniform policy over a Discrete or Box action space (the default reference policy)."""
    if isinstance(action_space, gym.spaces.Discrete):
        return lambda info, rng: int(rng.integers(action_space.n))
    if isinstance(action_space, gym.spaces.Box):
        return lambda info, rng: rng.uniform(action_space.low, action_space.high).astype(action_space.dtype)
    raise ValueError(f"no default reference policy for {action_space}; pass task.reference_policy")


def _pose(info: dict, pose_key: str) -> np.ndarray:
    if pose_key not in info:
        raise KeyError(f"the env's info has no {pose_key!r} pose (keys: {sorted(info)}); goal tasks need poses")
    return np.asarray(info[pose_key], dtype=np.float64).reshape(-1)[:3]


def _frame(observation: Any, frame_key: str | None) -> np.ndarray:
    return np.asarray(observation[frame_key] if frame_key is not None else observation)


def record_reference_task(env: gym.Env, seed: int, goal_offset: int, policy: ReferencePolicy | None = None,
                          reset_options: dict | None = None, frame_key: str | None = None,
                          pose_key: str = "pose", min_goal_distance: float = 0.0, max_attempts: int = 20,
                          policy_seed: int | None = None) -> GoalTask:
    """Record ``goal_offset`` steps of ``policy`` from ``env.reset(seed=seed)``; the last frame is the goal.

    Use the raw env (not the memory wrapper), so that recording does not feed the world model.
    ``policy(info, rng)`` gets a numpy generator seeded with ``policy_seed`` (default ``seed``; ``come_rl.run`` passes
    the episode's own ``policy`` stream, so that the policy's draws are not the env's: gymnasium seeds the env's
    ``np_random`` with the same PCG64 stream ``default_rng(seed)`` gives); default policy: uniform random.
    ``min_goal_distance``: a recording whose goal lies closer than this (in pose units) to the start is redrawn with
    the next policy seed (same start state), up to ``max_attempts`` times, so that a goal is never trivially "stay
    here" (a random policy often turns in place).
    """
    if isinstance(goal_offset, bool) or int(goal_offset) < 1:
        raise ValueError(f"goal_offset must be a positive number of steps, got {goal_offset!r}")
    policy = policy if policy is not None else uniform_random_policy(env.action_space)
    farthest = 0.0
    for attempt in range(max(1, int(max_attempts))):
        if hasattr(policy, "reset"):
            policy.reset()
        policy_root = seed if policy_seed is None else policy_seed
        rng = np.random.default_rng(policy_root if attempt == 0 else (policy_root, attempt))
        observation, info = env.reset(seed=seed, options=reset_options)
        frames, poses, actions = [_frame(observation, frame_key)], [_pose(info, pose_key)], []
        for _ in range(int(goal_offset)):
            action = policy(info, rng)
            observation, _, terminated, truncated, info = env.step(action)
            frames.append(_frame(observation, frame_key))
            poses.append(_pose(info, pose_key))
            actions.append(action)
            if terminated or truncated:
                break
        distance = float(np.linalg.norm(poses[-1][:2] - poses[0][:2]))
        farthest = max(farthest, distance)
        if distance >= min_goal_distance:
            return GoalTask(seed=seed, goal_frame=frames[-1].copy(), goal_pose=poses[-1].copy(),
                            reference_poses=np.stack(poses), reference_actions=actions,
                            reference_frames=np.stack(frames), reset_options=reset_options)
    raise ValueError(f"no reference path from seed {seed} ends {min_goal_distance} or more from its start in "
                     f"{max_attempts} attempts (farthest {farthest:.3f}); lower task.min_goal_distance or raise "
                     f"task.goal_offset")


def path_errors(executed_poses: np.ndarray, reference_poses: np.ndarray) -> tuple[float, float]:
    """(ATE, RPE) of the executed path against the reference over their common length (NaN if too short)."""
    length = min(len(executed_poses), len(reference_poses))
    executed, reference = np.asarray(executed_poses[:length]), np.asarray(reference_poses[:length])
    ate = absolute_trajectory_error(executed, reference) if length >= 1 else math.nan
    rpe = relative_pose_error(executed, reference) if length >= 2 else math.nan
    return float(ate), float(rpe)


def frames_to_model_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (``come_rl.conventions``)."""
    return frames_to_tensor(np.asarray(frames))


@dataclass
class EpisodeResult:
    """What :func:`run_goal_episode` returns: per-step rows, the episode row and frames for a GIF."""

    step_rows: list[dict]
    episode_row: dict
    real_frames: list[np.ndarray]          # uint8 (H, W, 3), start frame first
    imagined_frames: list[np.ndarray]      # uint8 (H, W, 3) imagined for the same steps (start: real)
    executed_poses: np.ndarray | None = None  # (steps + 1, 3) poses, start included


def _model_frame_to_uint8(frame: torch.Tensor) -> np.ndarray:
    return tensor_to_frames(frame)


def _say_why_the_place_is_unknown(agent: MPCAgent, episode_index: int) -> None:
    """A place-aware objective that could not find the goal in memory scores by LPIPS to the goal view instead; that is
    the design for a model without memory (the no-memory ablation: logged at INFO), a warning otherwise (the goal
    view was not memorized, or the model cannot pose its imagined frames), with the objective's reason and fix."""
    objective = agent.objective
    if getattr(objective, "knows_place", True):
        return
    places = getattr(agent.world_model, "places", None)
    level = logging.INFO if places is None or len(places) == 0 else logging.WARNING
    log.log(level, "episode %d: the goal's place is unknown (%s); scoring by LPIPS to the goal view", episode_index,
            getattr(objective, "reason", "no reason given"))


def run_goal_episode(env: gym.Env, agent: MPCAgent, task: GoalTask, max_steps: int, success_threshold: float,
                     episode_index: int = 0, lpips: Callable | None = None, record_frames: bool = True,
                     frame_key: str | None = None, pose_key: str = "pose", preload_memory: bool = False,
                     memorize_steps: int = 25, seeds: EpisodeSeeds | None = None) -> EpisodeResult:
    """Run one goal-reaching episode with the MPC agent; ``env`` is the memory-wrapped env.

    ``preload_memory`` ("explore, then return"): before the agent starts, the world model lives through the
    recorded reference trajectory (start -> goal: frames, actions, poses), memorizes it with ``memorize_steps``
    gradient steps, and the env is reset to the start with that memory kept (``env.preload`` and
    ``env.reset(keep_memory=True)`` of ``envs.memory_wrapper.WorldModelMemoryWrapper``). The episode row
    gets the memorize statistics as ``preload/...`` columns.

    Imagined frames for the GIF come from one extra ``imagine`` of the plan at batch 1 per replan
    (before the env moves, while the world model's state matches the plan's start).

    ``seeds`` (``come_rl.seeding.episode_seeds``): every random source of the episode is seeded from it before the
    episode starts (torch's global generator, memorization, planner, the objective's and the GIF's imagination), so
    the episode's numbers depend on the run seed and the episode index only. None: sources keep their own state.
    """
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    gif_generator = None
    if seeds is not None:
        torch.manual_seed(seeds.torch_global)  # before preload: WorldModel.reset re-draws LoRA adapters from it
        if callable(getattr(env, "set_memorize_seed", None)):
            env.set_memorize_seed(seeds.memorize)
        gif_generator = torch_generator(seeds.rollout_gif)
    preload_row: dict = {}
    if preload_memory:
        if not callable(getattr(env, "preload", None)):
            raise TypeError("preload_memory needs the memory wrapper (envs.memory_wrapper.WorldModelMemoryWrapper) "
                            f"around the env, got {type(env).__name__}")
        if task.reference_frames is None or not task.reference_actions:
            raise ValueError("preload_memory needs a task with reference_frames and reference_actions "
                             "(record it with record_reference_task)")
        preload_row = env.preload(task.reference_frames, task.reference_actions, task.reference_poses,
                                  memorize_steps=memorize_steps)
        observation, info = env.reset(seed=task.seed, options=task.reset_options, keep_memory=True)
        start_frame = _frame(observation, frame_key)
        if not np.array_equal(start_frame, task.reference_frames[0]):
            raise RuntimeError(f"env.reset(seed={task.seed}) did not return the recorded start frame: the env is not "
                               "deterministic for a seed, so the preloaded memory would describe another place")
    else:
        observation, info = env.reset(seed=task.seed, options=task.reset_options)
    if seeds is None:
        agent.reset(goal_frame=task.goal_frame)
    else:
        agent.reset(goal_frame=task.goal_frame, planner_seed=seeds.planner, imagine_seed=seeds.imagine)
    _say_why_the_place_is_unknown(agent, episode_index)
    poses = [_pose(info, pose_key)]
    real_frames = [_frame(observation, frame_key)]
    imagined_frames = [real_frames[0]]
    imagined_plan: torch.Tensor | None = None
    plan_step = 0
    step_rows: list[dict] = []
    for step in range(int(max_steps)):
        action = agent.act(observation, info)
        if record_frames and agent.replanned:
            with torch.no_grad():
                imagined_plan = agent.world_model.imagine(agent.last_plan.unsqueeze(0), generator=gif_generator)[0]
            plan_step = 0
        observation, reward, terminated, truncated, info = env.step(action)
        pose = _pose(info, pose_key)
        poses.append(pose)
        if record_frames:
            real_frames.append(_frame(observation, frame_key))
            imagined_frames.append(_model_frame_to_uint8(imagined_plan[plan_step]))
            plan_step += 1
        step_rows.append({
            "episode": episode_index,
            "step": step,
            "action": action if np.isscalar(action) else " ".join(f"{v:.4g}" for v in np.ravel(action)),
            "x": pose[0], "y": pose[1], "yaw": pose[2],
            "distance_to_goal": float(np.linalg.norm(pose[:2] - task.goal_pose[:2])),
            "replanned": agent.replanned,
            "plan_seconds": agent.last_plan_seconds if agent.replanned else 0.0,
            "reward": float(reward),
            "memorized": bool(info.get("memory/memorized", False)),
            "memorize_seconds": float(info.get("memory/seconds", 0.0)),
        })
        if terminated or truncated:
            break
    executed = np.stack(poses)
    final_distance = float(np.linalg.norm(executed[-1, :2] - task.goal_pose[:2]))
    ate, rpe = path_errors(executed, task.reference_poses)
    final_lpips = math.nan
    if lpips is not None:
        final = frames_to_model_tensor(_frame(observation, frame_key)[None])
        goal = frames_to_model_tensor(task.goal_frame[None])
        final_lpips = float(lpips(final, goal)[0])
    plan_times = [row["plan_seconds"] for row in step_rows if row["replanned"]]
    episode_row = {
        "episode": episode_index,
        "seed": task.seed,
        "steps": len(step_rows),
        "success": final_distance < success_threshold,
        "final_distance": final_distance,
        "start_distance": float(np.linalg.norm(executed[0, :2] - task.goal_pose[:2])),
        "ate": ate,
        "rpe": rpe,
        "lpips_to_goal": final_lpips,
        "mean_plan_seconds": float(np.mean(plan_times)) if plan_times else 0.0,
        "memorize_calls": sum(row["memorized"] for row in step_rows),
        # a place-aware objective says whether the world model's memory told it where the goal is
        **({"knows_place": bool(agent.objective.knows_place)} if hasattr(agent.objective, "knows_place") else {}),
        **preload_row,
    }
    return EpisodeResult(step_rows, episode_row, real_frames, imagined_frames, executed)
