"""``python -m come_rl.bench memory_format``: the CPU's convolutions with weights as built (NCHW) against channels-last
(NHWC, what ``come_rl.devices.prefer_channels_last`` gives every expert on the CPU), in one run.

Per layout, on the checkpoint's base expert: one sampling call (prepare + one denoising pass) at the planner's
population, one training step (the diffusion loss, its backward and an AdamW step) at a training batch, and one LTM
memorization step of the default run's world model (base + LTM after a 16-step walk). Rounds alternate the layouts;
the table keeps each item's median. The sampling outputs of the two layouts are compared on the same inputs.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl import devices
from come_rl.bench.common import default_decision_model
from come_rl.checkpoint import load_expert, resolve_checkpoint
from come_rl.results import write_table

LAYOUTS = ("as_built", "channels_last")


@dataclass
class MemoryFormatBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    sample_batch: int = 24
    """rows of the sampling call (the default CEM population)."""
    train_batch: int = 32
    """clips of the training step (come_rl.train's CPU batch)."""
    memorize_steps: int = 2
    """LTM gradient steps timed per round (the checkpoint's memorization batch)."""
    rounds: int = 5
    """timed rounds after one warm-up round; each round runs every item in both layouts."""
    threads: int = 1
    out_dir: str = "results/bench"

    def __post_init__(self) -> None:
        if min(self.sample_batch, self.train_batch, self.memorize_steps, self.rounds, self.threads) < 1:
            raise ValueError(f"sample_batch, train_batch, memorize_steps, rounds and threads must be >= 1, got "
                             f"{self.sample_batch}, {self.train_batch}, {self.memorize_steps}, {self.rounds}, "
                             f"{self.threads}")


def _clips(expert, action_dim: int, frame_size: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    k = expert.context_frames
    frames = torch.rand((batch, k + 1, 3, frame_size, frame_size), generator=generator) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, action_dim, (batch, k + 1), generator=generator),
                                          action_dim).float()
    return frames, actions


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def bench_memory_format(config: MemoryFormatBenchConfig) -> list[dict]:
    torch.set_num_threads(int(config.threads))
    directory = resolve_checkpoint(config.checkpoint)
    base, spec = load_expert(directory, "base")
    if base.backbone.__class__.__name__ != "VideoUNet":
        raise ValueError(f"{directory} has a {base.backbone.__class__.__name__} base; the memory-format benchmark "
                         "times convolutions: pass a U-Net checkpoint, e.g. checkpoint=memory_maze")
    action_dim, frame_size = int(spec["action_spec"]["dim"]), int(spec["frame_size"])
    if action_dim != 6:  # the memorization item memorizes a Memory Maze walk (bench.common.default_decision_model)
        raise ValueError(f"the memory-format benchmark memorizes a Memory Maze walk, but {directory} takes {action_dim} "
                         "actions (Memory Maze has 6): pass a Memory Maze checkpoint, e.g. checkpoint=memory_maze")
    experts = {"as_built": base.eval(), "channels_last": copy.deepcopy(base).eval()}
    with channels_last_on_cpu(True):
        devices.prefer_channels_last(experts["channels_last"])
    models = {}
    for layout in LAYOUTS:
        with channels_last_on_cpu(layout == "channels_last"):
            models[layout], _ = default_decision_model(directory, steps=1)
    frames, actions = _clips(base, action_dim, frame_size, config.sample_batch, seed=0)
    noisy = torch.randn((config.sample_batch, *frames.shape[2:]), generator=torch.Generator().manual_seed(1))
    t = torch.full((config.sample_batch,), 0.5)
    train_frames, train_actions = _clips(base, action_dim, frame_size, config.train_batch, seed=2)
    trainees = {layout: copy.deepcopy(expert).train() for layout, expert in experts.items()}
    optimizers = {layout: torch.optim.AdamW(net.backbone.parameters(), lr=1e-6) for layout, net in trainees.items()}
    outputs = {}

    def sample(layout: str) -> None:
        with torch.no_grad():
            prepared = experts[layout].prepare(frames[:, :-1], actions)
            outputs[layout] = experts[layout].predict_eps(prepared, noisy, t)

    def train_step(layout: str) -> None:
        loss = trainees[layout].loss(train_frames, train_actions, generator=torch.Generator().manual_seed(3))
        optimizers[layout].zero_grad()
        loss.backward()
        optimizers[layout].step()

    def memorize(layout: str) -> None:
        models[layout].memorize(steps=config.memorize_steps, generator=torch.Generator().manual_seed(4))

    items = {"sampling call": sample, "training step": train_step, "memorization step": memorize}
    per = {"sampling call": 1, "training step": 1, "memorization step": config.memorize_steps}
    times = {(item, layout): [] for item in items for layout in LAYOUTS}
    for round_ in tqdm(range(config.rounds + 1), desc="memory-format benchmark rounds"):
        for item, function in items.items():
            for layout in (LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]):
                seconds = _timed(function, layout) / per[item]
                if round_:
                    times[item, layout].append(seconds)
    difference = float((outputs["channels_last"] - outputs["as_built"]).abs().max())
    rows = []
    for item in items:
        built, last = (float(np.median(times[item, layout])) for layout in LAYOUTS)
        batch = {"sampling call": config.sample_batch, "training step": config.train_batch,
                 "memorization step": models["as_built"].memorize_config.batch_size}[item]
        rows.append({"item": item, "batch": batch, "rounds": config.rounds, "threads": config.threads,
                     "as_built_s": built, "channels_last_s": last, "channels_last_x_as_built": last / built,
                     "max_abs_diff_of_eps": difference if item == "sampling call" else None})
    out = Path(config.out_dir)
    write_table(out / "memory_format.csv", rows, md_path=out / "memory_format.md",
                title=f"Convolution weights as built (NCHW) against channels-last (NHWC) on the CPU ({directory.name} "
                      f"base, fp32, {config.threads} thread(s); medians of {config.rounds} rounds, layouts alternated "
                      f"in one run; `python -m come_rl.bench memory_format`)")
    return rows


@contextlib.contextmanager
def channels_last_on_cpu(enabled: bool):
    """``come_rl.devices.CHANNELS_LAST_ON_CPU`` set for a block (the benchmark builds one model of each layout)."""
    before = devices.CHANNELS_LAST_ON_CPU
    devices.CHANNELS_LAST_ON_CPU = enabled
    try:
        yield
    finally:
        devices.CHANNELS_LAST_ON_CPU = before
