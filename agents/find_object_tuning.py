"""Tune the find-the-object agent on tuning seeds (never the held-out 7000+): memorization steps x samples per tile.

    python -m agents.find_object_tuning                      # 16 tuning episodes (seeds 100+), 100 and 200 steps
    python -m agents.find_object_tuning episodes=4 steps=20,40 samples=4

Per episode the world model (base + LTM, the shipped composition) watches the exploration once and memorizes in
increments up to each budget in ``steps`` (one optimizer, one generator: the state after 100 + 100 steps is the state
of 200 steps); after each budget it imagines uncovering every tile ``samples`` times in one batch and stores the
(16 x samples) pixel distances to the goal. The table then scores each budget with the first k samples per tile
(k = 1, 2, 4, ..., samples) by the mean, the median and the minimum over a tile's samples, so one set of memorizations
answers every (steps, k, score) cell. Raw distances per episode go to ``raw/<seed>.npz`` (an interrupted run resumes
there); the table to ``tuning.csv``/``.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.find_object import WorldModelFindAgent
from come_rl.cli_args import run_evaluation_cli
from come_rl.episode_records import read_record, write_record
from come_rl.results import wilson_interval, write_table
from come_rl.world_model import WorldModel
from envs.memory_cards import GRID, cursor_pose_model
from envs.memory_cards_find import MemoryCardsFindEnv

SCORES = {"mean": np.mean, "median": np.median, "min": np.min}


@dataclass
class TuneConfig:
    checkpoint: str = "memory_cards"
    episodes: int = 16
    seed: int = 100
    """tuning seeds seed .. seed + episodes - 1 (the held-out evaluation uses 7000+)."""
    steps: str = "100,200"
    samples: int = 8
    sampler_steps: int = 10
    threads: int = 1
    out_dir: str = "results/find_object/tuning"


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise ValueError(f"steps must be comma-separated integers, got {text!r}") from error
    if not budgets or any(b < 0 for b in budgets) or budgets != sorted(set(budgets)):
        raise ValueError(f"steps must be increasing integers >= 0, got {text!r}")
    return budgets


def episode_distances(agent: WorldModelFindAgent, env: MemoryCardsFindEnv, seed: int, budgets: list[int]) -> dict:
    """Watch one episode, memorize up to each budget and return its distances (budgets, 16, samples) and goal mask."""
    _, info = env.reset(seed=seed)
    agent.memorize_steps = 0
    agent.watch(env, info)
    generator = torch.Generator().manual_seed(agent.seed)
    distances, done = [], 0
    for budget in budgets:
        if budget > done:
            agent.world_model.memorize(steps=budget - done, generator=generator)
            done = budget
        distances.append(agent.tile_distances(env, np.asarray(info["goal_image"]))[0])
    goal = np.zeros(GRID * GRID, bool)
    for r, c in env.goal_tiles():
        goal[r * GRID + c] = True
    return {"distances": np.stack(distances), "goal_tiles": goal, "budgets": np.array(budgets),
            "covered_start": np.array(info["exploration"]["initial_cover"] == "covered")}


def table(records: list[dict], budgets: list[int], samples: int) -> list[dict]:
    ks = sorted({min(2 ** i, samples) for i in range(samples.bit_length() + 1)})
    rows = []
    for b, budget in enumerate(budgets):
        for k in ks:
            for name, reduce in SCORES.items():
                if k == 1 and name != "mean":
                    continue  # one sample: every score is the same
                hits = [bool(r["goal_tiles"][int(np.argmin(reduce(r["distances"][b, :, :k], axis=1)))]) for r in records]
                covered = [h for h, r in zip(hits, records) if r["covered_start"]]
                low, high = wilson_interval(sum(hits), len(hits))
                rows.append({"memorize_steps": budget, "samples": k, "score": name, "episodes": len(hits),
                             "success_rate": float(np.mean(hits)), "ci95_low": low, "ci95_high": high,
                             "covered_starts": f"{sum(covered)}/{len(covered)}",
                             "uncovered_starts": f"{sum(hits) - sum(covered)}/{len(hits) - len(covered)}"})
    return rows


def tune(config: TuneConfig) -> list[dict]:
    budgets = _budgets(config.steps)
    if config.episodes < 1 or config.samples < 1:
        raise ValueError(f"episodes and samples must be >= 1, got {config.episodes} and {config.samples}")

    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    wm = WorldModel.load(config.checkpoint, experts=["base", "ltm"], sampler={"steps": config.sampler_steps},
                         pose_model=cursor_pose_model)
    agent = WorldModelFindAgent(wm, 0, seed=config.seed, name="ltm", samples=config.samples)
    env, records = MemoryCardsFindEnv(), []
    for seed in tqdm(range(config.seed, config.seed + config.episodes), desc="find-object tuning"):
        path = out / "raw" / f"{seed}.npz"
        if path.exists():
            _, record = read_record(path)
            if list(record["budgets"]) == budgets and record["distances"].shape[-1] == config.samples:
                records.append(record)
                continue
        record = episode_distances(agent, env, seed, budgets)
        write_record(path, {"seed": seed}, **record)
        records.append(record)
    command = "python -m agents.find_object_tuning " + " ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    rows = table(records, budgets, config.samples)
    write_table(out / "tuning.csv", rows, md_path=out / "tuning.md",
                title=f"Find the object, tuning seeds {config.seed}..{config.seed + config.episodes - 1} (base + LTM, "
                      f"{config.sampler_steps}-step DDIM; success = the tile with the best score hides the goal): "
                      f"`{command}`")
    return rows


def main(argv: list[str] | None = None) -> None:
    run_evaluation_cli(sys.argv[1:] if argv is None else argv, TuneConfig, tune)


if __name__ == "__main__":
    main()
