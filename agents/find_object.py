"""Find the object on Memory Cards (``envs.memory_cards_find``): plan the one uncover with the world model.

    python -m agents.find_object                                   # all agents, 32 held-out episodes each
    python -m agents.find_object agents=come,base episodes=8 seed=100 memorize_steps=50
    python -m come_rl.run env=memory_cards_find                    # the same task through the Hydra entry point
    python -m come_rl.run env=memory_cards_find model.experts=[base]   # its no-memory ablation

The world-model agent watches the exploration (observe every frame, action and cursor pose), memorizes it
(``memorize_steps`` of the world model's memorization), then imagines, in one batch, walking to each of the 16 tiles
and uncovering it (``samples`` times per tile); it uncovers the tile whose imagined content is nearest (pixel MSE of the
tile's inside, averaged over its samples) to the goal image. Pixels, not LPIPS: the goal is a 12x12-pixel tile, below the size at which AlexNet's features (stride 4, an
11x11 first kernel) mean anything. Without memory the base can only guess what a covered tile hides; with it, the
world model should know. Baselines: ``random`` (a uniformly random tile: 2 of 16 hide the object), ``oracle`` (the
layout is known: the ceiling) and ``exact`` (this agent's own procedure with ``envs.memory_cards.MemoryCardsWorldModel``,
an exact world model that remembers every tile it saw: the ceiling of the procedure, so that a lower number with the
learned model is the model's).

Writes ``results/find_object/``: ``episodes.csv`` (one row per agent and episode), ``summary.csv``/``.md`` (success rate
with a 95 % Wilson interval, the final distance in tiles from the uncovered tile to the nearest tile hiding the goal,
seconds per decision, memorization seconds; ATE/RPE do not apply: there is no reference path), ``success.png`` (bars with intervals) and
per agent one success and one failure as GIFs (real | imagined at the chosen tile | goal).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from come_rl.checkpoint import precision_for, sampler_steps_for
from come_rl.cli_args import run_evaluation_cli
from come_rl.conventions import tensor_to_frames
from come_rl.episode_records import check_records, recorded_episode
from come_rl.evaluation import play_agents, write_success_results
from come_rl.fanout import FANOUT_KEYS, FanoutSettings, check_backend
from come_rl.world_model import WorldModel
from envs.memory_cards import GRID, TOGGLE, cursor_pose_model
from envs.memory_cards_find import MemoryCardsFindEnv
from planners.objectives import check_share_prefixes

AGENT_EXPERTS = {"base": ["base"], "ltm": ["base", "ltm"], "come": ["base", "ltm", "stm", "sltm"]}
AGENTS = ("random", "base", "ltm", "come", "exact", "oracle")


class RandomTileAgent:
    """Uncovers a uniformly random tile (drawn from (seed, episode seed)): succeeds 2 times in 16."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def begin(self, env: MemoryCardsFindEnv, info: dict, episode_seed: int = 0) -> dict:
        tile = divmod(int(np.random.default_rng((self.seed, episode_seed)).integers(GRID * GRID)), GRID)
        self.queue = env.path_to(tile)
        return {"tile": tile}

    def act(self, observation, info) -> int:
        return self.queue.pop(0)


class OracleAgent(RandomTileAgent):
    """Knows the layout: walks to the nearest tile that hides the goal object (the ceiling, 100 %)."""

    name = "oracle"

    def begin(self, env: MemoryCardsFindEnv, info: dict, episode_seed: int = 0) -> dict:
        cursor = np.asarray(info["cursor"])
        tile = min(env.goal_tiles(), key=lambda t: (abs(t[0] - cursor[0]) + abs(t[1] - cursor[1]), t))
        self.queue = env.path_to(tile)
        return {"tile": tile}


