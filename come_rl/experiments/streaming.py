"""Streaming consistency in Memory Maze (the paper's Figure 2 at CPU scale): memory that grows as the episode streams in.

Usage:
    python -m come_rl.experiments.streaming                                    # shipped maze model, 8 held-out episodes
    python -m come_rl.experiments.streaming episodes=8 warmup=50 chunk=20 iterations=10 window=50 memorize_steps=25 \\
        compositions=base,stm,ltm,stm_ltm,come seed=120000 out_dir=results/streaming

Per held-out episode the world model observes the first ``warmup`` frames; then, ``iterations`` times: the LTM memorizes
the last ``window`` frames for ``memorize_steps`` gradient steps (continuing from what it memorized before), every row
imagines the next ``chunk`` frames open loop from the real actions, each imagined frame is scored against the real one
(LPIPS, over all frames and over revisit frames: real pose within ``revisit_distance`` cells and ``revisit_degrees`` of
a pose observed so far), and the real chunk is observed (appended to the context). The paper: 50 frames memorized
for 25 updates, 20 frames predicted, 11 iterations; the STM improves across iterations and the LTM compounds.

The memory is the same for every row (it depends only on the real frames): it is memorized once per iteration; rows
without the LTM ignore it. Rows: the names of ``come_rl.experiments.consistency.COMPOSITIONS`` (``copy_last`` repeats
the last observed frame).

Output (``out_dir``): ``streaming.csv``, one row per (composition, episode, iteration) with ``context, lpips_all,
lpips_revisit, revisit_frames, seconds, memorize_seconds``; ``streaming.md`` / ``streaming_summary.csv``, per row and
iteration the mean over episodes with its 95 % t interval; ``streaming.png``, LPIPS against the iteration;
``episode_records/`` (one atomic file per finished episode: a killed run resumes where it stopped).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl.cli_args import parse_cli
from come_rl.conventions import tensor_to_frames
from come_rl.episode_records import check_records, recorded_episode, stop_with_resume_hint
from come_rl.experiments.consistency import (COMPOSITIONS, ConsistencyConfig, ConsistencyWorker, RecordedPoses,
                                             composition_for, load_episodes, mean_interval, parse_compositions,
                                             revisit_mask, score_frames)
from come_rl.results import write_table


@dataclass
class StreamingConfig:
    checkpoint: str = "memory_maze"
    """world model checkpoint (a directory, or the name of one shipped in come_rl/checkpoints)."""
    data: str = "online:memory_maze"
    """online:memory_maze (episodes from seeds seed, seed + 1, ...) or a collected Memory Maze data set directory."""
    seed: int = 120000
    """first episode seed (online data) and the sampling seed."""
    episodes: int = 8
    warmup: int = 50
    """frames observed before the first iteration."""
    chunk: int = 20
    """frames imagined (then observed) per iteration."""
    iterations: int = 10
    window: int = 50
    """the LTM memorizes the last ``window`` observed frames at each iteration."""
    memorize_steps: int = 25
    """LTM gradient steps per iteration (the checkpoint's batch and learning rate)."""
    compositions: str = "copy_last,base,stm,ltm,stm_ltm,come"
    memorize: dict = field(default_factory=dict)
    """overrides of the checkpoint's memorization recipe (MemorizeConfig fields)."""
    poses: str = "odometry"
    """where the SLTM's poses of imagined frames come from: odometry (the checkpoint's odometry head: no oracle) or
    recorded (the real poses of the replayed actions)."""
    revisit_distance: float = 0.5
    revisit_degrees: float = 45.0
    sampler_steps: int = 0
    """denoising steps per frame (0: the checkpoint's)."""
    threads: int = 2
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16."""
    out_dir: str = "results/streaming"


def check_config(config: StreamingConfig) -> list[str]:
    """Every check that needs no model; the row names."""
    names = parse_compositions(config.compositions)
    if "nearest_view" in names:
        raise ValueError("compositions: nearest_view is a lookup of the consistency table, not a streaming row; drop it")
    for key in ("episodes", "chunk", "iterations"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.warmup < 3:
        raise ValueError(f"warmup must hold at least 3 frames (the base's context), got {config.warmup}")
    if config.memorize_steps < 0:
        raise ValueError(f"memorize_steps must be >= 0 (0: no memorization), got {config.memorize_steps}")
    if config.window < 2 or config.window > config.warmup:
        raise ValueError(f"window must be between 2 and warmup={config.warmup} frames (what has been observed when the "
                         f"first iteration memorizes), got {config.window}")
    if config.poses not in ("recorded", "odometry"):
        raise ValueError(f"poses must be recorded or odometry, got {config.poses!r}")
    return names


def _consistency_config(config: StreamingConfig, names: list[str]) -> ConsistencyConfig:
    """The consistency experiment's settings that load the same episodes and the same model."""
    frames = config.warmup + config.chunk * config.iterations
    return ConsistencyConfig(checkpoint=config.checkpoint, data=config.data, seed=config.seed, episodes=config.episodes,
                             context=config.warmup, horizon=frames - config.warmup, compositions=",".join(names),
                             memorize=dict(config.memorize), poses=config.poses, sampler_steps=config.sampler_steps,
                             device=config.device, precision=config.precision, threads=config.threads)


class StreamingWorker:
    """Loads the world model once (as the consistency experiment does); ``run(index, episode)`` streams one episode."""

    def __init__(self, config: StreamingConfig, names: list[str]):
        self.config, self.names = config, names
        self.inner = ConsistencyWorker(_consistency_config(config, names), names)
        self.wm, self.rule, self.lpips = self.inner.wm, self.inner.rule, self.inner.lpips

    def run(self, index: int, episode: dict) -> list[dict]:
        cfg, wm = self.config, self.wm
        frames, actions, poses = episode["frames"], episode["actions"], episode["poses"]
        torch.manual_seed(cfg.seed * 1000 + index)  # the adapters' initial draw: one per episode, whatever ran before
        wm.reset()
        wm.observe(frames[0], pose=poses[0])
        for t in range(1, cfg.warmup):
            wm.observe(frames[t], actions[t - 1], pose=poses[t])
        memorizes = wm.ltm is not None and cfg.memorize_steps > 0
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + index)
        rows = []
        for k in range(cfg.iterations):
            c = cfg.warmup + k * cfg.chunk  # frames observed so far
            memorize_seconds = 0.0
            if memorizes:
                stats = wm.memorize(steps=cfg.memorize_steps, generator=generator, window=cfg.window)
                memorize_seconds = round(float(stats.get("seconds", 0.0)), 2)
            real = frames[c:c + cfg.chunk]
            revisit = revisit_mask(poses[:c], poses[c:c + cfg.chunk], cfg.revisit_distance, cfg.revisit_degrees)
            future = torch.from_numpy(np.ascontiguousarray(actions[c - 1:c - 1 + cfg.chunk], dtype=np.float32))[None]
            for name in self.names:
                start = time.time()
                composition = composition_for(name, self.rule)
                if composition is None:
                    imagined = np.repeat(frames[c - 1][None], cfg.chunk, axis=0)
                else:
                    wm.use_composition(composition)
                    if cfg.poses == "recorded":
                        wm.pose_model = RecordedPoses(poses[c:c + cfg.chunk])
                    imagined = tensor_to_frames(wm.imagine(future, seed=cfg.seed * 1000 + index * 100 + k)[0])
                lpips = score_frames(imagined, real, self.lpips)["lpips"]
                uses_ltm = "ltm" in COMPOSITIONS[name][0]
                rows.append({"composition": name, "episode": index, "seed": episode["seed"], "iteration": k,
                             "context": c, "lpips_all": float(lpips.mean()),
                             "lpips_revisit": float(lpips[revisit].mean()) if revisit.any() else "",
                             "revisit_frames": int(revisit.sum()), "seconds": round(time.time() - start, 2),
                             "memorize_seconds": memorize_seconds if uses_ltm else 0.0})
            for t in range(c, c + cfg.chunk):  # the real chunk joins the context
                wm.observe(frames[t], actions[t - 1], pose=poses[t])
        return rows


