"""Run N goal-reaching episodes and write what a person wants to read afterwards.

``results/<run>/``:
    steps.csv, steps.md        one row per env step (pose, distance to goal, planning time, memorize)
    episodes.csv, episodes.md  one row per episode (success, final distance, ATE, RPE, LPIPS to goal)
    summary.csv, summary.md    the means over episodes
    distance.png               distance to the goal over steps, and executed vs reference paths
    rollout.gif                real | imagined | goal frames of the first episode(s)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from agents.goal_tasks import EpisodeResult, GoalTask, run_goal_episode
from agents.mpc import MPCAgent
from come_rl.io_utils import atomic_write_bytes
from come_rl.results import append_rows, write_markdown_table
from come_rl.seeding import EpisodeSeeds


def summarize(episode_rows: Sequence[dict]) -> dict:
    """Means over episodes (NaN-aware) of the episode metrics."""
    def mean(key: str) -> float:
        values = [float(row[key]) for row in episode_rows if not math.isnan(float(row[key]))]
        return float(np.mean(values)) if values else math.nan

    return {
        "episodes": len(episode_rows),
        "success_rate": mean("success"),
        "final_distance": mean("final_distance"),
        "start_distance": mean("start_distance"),
        "ate": mean("ate"),
        "rpe": mean("rpe"),
        "lpips_to_goal": mean("lpips_to_goal"),
        "mean_plan_seconds": mean("mean_plan_seconds"),
        **({"preload_seconds": mean("preload/seconds")} if episode_rows and "preload/seconds" in episode_rows[0] else {}),
    }


def run_goal_episodes(env: gym.Env, agent: MPCAgent, tasks: Sequence[GoalTask], max_steps: int,
                      success_threshold: float, out_dir: str | Path, lpips: Callable | None = None,
                      gif_episodes: int = 1, frame_key: str | None = None, pose_key: str = "pose",
                      run_info: dict | None = None, progress: bool = True, preload_memory: bool = False,
                      memorize_steps: int = 25, seeds: Sequence[EpisodeSeeds] | None = None) -> list[EpisodeResult]:
    """Run one episode per task and write the tables, the plot and the GIF under ``out_dir``.

    ``run_info`` (agent/env/model names ...) is prepended to the summary row. ``preload_memory`` /
    ``memorize_steps``: see :func:`agents.goal_tasks.run_goal_episode` ("explore, then return"). ``seeds``: one
    :class:`come_rl.seeding.EpisodeSeeds` per task (``come_rl.run`` derives them from ``run.seed``).
    """
    if seeds is not None and len(seeds) != len(tasks):
        raise ValueError(f"got {len(seeds)} episode seeds for {len(tasks)} tasks; give one per task or none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("steps.csv", "episodes.csv", "summary.csv"):
        (out_dir / name).unlink(missing_ok=True)  # a run directory holds one run's rows
    results = []
    bar = tqdm(tasks, desc="episodes", unit="ep", disable=not progress)
    for index, task in enumerate(bar):
        result = run_goal_episode(env, agent, task, max_steps, success_threshold, episode_index=index, lpips=lpips,
                                  record_frames=index < gif_episodes, frame_key=frame_key, pose_key=pose_key,
                                  preload_memory=preload_memory, memorize_steps=memorize_steps,
                                  seeds=None if seeds is None else seeds[index])
        results.append(result)
        append_rows(out_dir / "steps.csv", result.step_rows)
        append_rows(out_dir / "episodes.csv", [result.episode_row])
        bar.set_postfix(success=result.episode_row["success"], dist=f"{result.episode_row['final_distance']:.3f}")
    summary = {**(run_info or {}), **summarize([r.episode_row for r in results])}
    append_rows(out_dir / "summary.csv", [summary])
    for name in ("steps", "episodes", "summary"):
        write_markdown_table(out_dir / f"{name}.csv", out_dir / f"{name}.md", title=f"{out_dir.name}: {name}")
    write_plot(results, tasks, out_dir / "distance.png")
    gif_results = [r for r in results[:gif_episodes] if len(r.imagined_frames) > 1]
    if gif_results:
        write_gif(gif_results, tasks, out_dir / "rollout.gif")
    return results


def write_plot(results: Sequence[EpisodeResult], tasks: Sequence[GoalTask], path: Path) -> Path:
    """Distance to goal per step (left) and executed vs reference (x, y) paths (right), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result, task in zip(results, tasks):
        index = result.episode_row["episode"]
        distances = [result.episode_row["start_distance"]] + [row["distance_to_goal"] for row in result.step_rows]
        left.plot(range(len(distances)), distances, label=f"episode {index}")
        executed = result.executed_poses
        line, = right.plot(executed[:, 0], executed[:, 1], "-o", markersize=2, label=f"executed {index}")
        right.plot(task.reference_poses[:, 0], task.reference_poses[:, 1], "--", color=line.get_color(), alpha=0.6)
        right.plot(*task.goal_pose[:2], "*", color=line.get_color(), markersize=12)
    left.set_xlabel("step")
    left.set_ylabel("distance to goal pose")
    left.set_title("distance to goal")
    right.set_title("paths (dashed: reference, star: goal)")
    right.set_aspect("equal", adjustable="datalim")
    if len(results) <= 8:
        left.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return path


def write_gif(results: Sequence[EpisodeResult], tasks: Sequence[GoalTask], path: Path, scale: int = 3) -> Path:
    """Frames [real | imagined | goal] side by side, upscaled ``scale`` times, 4 frames per second."""
    import imageio.v3 as iio

    frames = []
    for result, task in zip(results, tasks):
        for real, imagined in zip(result.real_frames, result.imagined_frames):
            separator = np.full((real.shape[0], 2, 3), 255, dtype=np.uint8)
            row = np.concatenate([real, separator, imagined, separator, task.goal_frame], axis=1)
            frames.append(np.repeat(np.repeat(row, scale, axis=0), scale, axis=1))
    data = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=250, loop=0)
    atomic_write_bytes(path, data)
    return path