class WorldModelFindAgent:
    """See the module docstring. ``world_model``: a come_rl ``WorldModel`` for Memory Cards (or any model with its
    ``reset/observe/memorize/imagine`` interface, e.g. the exact :class:`envs.memory_cards.MemoryCardsWorldModel`).

    ``samples``: imagined samples per tile; a tile's score is the mean over its samples of the pixel MSE between the
    imagined inside of the uncovered tile and the goal (the diffusion model's samples differ; averaging them scores
    what the model believes rather than one draw of it).

    ``share_prefixes``: the walks to the 16 tiles begin alike (rows first, then columns), so each distinct walk prefix
    is imagined once per sample (``WorldModel.imagine``'s ``streams``, one per sample index: the samples stay
    independent) and no step past a tile's uncovering is imagined (``lengths``); a world model without
    ``shares_prefixes`` (the exact one) imagines every row."""

    def __init__(self, world_model, memorize_steps: int = 100, seed: int = 0, name: str = "world_model",
                 samples: int = 1, share_prefixes: bool = True):
        self.share_prefixes = check_share_prefixes(share_prefixes)
        if isinstance(memorize_steps, bool) or int(memorize_steps) < 0:
            raise ValueError(f"memorize_steps must be an integer >= 0, got {memorize_steps!r}")
        if isinstance(samples, bool) or int(samples) < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        self.world_model, self.memorize_steps, self.seed, self.name = world_model, int(memorize_steps), seed, name
        self.samples = int(samples)

    def watch(self, env: MemoryCardsFindEnv, info: dict) -> float:
        """Observe the exploration and memorize it; return the memorization seconds."""
        wm, exploration = self.world_model, info["exploration"]
        spec = wm.action_spec
        wm.reset()
        wm.observe(exploration["frames"][0], None, exploration["poses"][0])
        for frame, action, pose in zip(exploration["frames"][1:], exploration["actions"], exploration["poses"][1:]):
            wm.observe(frame, spec.encode(action), pose)
        if not self.memorize_steps:
            return 0.0
        stats = wm.memorize(steps=self.memorize_steps, generator=torch.Generator().manual_seed(self.seed))
        return float(stats.get("seconds", 0.0))

    def tile_distances(self, env: MemoryCardsFindEnv, goal: np.ndarray, samples: int | None = None):
        """Imagine walking to each tile and uncovering it, ``samples`` times per tile, in one batch.

        Returns (distances (16, samples): pixel MSE of the imagined tile inside to the goal's, imagined uncovered
        frames (16, samples, H, W, 3) uint8, the paths)."""
        samples = self.samples if samples is None else int(samples)
        wm, spec = self.world_model, self.world_model.action_spec
        tiles = [divmod(i, GRID) for i in range(GRID * GRID)]
        paths = [env.path_to(tile) for tile in tiles]
        horizon = max(len(p) for p in paths)
        actions = torch.from_numpy(np.stack([np.stack([spec.encode(a) for a in p + [TOGGLE] * (horizon - len(p))])
                                             for p in paths])).float()
        last = torch.tensor([len(p) - 1 for p in paths]).repeat_interleave(samples)
        rows = actions.repeat_interleave(samples, dim=0)  # (16 * samples, T, A): tile-major, then the sample index
        if self.share_prefixes and getattr(wm, "shares_prefixes", False):
            imagined = wm.imagine(rows, seed=self.seed, streams=torch.arange(samples).repeat(len(tiles)),
                                  lengths=last + 1)
        else:
            imagined = wm.imagine(rows, seed=self.seed)  # (16 * samples, T, 3, H, W)
        uncovered = imagined[torch.arange(len(last)), last]
        frames = tensor_to_frames(uncovered)
        frames = frames.reshape(len(tiles), samples, *frames.shape[1:])
        m = env.cards.margin
        target = goal[m:-m, m:-m].astype(np.float32) / 255
        distances = np.zeros((len(tiles), samples))
        for i, (r, c) in enumerate(tiles):
            rows, cols = env.cards.tile_slice(r, c)
            inside = frames[i][:, rows, cols][:, m:-m, m:-m].astype(np.float32) / 255
            distances[i] = ((inside - target) ** 2).mean(axis=(1, 2, 3))
        return distances, frames, paths

    def begin(self, env: MemoryCardsFindEnv, info: dict, episode_seed: int = 0) -> dict:
        goal = np.asarray(info["goal_image"])
        tile_px = env.cards.tile
        if goal.dtype != np.uint8 or goal.shape != (tile_px, tile_px, 3):
            raise ValueError(f"the goal image must be a uint8 ({tile_px}, {tile_px}, 3) tile, got {goal.dtype} {goal.shape}")
        memorize_seconds = self.watch(env, info)
        start = time.perf_counter()
        distances, frames, paths = self.tile_distances(env, goal)
        scores = distances.mean(axis=1)
        choice = int(np.argmin(scores))
        best_sample = int(np.argmin(distances[choice]))
        self.queue = list(paths[choice])
        return {"tile": divmod(choice, GRID), "plan_seconds": time.perf_counter() - start,
                "memorize_seconds": memorize_seconds, "imagined": frames[choice, best_sample],
                "distance": float(scores[choice])}

    def act(self, observation, info) -> int:
        return self.queue.pop(0)


