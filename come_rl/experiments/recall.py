"""Memory Cards recall (paper D.1): after memorizing an episode, does the world model show what a hidden tile holds?

Usage:
    python -m come_rl.experiments.recall                                   # shipped defaults, held-out seeds
    python -m come_rl.experiments.recall episodes_per_start=4 seed=1000 compositions=sweep \\
        memorize='{"method": "lora", "lr": 3e-3, "rank": 64}' suffix=_lora_r64   # a tuning run

Each test episode is the paper's special one: it starts all covered (or all uncovered) and zig-zags over the grid,
showing every tile and leaving all tiles covered. The world model observes it (frames, actions, cursor poses),
memorizes it (``memorize`` settings: the checkpoint's defaults, overridden by the JSON dict ``memorize=``), and then,
for every tile at once (one batched ``imagine`` with a per-tile history), is given the real frames of the cursor walking
to the tile and asked to imagine uncovering it. A tile is recalled when the imagined tile matches the truth:
  * strict: tile MSE < 2e-5 on [0, 1] images (the paper's threshold);
  * nearest object: the imagined tile is closer (MSE) to the true object's template than to any other object's.
Chance for nearest-object recall is 1 in 8 (each object sits on two of the 16 tiles). Rates come with 95 % Wilson
intervals over tiles (tiles of one episode are not independent: read the intervals as optimistic).

Seeds: tune with seed=1000 (the default of earlier rounds); report with the default seed=5000, which no tuning used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from come_rl.checkpoint import precision_for, sampler_steps_for
from come_rl.episode_records import check_records, recorded_episode, stop_with_resume_hint
from come_rl.fanout import FANOUT_KEYS, FanoutSettings, check_backend, run_tasks
from come_rl.conventions import frames_to_tensor, tensor_to_frames
from come_rl.results import wilson_interval, write_table
from come_rl.cli_args import parse_cli
from come_rl.composition import load_named_compositions
from come_rl.world_model import WorldModel
from envs.memory_cards import GRID, TOGGLE, MemoryCardsEnv, cursor_pose_model, path_to_tile, zigzag_recall_actions

STRICT_THRESHOLD = 2e-5


# The study's named rules live in come_rl/conf/compositions/memory_cards_recall.yaml (one file, checked on load).
NAMED = load_named_compositions("memory_cards_recall")
COMPOSITIONS, COMPOSITION_SETS = NAMED.rules, NAMED.sets
NO_MEMORY = NAMED.no_memory
SHIPPED_DEFAULT = NAMED.shipped  # the composition in come_rl/checkpoints/memory_cards/world_model.json
NEEDS_NO_MEMORIZATION = {name for name, rule in COMPOSITIONS.items()
                         if "ltm" not in rule["experts"] and not rule.get("sltm_memorizes", False)}


@dataclass
class RecallConfig(FanoutSettings):
    checkpoint: str = "come_rl/checkpoints/memory_cards"
    episodes_per_start: int = 16
    starts: str = "covered,uncovered"
    """episode kinds: "covered" (each tile is seen being uncovered) and/or "uncovered" (tiles are seen open and are
    covered as the cursor passes)."""
    steps_list: str = "0,20,50,100,200"
    """memorization steps to evaluate (each continues memorizing the same weights)."""
    memorize: dict = field(default_factory=dict)
    """MemorizeConfig overrides as JSON, e.g. {"method": "full", "lr": 3e-4}; empty = the checkpoint's defaults."""
    compositions: str = "all"
    """a set name (sweep, ltm, all), a composition name, or names separated by ";" (see COMPOSITIONS)."""
    sampler_steps: int = 0
    """denoising steps per imagined frame; 0: the checkpoint's (Memory Cards: 2 since session 23; the held-out tables
    of results/recall were made at 10, the default then)."""
    seed: int = 5000
    out_dir: str = "results/recall"
    suffix: str = ""
    """appended to the result file names (keeps several settings side by side)."""
    precision: str = "auto"
    """auto: the checkpoint's (Memory Cards: bf16 on CUDA and on CPUs with bfloat16 kernels, fp32 elsewhere; the held-out
    tables of results/recall before session 25 were made in fp32: add precision=fp32 to rerun them); fp32; bf16."""


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


def resolve_compositions(spec: str) -> list[str]:
    """A set name, one composition name, or names separated by ";" (names may contain commas)."""
    return NAMED.resolve(spec)


