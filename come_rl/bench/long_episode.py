"""``python -m come_rl.bench long_episode``: a long Memory Cards episode streamed through the memory wrapper; the
process's memory and the seconds of each memorization call must stay flat as the episode grows."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl.bench.common import rss_mb
from come_rl.checkpoint import resolve_checkpoint
from come_rl.results import write_table
from come_rl.world_model import WorldModel
from envs.memory_cards import MemoryCardsEnv, cursor_pose_model
from envs.memory_wrapper import WorldModelMemoryWrapper


@dataclass
class LongEpisodeBenchConfig:
    checkpoint: str = "memory_cards"
    steps: int = 1000
    memorize_every: int = 50
    memorize_steps: int = 25
    threads: int = 2
    seed: int = 0
    out_dir: str = "results/bench"



def bench_long_episode(config: LongEpisodeBenchConfig) -> list[dict]:
    """Stream one long episode through ``WorldModelMemoryWrapper``; a row per memorization call."""
    if config.steps < config.memorize_every or config.memorize_every < 1 or config.memorize_steps < 1:
        raise ValueError(f"need steps >= memorize_every >= 1 and memorize_steps >= 1, got {config.steps}, "
                         f"{config.memorize_every}, {config.memorize_steps}")
    torch.set_num_threads(config.threads)
    directory = resolve_checkpoint(config.checkpoint)
    model = WorldModel.load(directory, experts=["base", "ltm"], device="cpu", pose_model=cursor_pose_model)
    env = WorldModelMemoryWrapper(MemoryCardsEnv(max_steps=config.steps + 1), model,
                                  memorize_every=config.memorize_every, memorize_steps=config.memorize_steps)
    env.set_memorize_seed(config.seed)
    env.reset(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    rows = []
    for step in tqdm(range(1, config.steps + 1), desc="long episode", unit="step"):
        *_, info = env.step(env.unwrapped.random_policy_action(rng))
        if info.get("memory/memorized"):
            rows.append({"env_step": step, "frames_in_memory": len(model.memory),
                         "memorize_seconds": float(info["memory/seconds"]), "rss_MB": rss_mb(),
                         "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "loss": float(info.get("memory/loss_last", float("nan")))})
    first, last = rows[0], rows[-1]
    for row in rows:
        row["peak_growth_since_first"] = row["peak_rss_MB"] / first["peak_rss_MB"] - 1
        row["seconds_over_first_call"] = row["memorize_seconds"] / first["memorize_seconds"]
    out = Path(config.out_dir)
    title = (f"A {config.steps}-step Memory Cards episode streamed through the memory wrapper ({directory.name}, "
             f"base + LTM, {model.memorize_config.method} memorization of batch {model.memorize_config.batch_size}, "
             f"{config.memorize_steps} steps every {config.memorize_every} frames, {config.threads} threads): peak RSS "
             f"{first['peak_rss_MB']:.0f} MB after the first call, {last['peak_rss_MB']:.0f} MB after the last "
             f"({100 * last['peak_growth_since_first']:+.1f} %); `python -m come_rl.bench long_episode`")
    write_table(out / "long_episode.csv", rows, md_path=out / "long_episode.md", title=title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [row["env_step"] for row in rows]
    left.plot(steps, [row["rss_MB"] for row in rows], "-o", markersize=3, label="resident")
    left.plot(steps, [row["peak_rss_MB"] for row in rows], "--", label="peak")
    left.set_xlabel("env step")
    left.set_ylabel("MB")
    left.set_ylim(bottom=0)
    left.legend()
    left.set_title("process memory")
    right.plot(steps, [row["memorize_seconds"] for row in rows], "-o", markersize=3)
    right.set_xlabel("env step")
    right.set_ylabel("seconds per memorization call")
    right.set_ylim(bottom=0)
    right.set_title(f"{config.memorize_steps} steps every {config.memorize_every} frames")
    figure.tight_layout()
    figure.savefig(out / "long_episode.png", dpi=100)
    plt.close(figure)
    return rows