def run_episode(env: MemoryCardsFindEnv, agent, seed: int) -> tuple[dict, list]:
    observation, info = env.reset(seed=seed)
    torch.manual_seed(seed)  # anything drawn from torch's global generator (LoRA init) depends on this episode only
    plan = agent.begin(env, info, episode_seed=seed)
    frames, success, steps = [observation], False, 0
    while True:
        observation, reward, terminated, truncated, info = env.step(agent.act(observation, info))
        frames.append(observation)
        steps += 1
        if terminated or truncated:
            success = bool(info["success"])
            break
    cursor = np.asarray(info["cursor"])
    tile_distance = min(abs(r - cursor[0]) + abs(c - cursor[1]) for r, c in env.goal_tiles())
    row = {"agent": agent.name, "seed": seed, "initial_cover": info["exploration"]["initial_cover"],
           "goal_object": info["goal_object"], "success": int(success), "uncovered_tile": f"{plan['tile'][0]},{plan['tile'][1]}",
           "tile_distance_to_goal": int(tile_distance),
           "steps": steps, "seconds_per_decision": plan.get("plan_seconds", 0.0),
           "memorize_seconds": plan.get("memorize_seconds", 0.0)}
    gif = [np.concatenate([f, plan["imagined"] if "imagined" in plan else np.zeros_like(f),
                           _pad_goal(info["goal_image"], f.shape)], axis=1) for f in frames]
    return row, gif


def _pad_goal(goal: np.ndarray, shape) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    r0, c0 = (shape[0] - goal.shape[0]) // 2, (shape[1] - goal.shape[1]) // 2
    canvas[r0:r0 + goal.shape[0], c0:c0 + goal.shape[1]] = goal
    return canvas


@dataclass
class FindConfig(FanoutSettings):
    checkpoint: str = "memory_cards"
    agents: str = ",".join(AGENTS)
    episodes: int = 32
    seed: int = 7000
    """episodes use seeds seed .. seed + episodes - 1 (7000+: never used for tuning)."""
    memorize_steps: int = 100
    samples: int = 4
    """imagined samples per tile (the tile's score is their mean pixel MSE to the goal); 4: tuned on seeds 100-107
    (``python -m agents.find_object_tuning``: 1 sample 6/8, 2-4 samples 8/8)."""
    sampler_steps: int = 0
    """denoising steps per imagined frame; 0: the checkpoint's (Memory Cards: 2, as good as 10 here on 32 held-out
    episodes, results/few_step/README.md)."""
    out_dir: str = "results/find_object"
    precision: str = "auto"
    """auto: the checkpoint's (Memory Cards: bf16 on CUDA and on CPUs with bfloat16 kernels, where memorization runs
    1.6x faster with the same recall and success, results/few_step/README.md; fp32 elsewhere); fp32; bf16. The
    resolved precision is what the run records."""
    share_prefixes: bool = True
    """imagine each distinct walk prefix once per sample and nothing past a tile's uncovering (``WorldModelFindAgent``):
    32/32 as without on 32 fresh episodes, each decided both ways from one memory, at 0.30x the seconds per decision
    (results/shared_prefixes); false: every row its own sample."""


def build_agent(name: str, config: FindConfig):
    if name == "random":
        return RandomTileAgent(config.seed)
    if name == "oracle":
        return OracleAgent(config.seed)
    if name == "exact":  # the agent's own procedure with an exact world model that remembers perfectly
        from envs.memory_cards import MemoryCardsWorldModel

        return WorldModelFindAgent(MemoryCardsWorldModel(), 0, config.seed, name="exact")
    if name not in AGENT_EXPERTS:
        raise ValueError(f"unknown agent {name!r}; choose from {AGENTS}")

    wm = WorldModel.load(config.checkpoint, experts=AGENT_EXPERTS[name],
                         sampler={"steps": sampler_steps_for(config.checkpoint, config.sampler_steps)},
                         pose_model=cursor_pose_model, precision=config.precision)
    return WorldModelFindAgent(wm, config.memorize_steps if name != "base" else 0, config.seed, name=name,
                               samples=config.samples, share_prefixes=config.share_prefixes)


