"""Find the object with and without shared walk prefixes, paired: each episode is memorized once, then the CoME agent
decides both ways from the same memory (the same seed for imagination), so only the sharing differs.

    python results/shared_prefixes/paired_find.py SEED EPISODES OUT_CSV [precision]

A row per episode: the start's cover, the tile each way chooses, its success (the chosen tile hides the goal object,
what the env rewards when the agent walks there and uncovers it), seconds per decision and network rows each way.
Episodes already in OUT_CSV are skipped (a rerun resumes).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.find_object import FindConfig, build_agent
from come_rl.bench.decision import count_network_rows
from envs.memory_cards import GRID
from envs.memory_cards_find import MemoryCardsFindEnv

FIELDS = ["seed", "initial_cover", "tile_plain", "tile_shared", "success_plain", "success_shared", "seconds_plain",
          "seconds_shared", "rows_plain", "rows_shared", "memorize_seconds"]


def main() -> None:
    seed, episodes, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    precision = sys.argv[4] if len(sys.argv) > 4 else "auto"
    torch.set_num_threads(1)
    done = set()
    if out.exists():
        with open(out, newline="") as handle:
            done = {int(row["seed"]) for row in csv.DictReader(handle)}
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writeheader()
    agent = build_agent("come", FindConfig(checkpoint="memory_cards", samples=4, memorize_steps=100, sampler_steps=0,
                                           precision=precision, seed=seed))
    calls = count_network_rows(agent.world_model)
    env = MemoryCardsFindEnv()
    for episode_seed in tqdm(range(seed, seed + episodes), desc="paired find-the-object episodes"):
        if episode_seed in done:
            continue
        _, info = env.reset(seed=episode_seed)
        torch.manual_seed(episode_seed)  # as agents.find_object.run_episode
        goal = np.asarray(info["goal_image"])
        memorize_seconds = agent.watch(env, info)
        row = {"seed": episode_seed, "initial_cover": info["exploration"]["initial_cover"],
               "memorize_seconds": round(memorize_seconds, 2)}
        for name, share in (("plain", False), ("shared", True)):
            agent.share_prefixes = share
            calls.clear()
            start = time.perf_counter()
            distances, _, _ = agent.tile_distances(env, goal)
            row[f"seconds_{name}"] = round(time.perf_counter() - start, 3)
            row[f"rows_{name}"] = sum(calls)
            tile = divmod(int(np.argmin(distances.mean(axis=1))), GRID)
            row[f"tile_{name}"] = f"{tile[0]},{tile[1]}"
            row[f"success_{name}"] = int(tile in env.goal_tiles())
        with open(out, "a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow(row)


if __name__ == "__main__":
    main()
