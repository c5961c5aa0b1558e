"""Run N goal-reaching episodes and write what a person wants to read afterwards.

``results/<run>/``:
    steps.csv, steps.md        one row per env step (pose, distance to goal, planning time, memorize)
    episodes.csv, episodes.md  one row per episode (success, final distance, ATE, RPE, LPIPS to goal)
    summary.csv, summary.md    the means over episodes
    distance.png               distance to the goal over steps, and executed vs reference paths
    rollout.gif                real | imagined | goal frames of the first episode(s)
    episode_records/           one ``episode_<index>.npz`` per finished episode: its rows, path and GIF frames
    run_config.json            the configuration the episodes were run with

Crash safety: an episode is finished when its record is (written atomically, in one file: a kill leaves the whole
record or none). The tables, the plot and the GIF are rebuilt from the records, never appended to, so a killed run
leaves no torn or duplicated row, and running the same command into the same directory again skips the episodes whose
record exists (each episode has its own seeds, so it does not need the ones before it: ``come_rl.seeding``) and
finishes with the tables an uninterrupted run writes. A rerun whose configuration differs from ``run_config.json`` is
refused, since its episodes would not belong in one table.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from agents.goal_tasks import EpisodeResult, GoalTask, run_goal_episode
from agents.mpc import MPCAgent
from come_rl.episode_records import compare_settings, read_record, write_record
from come_rl.io_utils import atomic_write_bytes, atomic_write_text
from come_rl.results import write_table
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
        # the share of episodes whose objective found the goal's place in the world model's memory
        **({"knows_place": mean("knows_place")} if episode_rows and "knows_place" in episode_rows[0] else {}),
    }


RUN_CONFIG_NAME = "run_config.json"
RECORDS_DIR_NAME = "episode_records"
TABLE_NAMES = ("steps", "episodes", "summary")
# what a run writes directly in its directory (their temporary files are removed before a rerun)
OUTPUT_NAMES = (*(f"{name}.{suffix}" for name in TABLE_NAMES for suffix in ("csv", "md")), "distance.png",
                "rollout.gif", RUN_CONFIG_NAME)
_RECORD_PATTERN = re.compile(r"episode_(\d+)\.npz")


def record_path(out_dir: Path, index: int) -> Path:
    return out_dir / RECORDS_DIR_NAME / f"episode_{index:06d}.npz"


def _plain(value: Any) -> Any:
    """A numpy or torch scalar as the Python scalar it holds (what JSON stores and the CSV writer prints alike)."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()
    return float(value) if isinstance(value, float) else value


def save_episode_record(out_dir: Path, result: EpisodeResult) -> EpisodeResult:
    """Write the episode's record atomically and return the result as the record holds it.

    Rows go through JSON (exact for Python floats, NaN included), so the tables of an uninterrupted run and of a
    resumed one, which reads earlier episodes back from their records, are written from the same values.
    """
    rows = {"episode_row": {key: _plain(value) for key, value in result.episode_row.items()},
            "step_rows": [{key: _plain(value) for key, value in row.items()} for row in result.step_rows]}
    text = json.dumps(rows, allow_nan=True)
    write_record(record_path(out_dir, int(result.episode_row["episode"])), rows,
                 executed_poses=np.asarray(result.executed_poses, dtype=np.float64),
                 real_frames=np.stack(result.real_frames), imagined_frames=np.stack(result.imagined_frames))
    rows = json.loads(text)
    return EpisodeResult(rows["step_rows"], rows["episode_row"], list(result.real_frames),
                         list(result.imagined_frames), np.asarray(result.executed_poses, dtype=np.float64))


def load_episode_record(path: Path) -> EpisodeResult:
    """An :class:`EpisodeResult` from its record (``np.load`` without pickle: the rows are a JSON string)."""
    rows, record = read_record(path)
    return EpisodeResult(rows["step_rows"], rows["episode_row"], list(record["real_frames"]),
                         list(record["imagined_frames"]), record["executed_poses"])


def _remove_stray_files(out_dir: Path) -> None:
    """Temporary files of writes a kill interrupted: an atomic write's ``.<name>.<random>.tmp``, a table's staging
    copy ``.<name>.staging`` and its own temporary file, the plot's ``distance.png.tmp.png``. Only names this runner
    writes, so a shared directory keeps the rest."""
    for name in OUTPUT_NAMES:
        for pattern in (f".{name}.*.tmp", f".{name}.staging", f"..{name}.staging.*.tmp"):
            for stray in out_dir.glob(pattern):
                stray.unlink(missing_ok=True)
    (out_dir / "distance.png.tmp.png").unlink(missing_ok=True)
    for stray in (out_dir / RECORDS_DIR_NAME).glob(".episode_*.tmp"):
        stray.unlink(missing_ok=True)