def summary_rows(rows: list[dict], names: list[str], iterations: int) -> list[dict]:
    """Per row and iteration: the mean over episodes with its 95 % t interval; the last line per row averages the
    iterations of each episode first."""
    out = []
    for name in names:
        for k in list(range(iterations)) + ["mean"]:
            mine = [r for r in rows if r["composition"] == name and (k == "mean" or r["iteration"] == k)]
            line = {"composition": name, "iteration": k}
            for column in ("lpips_all", "lpips_revisit"):
                if k == "mean":  # per episode first: the interval is over episodes, not over correlated iterations
                    per_episode = {}
                    for r in mine:
                        if r[column] != "":
                            per_episode.setdefault(r["episode"], []).append(float(r[column]))
                    values = [float(np.mean(v)) for v in per_episode.values()]
                else:
                    values = [r[column] for r in mine]
                mean, half = mean_interval(values)
                line[column] = f"{mean:.4f} ± {half:.4f}"
            line["episodes"] = len({r["episode"] for r in mine})
            line["revisit_frames"] = sum(int(r["revisit_frames"]) for r in mine)
            out.append(line)
    return out


def plot(rows: list[dict], names: list[str], iterations: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, ("all", "revisit")):
        for name in names:
            means = []
            for k in range(iterations):
                values = [float(r[f"lpips_{part}"]) for r in rows if r["composition"] == name and r["iteration"] == k
                          and r[f"lpips_{part}"] != ""]
                means.append(np.mean(values) if values else np.nan)
            ax.plot(range(1, iterations + 1), means, marker="o", label=name)
        ax.set_xlabel("iteration (chunk imagined after memorizing the stream so far)")
        ax.set_ylabel(f"LPIPS, {part} frames")
        ax.legend(fontsize=8)
    fig.suptitle(title[:120], fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run(config: StreamingConfig) -> list[dict]:


    names = check_config(config)
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    episodes = load_episodes(_consistency_config(config, names))  # too-short or missing data: refused, nothing written
    check_records(out, config, resume_free_keys=("threads", "out_dir"))  # a rerun with other settings: refused here
    worker = StreamingWorker(config, names)
    done = {}
    for index, episode in enumerate(tqdm(episodes, desc="streaming episodes")):
        # an episode's rows, played, or read back from its record (a resumed run)
        done[index], _ = recorded_episode(out, f"episode_{index}", lambda i=index, e=episode: (worker.run(i, e), []))
    rows = [row for index in sorted(done) for row in done[index]]
    title = (f"Memory Maze streaming consistency: {config.episodes} episodes (seeds {config.seed}+), {config.warmup} "
             f"frames, then {config.iterations} x (memorize the last {config.window} for {config.memorize_steps} steps, "
             f"imagine {config.chunk}, observe them); mean ± 95 % t interval over episodes. `python -m "
             f"come_rl.experiments.streaming " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()
                                                        if k != "threads") + "`")
    write_table(out / "streaming.csv", rows)
    write_table(out / "streaming_summary.csv", summary_rows(rows, names, config.iterations),
                md_path=out / "streaming.md", title=title)
    plot(rows, names, config.iterations, out / "streaming.png", title)
    return rows


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, StreamingConfig)
    with stop_with_resume_hint(config.out_dir):
        run(config)
    print((Path(config.out_dir) / "streaming.md").read_text())


if __name__ == "__main__":
    main()
