"""``python -m come_rl.bench threads``: one CEM decision's ``imagine`` at each torch thread count, on a quiet machine
and beside busy processes (it chooses ``run.threads``)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl.bench.common import default_decision_model
from come_rl.checkpoint import resolve_checkpoint
from come_rl.results import write_table


@dataclass
class ThreadsBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    batch: int = 24
    """imagined candidates per call (the default CEM population)."""
    horizon: int = 4
    steps: int = 4
    """denoising steps per imagined frame (the default run's sampler_steps)."""
    threads: list = field(default_factory=lambda: [1, 2])
    busy: list = field(default_factory=lambda: [0, 1])
    """how many other processes keep a core busy (1-thread matmul loops) while a setting is timed."""
    repeats: int = 5
    """timed imagine calls per setting (rounds alternate the settings)."""
    out_dir: str = "results/bench"


_BUSY_LOOP = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
              "while True:\n    a = torch.tanh(a @ a) \n")


def bench_threads(config: ThreadsBenchConfig) -> list[dict]:
    """Seconds per ``imagine`` of one CEM decision at each thread count, quiet and beside busy processes."""
    import os
    import subprocess


    if not config.threads or any(int(t) < 1 for t in config.threads):
        raise ValueError(f"threads must list thread counts >= 1, got {config.threads}")
    if not config.busy or any(int(b) < 0 for b in config.busy) or config.repeats < 1:
        raise ValueError(f"busy must list counts >= 0 and repeats be >= 1, got {config.busy}, {config.repeats}")
    directory = resolve_checkpoint(config.checkpoint)
    torch.set_num_threads(1)
    model, _ = default_decision_model(directory, config.steps)
    dim = model.action_spec.dim
    actions = torch.nn.functional.one_hot(torch.randint(0, dim, (config.batch, config.horizon),
                                                        generator=torch.Generator().manual_seed(0)), dim).float()
    settings = [(int(b), int(t)) for b in config.busy for t in config.threads]
    times: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
    cores = os.cpu_count() or 1
    for round_ in tqdm(range(config.repeats), desc="threads benchmark rounds"):
        for busy, threads in settings:
            loops = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for _ in range(busy)]
            try:
                if busy:
                    time.sleep(1.0)  # the loops are running
                torch.set_num_threads(threads)
                model.imagine(actions[:, :1], seed=0)  # warm-up at this thread count
                start = time.perf_counter()
                model.imagine(actions, seed=round_)
                times[(busy, threads)].append(time.perf_counter() - start)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
    rows = []
    for busy, threads in settings:
        values = np.array(times[(busy, threads)])
        reference = np.median(times[(busy, int(config.threads[0]))])
        rows.append({"other_busy_processes": busy, "torch_threads": threads, "cores": cores,
                     "median_s_per_decision_imagine": float(np.median(values)), "min_s": float(values.min()),
                     "max_s": float(values.max()), f"median_over_{config.threads[0]}_thread": float(np.median(values) / reference),
                     "calls": len(values), "batch": config.batch, "horizon": config.horizon,
                     "denoising_steps": config.steps})
    out = Path(config.out_dir)
    write_table(out / "threads.csv", rows, md_path=out / "threads.md",
                title=f"imagine() of one CEM decision by torch thread count ({directory.name}, base + LTM, batch "
                      f"{config.batch} x horizon {config.horizon}, {config.steps} DDIM steps, {cores} cores; busy "
                      f"processes each run a 1-thread matmul loop; `python -m come_rl.bench threads`)")
    return rows
