"""Memory Cards recall (paper D.1): can the world model show a hidden tile's object after the episode is memorized?

Usage:
    python -m come_rl.experiments.recall checkpoint=come_rl/checkpoints/memory_cards episodes=10 steps_list=0,20,100,200

Each test episode is the paper's special one: it starts all covered (or all uncovered) and zig-zags over the grid,
showing every tile once and leaving all tiles covered. The world model observes it, memorizes it (LoRA, ``steps``
gradient steps), and then, for every tile, is given the real frames of the cursor walking to the tile and asked to
imagine uncovering it. A tile is recalled when the imagined tile matches the truth:
  * strict: tile MSE < 2e-5 on [0, 1] images (the paper's threshold);
  * nearest object: the imagined tile is closer (MSE) to the true object's template than to any other object's.
Chance level for nearest-object recall is 1 in 8 (each object sits on two of the 16 tiles).
Compositions compared: no memory (base alone), LTM alone, base + LTM as PoE (alpha = 1) and as PoCE (alpha = 2).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl.data_sources import tensor_to_frames
from come_rl.train import parse_overrides
from come_rl.world_model import CompositionConfig, WorldModel
from envs.memory_cards import GRID, TOGGLE, MemoryCardsEnv, path_to_tile, zigzag_recall_actions

STRICT_THRESHOLD = 2e-5

COMPOSITIONS = {
    "no_memory (base)": dict(experts=["base"]),
    "base+ltm PoE (alpha=1)": dict(experts=["base", "ltm"], alphas={"base": 1.0, "ltm": 1.0}, normalize=True),
    # With the LTM's baseline shared with the base's conditional pass (paper eq. 4), the normalised PoCE with
    # alpha = 2 is exactly the LTM alone: (eps_b + 2 eps_l - eps_b) / 2 = eps_l.
    "base+ltm PoCE (alpha=2, normalized) = LTM alone": dict(experts=["base", "ltm"], alphas={"base": 1.0, "ltm": 2.0},
                                                            normalize=True),
    "base+ltm PoCE (alpha=3, normalized)": dict(experts=["base", "ltm"], alphas={"base": 1.0, "ltm": 3.0}, normalize=True),
    "base+ltm PoCE (alpha=2, sum of scores)": dict(experts=["base", "ltm"], alphas={"base": 1.0, "ltm": 2.0},
                                                   normalize=False),
    # The LTM only at the noise levels it memorized (t >= noise_low); the base denoises the rest.
    "base+ltm PoCE (alpha=2) gated to t>=noise_low": dict(experts=["base", "ltm"], alphas={"base": 1.0, "ltm": 2.0},
                                                          normalize=True, active_from={"ltm": "noise_low"}),
}

@dataclass
class RecallConfig:
    checkpoint: str = "come_rl/checkpoints/memory_cards"
    episodes: int = 10
    starts: str = "covered,uncovered"
    """episode kinds, used in turn: "covered" (each tile is seen being uncovered) and/or "uncovered" (tiles are seen
    open and covered as the cursor passes)."""
    steps_list: str = "0,25,50,100,200"
    """memorization steps to evaluate (each continues memorizing the same adapters)."""
    batch_size: int = 16
    lr: float = 2e-3
    rank: int = 16
    lora_alpha: float = 16.0
    noise_low: float = 0.95
    change_weighting: float = 0.0
    uniform_fraction: float = 0.0
    target_modules: str = ""
    """regex of the backbone modules that get LoRA adapters (empty: the checkpoint's stored setting)."""
    full_parameters: str = ""
    """regex of backbone parameters memorization trains in full beside LoRA (see MemorizeConfig)."""
    sampler_steps: int = 10
    seed: int = 1000
    threads: int = 2
    out_dir: str = "results/recall"
    suffix: str = ""
    """appended to the result file names (to keep several settings side by side)."""


def tile_errors(predicted: np.ndarray, truth: np.ndarray, env: MemoryCardsEnv, row: int, col: int,
                obj: int) -> tuple[float, bool]:
    """(tile MSE on [0, 1] images, nearest-object correct) for one queried tile of a uint8 frame."""
    rs, cs = env.tile_slice(row, col)
    m = env.margin
    pred_tile = predicted[rs, cs].astype(np.float32) / 255.0
    true_tile = truth[rs, cs].astype(np.float32) / 255.0
    mse = float(((pred_tile - true_tile) ** 2).mean())
    # Compare the inside of the tile (without the cursor ring) to the object templates.
    inner = pred_tile[m:-m, m:-m]
    templates = env.tile_templates()[:, m:-m, m:-m].astype(np.float32) / 255.0
    distances = ((templates - inner[None]) ** 2).mean(axis=(1, 2, 3))
    return mse, int(np.argmin(distances)) == obj


def run(config: RecallConfig) -> list[dict]:
    from come_rl.results import write_table

    torch.set_num_threads(config.threads)
    steps_list = [int(s) for s in config.steps_list.split(",")]
    starts = [s.strip() for s in config.starts.split(",") if s.strip()]
    if not starts or set(starts) - {"covered", "uncovered"}:
        raise ValueError(f"starts must list covered and/or uncovered, got {config.starts!r}")
    wm = WorldModel.load(config.checkpoint, experts=["base", "ltm"], sampler={"steps": config.sampler_steps},
                         memorize={"rank": config.rank, "lora_alpha": config.lora_alpha, "batch_size": config.batch_size, "lr": config.lr,
                                   "noise_low": config.noise_low, "uniform_fraction": config.uniform_fraction,
                                   "change_weighting": config.change_weighting,
                                   **({"target_modules": config.target_modules} if config.target_modules else {}),
                                   "full_parameters": config.full_parameters})
    env = MemoryCardsEnv(max_steps=10**6)
    results: dict[tuple[str, int, str], list[tuple[float, bool]]] = {}
    memorize_seconds: dict[int, float] = {}
    examples = []
    for episode in tqdm(range(config.episodes), desc="recall episodes"):
        start = starts[episode % len(starts)]
        frame, info = env.reset(seed=config.seed + episode, options={"initial_cover": start, "cursor": (0, 0)})
        wm.reset()
        wm.observe(frame)
        for action in zigzag_recall_actions(start):
            frame, *_ , info = env.step(action)
            wm.observe(frame, env.action_spec.encode(action))
        assert info["covered"].all() and info["seen"].all()
        done_steps = 0
        for steps in steps_list:
            t0 = time.perf_counter()
            if steps > done_steps:
                wm.memorize(steps=steps - done_steps, generator=torch.Generator().manual_seed(episode))
            memorize_seconds[steps] = memorize_seconds.get(steps, 0.0) + time.perf_counter() - t0
            done_steps = steps
            for name, composition in COMPOSITIONS.items():
                if steps == 0 and name != "no_memory (base)":
                    continue  # fresh adapters: every composition equals the base
                if steps > 0 and name == "no_memory (base)":
                    continue
                gates = {k: (config.noise_low if v == "noise_low" else v)
                         for k, v in composition.get("active_from", {}).items()}
                wm.composition = CompositionConfig(**dict(composition, active_from=gates))
                scores = _query_all_tiles(wm, env, info, episode, examples if (steps == steps_list[-1] and
                                                                             "= LTM alone" in name and episode == 0) else None)
                results.setdefault((name, steps, start), []).extend(scores)
    rows = []
    for (name, steps, start), scores in sorted(results.items(), key=lambda item: (item[0][2], item[0][1])):
        mses = np.array([s[0] for s in scores])
        rows.append({
            "composition": name, "episode_start": start, "memorize_steps": steps, "tiles": len(scores),
            "recall_strict_mse<2e-5": float((mses < STRICT_THRESHOLD).mean()),
            "recall_nearest_object": float(np.mean([s[1] for s in scores])),
            "median_tile_mse": float(np.median(mses)),
            "memorize_seconds_per_episode": memorize_seconds.get(steps, 0.0) / config.episodes,
            "lora_rank": config.rank, "lora_alpha": config.lora_alpha, "lr": config.lr, "batch": config.batch_size,
            "noise_levels": f"U[{config.noise_low},1] + {config.uniform_fraction:.0%} U[0,1]",
            "trained": "LoRA" + (f" + full {config.full_parameters}" if config.full_parameters else ""),
        })
    out = Path(config.out_dir)
    csv = out / f"memory_cards_recall{config.suffix}.csv"
    write_table(csv, rows, md_path=out / f"memory_cards_recall{config.suffix}.md",
                         title=f"Memory Cards recall ({config.episodes} zig-zag episodes x 16 tiles; chance 12.5 %; base "
                               f"{config.checkpoint}, 48x48, 10-step DDIM). Command: `python -m come_rl.experiments.recall "
                               + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                          for k, v in dataclasses.asdict(config).items()) + "`")
    if examples:
        import imageio.v3 as iio

        grid = np.concatenate([np.concatenate(pair, axis=0) for pair in examples[:16]], axis=1)
        iio.imwrite(out / f"memory_cards_recall{config.suffix}_examples.png", np.kron(grid, np.ones((3, 3, 1), np.uint8)))
    return rows


def _query_all_tiles(wm: WorldModel, env: MemoryCardsEnv, info: dict, episode: int, examples: list | None):
    """For every tile: walk the real cursor there (observed), imagine the toggle, score, then forget the walk."""
    scores = []
    base_length = len(wm.memory)
    for row in range(GRID):
        for col in range(GRID):
            probe_env = copy.deepcopy(env)
            for move in path_to_tile(probe_env.cursor, (row, col)):
                frame, *_ = probe_env.step(move)
                wm.observe(frame, probe_env.action_spec.encode(move))
            truth, *_ = probe_env.step(TOGGLE)
            action = torch.from_numpy(probe_env.action_spec.encode(TOGGLE))[None, None]
            imagined = tensor_to_frames(wm.imagine(action, seed=episode * 100 + row * GRID + col)[0, 0])
            wm.memory.truncate(base_length)
            scores.append(tile_errors(imagined, truth, env, row, col, int(info["layout"][row, col])))
            if examples is not None:
                examples.append((truth, imagined))
    return scores


def main(argv: list[str] | None = None) -> None:
    config = parse_overrides(sys.argv[1:] if argv is None else argv, RecallConfig)
    for row in run(config):
        print(row)


if __name__ == "__main__":
    main()
