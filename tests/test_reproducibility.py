"""Reproducibility: the main command run twice with one seed (locally and on Ray) writes the same CSVs (outside timing
columns).

Two processes, not two calls in one: torch seeds its global generator from OS entropy in every new process, so a
random source that ``run.seed`` does not reach shows up only across processes (before the fix: the memorization
losses ``preload/loss_first`` and every planning decision that depends on imagined noise).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from come_rl.seeding import EpisodeSeeds, derive_seed, episode_seeds

# The main command (README) with a budget of seconds: 2 episodes of 3 steps, 4 candidates, one denoising step,
# memorization in the preload (2 steps) and in the stream (1 step after the 3rd env step), the GIF's imagine on.
TINY_MAIN = [
    "agent=cem", "env=memory_maze", "run.episodes=2", "run.threads=1", "run.progress=false", "run.gif_episodes=1",
    "planner.population=4", "planner.elites=2", "agent.horizon=2", "agent.replan_every=1",
    "env.task.goal_offset=3", "env.task.max_steps=3", "env.task.min_goal_distance=0", "env.task.memorize_steps=2",
    "model.sampler_steps=1", "+model.memorize={batch_size: 2}", "memory.memorize_every=3", "memory.memorize_steps=1",
]

# Wall-clock columns: the only ones allowed to differ between two runs of one command.
TIMING_COLUMNS = {
    "steps.csv": {"plan_seconds", "memorize_seconds"},
    "episodes.csv": {"mean_plan_seconds", "preload/seconds"},
    "summary.csv": {"mean_plan_seconds", "preload_seconds"},
}


def run_main(out_dir: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "come_rl.run", *TINY_MAIN, f"run.out_dir={out_dir}", *extra],
                          check=False,
                          cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def read_without_timing(path: Path) -> tuple[list[str], list[dict]]:
    """The CSV's header and its rows without the timing columns (which must exist: a renamed column would otherwise
    be compared, fail, and hide that this list is stale)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    timing = TIMING_COLUMNS[path.name]
    assert timing <= set(header), f"{path.name}: timing columns {sorted(timing - set(header))} are gone; update the list"
    return header, [{key: value for key, value in row.items() if key not in timing} for row in rows]


def test_derived_seeds_are_stable_named_and_independent() -> None:
    # stable across processes and versions: a hash of (seed, names), not Python's salted hash()
    assert derive_seed(0, "planner") == derive_seed(0, "planner")
    values = {derive_seed(seed, name, index) for seed in (0, 1) for name in ("planner", "imagine") for index in (0, 1)}
    assert len(values) == 8, "every (seed, name, episode) gets its own stream"
    seeds = episode_seeds(7, 2)
    assert isinstance(seeds, EpisodeSeeds) and seeds.env == 9, "the env seed stays readable: run.seed + episode"
    streams = [value for key, value in vars(seeds).items() if key != "env"]
    assert len(set(streams)) == len(streams)
    assert seeds == episode_seeds(7, 2) and seeds != episode_seeds(7, 3) and seeds != episode_seeds(8, 2)
    draws = [torch.randn(4, generator=torch.Generator().manual_seed(seeds.planner)),
             torch.randn(4, generator=torch.Generator().manual_seed(seeds.imagine))]
    assert not torch.equal(*draws)
    assert np.random.default_rng(seeds.policy).integers(1 << 30) != np.random.default_rng(seeds.memorize).integers(1 << 30)
    with pytest.raises(ValueError, match="run.seed"):
        derive_seed(-1, "planner")


def test_the_main_command_gives_identical_csvs_in_another_process_and_on_ray(tmp_path: Path) -> None:
    """One command run twice, locally and with run.backend=ray run.workers=2 (the episodes play in two Ray actors, new
    processes, on a local 2-CPU cluster): the tables, outside timing columns, and the GIF are identical. The second run
    is in other processes, so it also checks that no random source escapes run.seed."""
    import ray  # noqa: F401  (a hard dependency: a broken install fails here, never skips)
    local, fanned = tmp_path / "local", tmp_path / "ray"
    result = run_main(local, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_main(fanned, tmp_path, "run.backend=ray", "run.workers=2")
    assert result.returncode == 0, result.stderr[-4000:]
    for name in TIMING_COLUMNS:
        header_a, rows_a = read_without_timing(local / name)
        header_b, rows_b = read_without_timing(fanned / name)
        assert header_a == header_b
        assert rows_a, f"{name} is empty"
        for index, (row_a, row_b) in enumerate(zip(rows_a, rows_b, strict=True)):
            differing = {key: (row_a[key], row_b[key]) for key in row_a if row_a[key] != row_b[key]}
            assert not differing, f"{name} row {index} differs between two runs of one command: {differing}"
    assert (local / "rollout.gif").read_bytes() == (fanned / "rollout.gif").read_bytes()
    with open(local / "episodes.csv", newline="") as handle:
        episodes = list(csv.DictReader(handle))
    # the budget exercised what it is meant to: memorization in the preload and in the stream
    assert [int(row["preload/steps"]) for row in episodes] == [2, 2]
    assert all(int(row["memorize_calls"]) == 1 for row in episodes)
    # (a Ray run resumes as a local one: the same run_goal_episodes records; with nothing left it starts no Ray worker,
    # tests/test_fanout.py)