def validate(config: RecallConfig) -> tuple[list[int], list[str], list[str]]:
    if config.episodes_per_start < 1:
        raise ValueError(f"episodes_per_start must be >= 1, got {config.episodes_per_start}")
    try:
        steps_list = sorted({int(s) for s in str(config.steps_list).split(",") if s.strip()})
    except ValueError as error:
        raise ValueError(f"steps_list must be comma-separated integers, got {config.steps_list!r}") from error
    if not steps_list or steps_list[0] < 0:
        raise ValueError(f"steps_list needs integers >= 0, got {config.steps_list!r}")
    starts = [s.strip() for s in config.starts.split(",") if s.strip()]
    if not starts or set(starts) - {"covered", "uncovered"}:
        raise ValueError(f"starts must list covered and/or uncovered, got {config.starts!r}")
    if not isinstance(config.memorize, dict):
        raise ValueError(f"memorize must be a JSON object of MemorizeConfig fields, got {config.memorize!r}")
    return steps_list, starts, resolve_compositions(config.compositions)


class RecallWorker:
    """The world model and env, built once per process (a Ray actor with backend=ray); ``run((job, start, i))``
    plays one zig-zag episode and returns its per-tile scores, memorization seconds and (for jobs 0 and
    ``episodes_per_start``) the example strip."""

    def __init__(self, config: RecallConfig, records: str | None = None):
        self.config, self.records = config, None if records is None else Path(records)
        self.steps_list, _, self.names = validate(config)
        roles = sorted({role for name in self.names for role in COMPOSITIONS[name]["experts"]} | {"base", "ltm"},
                       key=["base", "ltm", "stm", "sltm"].index)
        steps = sampler_steps_for(config.checkpoint, config.sampler_steps)
        self.wm = WorldModel.load(config.checkpoint, experts=roles, sampler={"steps": steps},
                                  memorize=config.memorize, pose_model=cursor_pose_model, precision=config.precision)
        self.env = MemoryCardsEnv(max_steps=10**6)
        # The examples image: the shipped default composition where it is evaluated, after 100 steps where there are.
        self.example_name = SHIPPED_DEFAULT if SHIPPED_DEFAULT in self.names else self.names[-1]
        self.example_steps = max([s for s in self.steps_list if s <= 100] or self.steps_list)
        if self.example_name in NEEDS_NO_MEMORIZATION:
            self.example_steps = 0

    def run(self, task: tuple[int, str, int]) -> dict:
        """One episode's result, played, or read back from its record when the run has records (a resumed run)."""
        _, start, i = task
        record, example = recorded_episode(self.records, f"{start}_{i}", lambda: _to_record(self._play(task)))
        return _from_record(record, example)

    def _play(self, task: tuple[int, str, int]) -> dict:
        job, start, i = task
        config, wm, env = self.config, self.wm, self.env
        seed = config.seed + i + (0 if start == "covered" else 50_000)
        frame, info = env.reset(seed=seed, options={"initial_cover": start, "cursor": (0, 0)})
        torch.manual_seed(seed)  # LoRA's re-initialised A matrices come from the global RNG
        wm.reset()
        wm.observe(frame, pose=info["pose"])
        for action in zigzag_recall_actions(start):
            frame, *_, info = env.step(action)
            wm.observe(frame, env.action_spec.encode(action), info["pose"])
        assert info["covered"].all() and info["seen"].all()
        history, truths = _tile_queries(wm, env)
        layout = info["layout"]
        generator = torch.Generator().manual_seed(seed)
        done, spent = 0, 0.0
        scores: dict[tuple[str, int, str], list[tuple[float, bool]]] = {}
        seconds: dict[tuple[int, str], float] = {}
        example = None
        for steps in self.steps_list:
            if steps > done:
                spent += wm.memorize(steps=steps - done, generator=generator)["seconds"]
                done = steps
            seconds[(steps, start)] = spent  # the episode's memorization time so far (cumulative over the steps list)
            for name in self.names:
                if (steps == 0) != (name in NEEDS_NO_MEMORIZATION):
                    continue  # before memorization every LTM composition is the base; after it, these do not change
                wm.use_composition(COMPOSITIONS[name])
                toggles = torch.from_numpy(np.stack([env.action_spec.encode(TOGGLE)] * GRID * GRID))[:, None]
                imagined = tensor_to_frames(wm.imagine(toggles.float(), seed=seed, history=history)[:, 0])
                for tile in range(GRID * GRID):
                    row, col = divmod(tile, GRID)
                    scores.setdefault((name, steps, start), []).append(
                        tile_errors(imagined[tile], truths[tile], env, row, col, int(layout[row, col])))
                if job in (0, config.episodes_per_start) and steps == self.example_steps and name == self.example_name:
                    example = np.concatenate([np.concatenate(list(truths[:8]), axis=1),
                                              np.concatenate(list(imagined[:8]), axis=1)], axis=0)
        return {"scores": scores, "seconds": seconds, "example": example,
                "memorize_settings": dataclasses.asdict(wm.memorize_config), "base_spec": wm.base_spec,
                "base_target": wm.base.target}