def check_run_directory(out_dir: str | Path, run_config: Mapping | None) -> bool:
    """Whether a run with ``run_config`` resumes in ``out_dir`` (it holds a ``run_config.json`` equal to it).

    Raises ValueError, naming the differences and the fix, when the directory holds episode records of another
    configuration; tables of another configuration without records (committed results) mean a fresh start.
    Changes nothing, so ``come_rl.run`` calls it before any work (and :func:`open_run_directory` again).
    """
    if run_config is None:
        return False
    return compare_settings(Path(out_dir) / RUN_CONFIG_NAME, run_config,
                            any((Path(out_dir) / RECORDS_DIR_NAME).glob("episode_*.npz")), out=Path(out_dir),
                            key="config", out_option="run.out_dir")


def open_run_directory(out_dir: Path, run_config: Mapping | None, episodes: int) -> dict[int, EpisodeResult]:
    """Prepare ``out_dir`` for a run of ``episodes`` episodes; return the finished episodes found there by index.

    ``run_config``: what the episodes' numbers depend on (``come_rl.run`` passes the resolved configuration). When
    ``out_dir`` holds a ``run_config.json`` equal to it, the run resumes: its episode records are kept. Another
    configuration is refused (:func:`check_run_directory`). No ``run_config.json`` (a fresh directory, or an older
    runner's tables), or ``run_config=None`` (a caller that cannot say what its numbers depend on): the directory's
    tables and records are deleted and the run starts over.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stray_files(out_dir)
    records_dir = out_dir / RECORDS_DIR_NAME
    if not check_run_directory(out_dir, run_config):  # start over: nothing in the directory belongs to this run
        for name in OUTPUT_NAMES:
            (out_dir / name).unlink(missing_ok=True)
        for path in records_dir.glob("episode_*.npz"):
            path.unlink()
        if run_config is not None:
            text = json.dumps({"format": 1, "config": run_config}, indent=1, allow_nan=True)
            atomic_write_text(out_dir / RUN_CONFIG_NAME, text + "\n")
        return {}
    finished: dict[int, EpisodeResult] = {}
    for path in sorted(records_dir.glob("episode_*.npz")):
        match = _RECORD_PATTERN.fullmatch(path.name)
        if match is None:
            continue
        index = int(match.group(1))
        if index >= episodes:
            raise ValueError(f"{out_dir} holds episode {index} of a run of more episodes; pass "
                             f"run.episodes={index + 1} or more to resume it, or use another run.out_dir")
        try:
            finished[index] = load_episode_record(path)
        except Exception as error:  # a record is written atomically: this one was damaged later; run it again
            print(f"{path} cannot be read ({type(error).__name__}: {error}); episode {index} is run again")
            path.unlink()
    return finished


def _write_tables(out_dir: Path, results: Sequence[EpisodeResult], summary: dict | None = None) -> None:
    """steps.csv and episodes.csv (+ .md) of ``results`` in episode order, and summary.csv when given; each table
    replaced as a whole (``results.write_table``), so it never holds a torn or repeated row."""
    tables = {"steps": [row for result in results for row in result.step_rows],
              "episodes": [result.episode_row for result in results]}
    if summary is not None:
        tables["summary"] = [summary]
    for name, rows in tables.items():
        write_table(out_dir / f"{name}.csv", rows, title=f"{out_dir.name}: {name}")


@dataclass
class GoalEpisodePlayer:
    """What one process needs to play episodes of a goal-reaching run: the memory-wrapped env, the agent and the
    per-episode settings. :func:`run_goal_episodes` plays with one in this process; ``come_rl.run`` builds one in every
    Ray worker (``run.backend=ray``), so both paths play an episode by the same call."""

    env: gym.Env
    agent: MPCAgent
    max_steps: int
    success_threshold: float
    lpips: Callable | None = None
    gif_episodes: int = 1
    frame_key: str | None = None
    pose_key: str = "pose"
    preload_memory: bool = False
    memorize_steps: int = 25

    def play(self, index: int, task: GoalTask, seeds: EpisodeSeeds | None) -> EpisodeResult:
        return run_goal_episode(self.env, self.agent, task, self.max_steps, self.success_threshold,
                                episode_index=index, lpips=self.lpips, record_frames=index < self.gif_episodes,
                                frame_key=self.frame_key, pose_key=self.pose_key, preload_memory=self.preload_memory,
                                memorize_steps=self.memorize_steps, seeds=seeds)


def run_goal_episodes(env: gym.Env | None, agent: MPCAgent | None, tasks: Sequence[GoalTask], max_steps: int,
                      success_threshold: float, out_dir: str | Path, lpips: Callable | None = None,
                      gif_episodes: int = 1, frame_key: str | None = None, pose_key: str = "pose",
                      run_info: dict | None = None, progress: bool = True, preload_memory: bool = False,
                      memorize_steps: int = 25, seeds: Sequence[EpisodeSeeds] | None = None,
                      run_config: Mapping | None = None,
                      play: Callable[[Sequence[int]], Iterable[EpisodeResult]] | None = None) -> list[EpisodeResult]:
    """Run one episode per task and write the tables, the plot and the GIF under ``out_dir``.

    ``play(indices)``: yields the results of those episodes in order, played elsewhere (``come_rl.run``'s Ray
    workers, each with its own :class:`GoalEpisodePlayer`); ``env`` and ``agent`` are then unused. Default: played
    here, one after the other, by a :class:`GoalEpisodePlayer` of ``env`` and ``agent``.

    ``run_info`` (agent/env/model names ...) is prepended to the summary row. ``preload_memory`` /
    ``memorize_steps``: see :func:`agents.goal_tasks.run_goal_episode` ("explore, then return"). ``seeds``: one
    :class:`come_rl.seeding.EpisodeSeeds` per task (``come_rl.run`` derives them from ``run.seed``).
    ``run_config``: the configuration the episodes' numbers depend on; given, a rerun into ``out_dir`` resumes after
    the episodes already finished there (see the module docstring and :func:`open_run_directory`); None starts over.
    """
    if seeds is not None and len(seeds) != len(tasks):
        raise ValueError(f"got {len(seeds)} episode seeds for {len(tasks)} tasks; give one per task or none")
    out_dir = Path(out_dir)
    resuming = check_run_directory(out_dir, run_config)
    results = open_run_directory(out_dir, run_config, len(tasks))
    for index, result in results.items():
        recorded_seed = result.episode_row.get("seed")
        if recorded_seed != _plain(tasks[index].seed):
            raise ValueError(f"{record_path(out_dir, index)} was run from env seed {recorded_seed}, this run's episode "
                             f"{index} starts from {tasks[index].seed}; use another run.out_dir, or delete {out_dir}")
    todo = [index for index in range(len(tasks)) if index not in results]
    if resuming:
        first = todo[0] if todo else len(tasks)
        print(f"resumed {out_dir} from episode {first}: {len(results)} of {len(tasks)} episodes already finished"
              + ("" if todo else "; rebuilding the tables"), flush=True)
    if play is None:
        if env is None or agent is None:
            raise ValueError("run_goal_episodes needs env and agent, or play= to play the episodes elsewhere")
        player = GoalEpisodePlayer(env, agent, max_steps, success_threshold, lpips=lpips, gif_episodes=gif_episodes,
                                   frame_key=frame_key, pose_key=pose_key, preload_memory=preload_memory,
                                   memorize_steps=memorize_steps)

        def play(indices: Sequence[int]) -> Iterable[EpisodeResult]:
            for index in indices:
                yield player.play(index, tasks[index], None if seeds is None else seeds[index])

    bar = tqdm(total=len(tasks), initial=len(results), desc="episodes", unit="ep", disable=not progress)
    for index, result in zip(todo, play(todo), strict=True):
        if int(result.episode_row["episode"]) != index:
            raise RuntimeError(f"play() returned episode {result.episode_row['episode']} where episode {index} was due")
        results[index] = save_episode_record(out_dir, result)  # the episode counts as finished from here on
        _write_tables(out_dir, [results[i] for i in sorted(results)])  # the rows so far, for a reader to watch
        bar.update(1)
        bar.set_postfix(success=result.episode_row["success"], dist=f"{result.episode_row['final_distance']:.3f}")
    bar.close()
    ordered = [results[index] for index in range(len(tasks))]
    summary = {**(run_info or {}), **summarize([r.episode_row for r in ordered])}
    _write_tables(out_dir, ordered, summary)
    write_plot(ordered, tasks, out_dir / "distance.png")
    gif_results = [r for r in ordered[:gif_episodes] if len(r.imagined_frames) > 1]
    if gif_results:
        write_gif(gif_results, tasks, out_dir / "rollout.gif")
    return ordered


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