# the summary's means over each agent's episodes
SUMMARY_MEANS = ("tile_distance_to_goal", "seconds_per_decision", "memorize_seconds")

# settings that change no episode's numbers: a rerun into the same out_dir may change them and still resume
RESUME_FREE_KEYS = ("agents", "episodes", *FANOUT_KEYS, "out_dir")


class FindWorker:
    """One agent and its env, built once per process (a Ray actor with backend=ray); ``run(seed)`` plays one episode
    (or reads its record back when ``records`` names the run's directory)."""

    def __init__(self, name: str, config: FindConfig | None, records: str | None = None, agent=None,
                 make_env=MemoryCardsFindEnv):
        self.name, self.records = name, None if records is None else Path(records)
        self.agent, self.env = agent if agent is not None else build_agent(name, config), make_env()

    def run(self, seed: int) -> tuple[dict, list]:
        return recorded_episode(self.records, f"{self.name}_{seed}", lambda: run_episode(self.env, self.agent, seed))


def evaluate(config: FindConfig) -> list[dict]:
    names = [n.strip() for n in config.agents.split(",") if n.strip()]
    unknown = [n for n in names if n not in AGENTS]
    if unknown or not names:
        raise ValueError(f"unknown agents {unknown}; choose from {AGENTS}")
    if config.episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {config.episodes}")
    check_backend(config.backend, config.workers)
    # an unknown precision fails before any work; auto is resolved (the checkpoint's, on the device WorldModel.load
    # picks) so that the run's records say which precision made them
    config = dataclasses.replace(config, precision=precision_for(config.checkpoint, config.precision))
    torch.set_num_threads(config.threads)
    command = "python -m agents.find_object " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    steps = sampler_steps_for(config.checkpoint, config.sampler_steps)
    title = (f"Memory Cards, find the object ({config.episodes} episodes per agent, seeds {config.seed}+; chance 2/16; "
             f"world model {config.checkpoint}, {steps}-step DDIM, {config.memorize_steps} memorization steps, "
             f"{config.samples} imagined samples per tile, {config.precision}): `{command}`")
    out, seeds = Path(config.out_dir), range(config.seed, config.seed + config.episodes)
    check_records(out, config, RESUME_FREE_KEYS)
    results = play_agents(FindWorker, lambda name: (name, config, str(out)), names, seeds, config,
                          desc="find the object")
    return write_results(results, out, title)


def evaluate_agents(agents: list, episodes: int, seed: int, out: Path, title: str, progress: bool = True,
                    make_env=MemoryCardsFindEnv, records: Path | None = None) -> list[dict]:
    """Run ``episodes`` episodes (seeds seed, seed + 1, ...) of each (already built) agent in this process; write
    episodes/summary tables, the bar plot and one success and one failure GIF per agent into ``out``; return the
    summary rows. With ``records`` (checked by ``check_records``), finished episodes are recorded there and not played
    again."""
    by_name = {agent.name: agent for agent in agents}
    results = play_agents(FindWorker, lambda name: (name, None, None if records is None else str(records),
                                                    by_name[name], make_env),
                          list(by_name), range(seed, seed + episodes), FanoutSettings(backend="local"),
                          desc="find the object", progress=progress)
    return write_results(results, out, title)


def write_results(results: dict[str, list[tuple[dict, list]]], out: Path, title: str) -> list[dict]:
    """{agent name: [(episode row, GIF frames) per episode]} -> tables, bar plot, GIFs (``come_rl.evaluation``)."""
    return write_success_results(results, out, title, mean_keys=SUMMARY_MEANS,
                                 plot_title="Memory Cards: find the object", chance=2 / 16, chance_label="2/16")


def main(argv: list[str] | None = None) -> None:
    run_evaluation_cli(sys.argv[1:] if argv is None else argv, FindConfig, evaluate)


if __name__ == "__main__":
    main()