def _to_record(result: dict) -> tuple[dict, list]:
    """An episode's result -> (a JSON-able row, the example strip as the record's image list)."""
    row = {"scores": [[name, steps, start, [[float(mse), bool(hit)] for mse, hit in tiles]]
                      for (name, steps, start), tiles in result["scores"].items()],
           "seconds": [[steps, start, float(spent)] for (steps, start), spent in result["seconds"].items()],
           **{key: result[key] for key in ("memorize_settings", "base_spec", "base_target")}}
    return row, [] if result["example"] is None else [result["example"]]


def _from_record(row: dict, example: list) -> dict:
    return {"scores": {(name, steps, start): [(mse, hit) for mse, hit in tiles] for name, steps, start, tiles
                       in row["scores"]},
            "seconds": {(steps, start): spent for steps, start, spent in row["seconds"]},
            "example": example[0] if len(example) else None,
            **{key: row[key] for key in ("memorize_settings", "base_spec", "base_target")}}


RESUME_FREE_KEYS = (*FANOUT_KEYS, "out_dir", "suffix")
"""settings a rerun may change and still resume from the recorded episodes."""


def run(config: RecallConfig) -> list[dict]:

    steps_list, starts, names = validate(config)
    config = dataclasses.replace(config, precision=precision_for(config.checkpoint, config.precision))  # recorded
    check_backend(config.backend, config.workers)
    torch.set_num_threads(config.threads)
    jobs = [(start, i) for start in starts for i in range(config.episodes_per_start)]
    tasks = [(job, start, i) for job, (start, i) in enumerate(jobs)]
    # one record per finished episode: a killed run resumes where it stopped (the same command again)
    records = Path(config.out_dir) / "records" / f"memory_cards_recall{config.suffix}"
    check_records(records, config, RESUME_FREE_KEYS)
    with stop_with_resume_hint(records):
        results = run_tasks(RecallWorker, (config, str(records)), tasks, backend=config.backend,
                            workers=config.workers, threads=config.threads, desc="recall episodes")
    scores: dict[tuple[str, int, str], list[tuple[float, bool]]] = {}
    seconds: dict[tuple[int, str], float] = {}
    examples: list = []
    for result in results:  # in episode order, as the local loop always was
        for key, tile_scores in result["scores"].items():
            scores.setdefault(key, []).extend(tile_scores)
        for key, spent in result["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + spent
        if result["example"] is not None:
            examples.append(result["example"])
    memorize_settings, base_spec = results[0]["memorize_settings"], results[0]["base_spec"]
    rows = []
    for (name, steps, start), tile_scores in sorted(scores.items(), key=lambda item: (item[0][2], item[0][1])):
        mses = np.array([s[0] for s in tile_scores])
        n = len(tile_scores)
        hits, strict = int(sum(s[1] for s in tile_scores)), int((mses < STRICT_THRESHOLD).sum())
        low, high = wilson_interval(hits, n)
        strict_low, strict_high = wilson_interval(strict, n)
        rows.append({
            "composition": name, "episode_start": start, "memorize_steps": steps,
            "episodes": config.episodes_per_start, "tiles": n,
            "recall_nearest_object": hits / n, "nearest_ci95_low": low, "nearest_ci95_high": high,
            "recall_strict_mse<2e-5": strict / n, "strict_ci95_low": strict_low, "strict_ci95_high": strict_high,
            "median_tile_mse": float(np.median(mses)),
            "memorize_seconds_per_episode": seconds.get((steps, start), 0.0) / config.episodes_per_start,
        })
    out = Path(config.out_dir)
    settings = {k: v for k, v in memorize_settings.items()
                if k != "steps" and (k != "target_modules" or memorize_settings["method"] == "lora")}
    # The command names every memorization setting, so it reproduces the table whatever the checkpoint's defaults.
    shown = dict(dataclasses.asdict(config), memorize=settings)
    command = "python -m come_rl.experiments.recall " + " ".join(
        f"{k}='{json.dumps(v)}'" if isinstance(v, dict) else f"{k}={v}"
        for k, v in shown.items() if v != getattr(RecallConfig(), k, None) or k in ("seed", "memorize"))
    write_table(out / f"memory_cards_recall{config.suffix}.csv", rows, md_path=out / f"memory_cards_recall{config.suffix}.md",
                title=f"Memory Cards recall: {config.episodes_per_start} zig-zag episodes per start x 16 tiles, seeds "
                      f"from {config.seed}; chance 12.5 %; base {base_spec.get('parameters', 0) / 1e6:.2f}M-parameter "
                      f"{base_spec['backbone']} ({results[0]['base_target']} target, {base_spec.get('minutes', 0):.0f} min "
                      f"CPU training), 48x48, {sampler_steps_for(config.checkpoint, config.sampler_steps)}-step DDIM. "
                      f"Memorization: {json.dumps(settings)}. "
                      f"Command: `{command}`")
    if examples:
        import imageio.v3 as iio

        grid = np.concatenate(examples, axis=0)
        iio.imwrite(out / f"memory_cards_recall{config.suffix}_examples.png", np.kron(grid, np.ones((2, 2, 1), np.uint8)))
    _plot(rows, out / f"memory_cards_recall{config.suffix}.png")
    return rows


def _tile_queries(wm: WorldModel, env: MemoryCardsEnv):
    """Per tile: the episode's last frames plus the real walk of the cursor to the tile (the history the world model
    imagines the toggle from), and the true frame after the toggle."""
    length = wm.context_length + 2 * GRID  # enough past for the longest context after the longest walk
    frames, actions, poses = wm.memory.frames, wm.memory.actions, wm.memory.poses
    histories, truths = [], []
    for row in range(GRID):
        for col in range(GRID):
            probe = copy.deepcopy(env)
            walk_frames, walk_actions, walk_poses = [], [], []
            for move in path_to_tile(probe.cursor, (row, col)):
                frame, *_, info = probe.step(move)
                walk_frames.append(frame)
                walk_actions.append(probe.action_spec.encode(move))
                walk_poses.append(info["pose"])
            truth, *_ = probe.step(TOGGLE)
            f, a, p = frames, actions, poses
            if walk_frames:
                f = torch.cat([f, frames_to_tensor(np.stack(walk_frames))])
                a = torch.cat([a, torch.from_numpy(np.stack(walk_actions)).float()])
                p = torch.cat([p, torch.from_numpy(np.stack(walk_poses)).float()])
            histories.append((f[-length:], a[-length:], p[-length:]))
            truths.append(truth)
    history = tuple(torch.stack([h[i] for h in histories]) for i in range(3))
    return history, np.stack(truths)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = sorted({row["episode_start"] for row in rows})
    fig, axes = plt.subplots(1, len(starts), figsize=(6 * len(starts), 4), squeeze=False)
    for ax, start in zip(axes[0], starts):
        names = sorted({row["composition"] for row in rows if row["episode_start"] == start})
        for name in names:
            points = sorted((row["memorize_steps"], row["recall_nearest_object"], row["nearest_ci95_low"],
                             row["nearest_ci95_high"]) for row in rows
                            if row["episode_start"] == start and row["composition"] == name)
            x = [p[0] for p in points]
            y = np.array([p[1] for p in points])
            err = np.array([[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]])
            if len(points) == 1:  # a composition without memorization: a line across the steps
                ax.axhline(y[0], ls="--", lw=1, label=name, color="grey" if name == NO_MEMORY else None)
            else:
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(0.125, color="k", lw=0.5, ls=":", label="chance")
        ax.set_title(f"episodes starting {start}")
        ax.set_xlabel("memorization steps")
        ax.set_ylabel("nearest-object recall (95 % CI)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, RecallConfig)
    try:
        validate(config)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    for row in run(config):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
