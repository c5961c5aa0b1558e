"""One harness for the success-rate evaluations of agents (find the object, return to a seen place, the run command's
find-the-object episodes).

An evaluation states what is its own: a worker class built once per process (env, world model, LPIPS), whose
``run(task) -> (row, gif)`` plays one episode (``come_rl.episode_records.recorded_episode`` makes it resumable), the
numeric columns its summary averages, and its title. The harness does the rest, the same way for every evaluation:
fan-out (this process or Ray actors, :func:`play_agents`), the per-agent summary with its Wilson 95 % interval
(:func:`summarize_successes`), the episodes / summary tables, one success and one failure GIF per agent and the
success-rate plot (:func:`write_success_results`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from come_rl.fanout import FanoutSettings, run_tasks
from come_rl.results import wilson_interval, write_table
from come_rl.visualize import save_rollout_gif

Episode = tuple[dict, list]


def play_agents(worker_class: Callable[..., Any], worker_args: Callable[[str], tuple], names: Sequence[str],
                tasks: Sequence[Any], fanout: FanoutSettings, desc: str, progress: bool = True) -> dict[str, list[Episode]]:
    """{name: [worker.run(task) for task in tasks]} for the worker ``worker_class(*worker_args(name))`` of each name.

    Locally every worker is built before any episode (a missing checkpoint fails before any work) and closed after;
    with ``fanout.backend == "ray"`` each name's episodes run on ``fanout.workers`` actors that build their own."""
    if fanout.backend == "local":
        workers = [worker_class(*worker_args(name)) for name in names]
        try:
            return {name: [worker.run(task) for task in tqdm(tasks, desc=f"{desc}: {name}", disable=not progress)]
                    for name, worker in zip(names, workers)}
        finally:
            for worker in workers:
                if callable(getattr(worker, "close", None)):
                    worker.close()
    return {name: run_tasks(worker_class, worker_args(name), tasks, backend=fanout.backend, workers=fanout.workers,
                            threads=fanout.threads, gpus_per_worker=getattr(fanout, "gpus_per_worker", 0.0),
                            desc=f"{desc}: {name}", progress=progress) for name in names}


def nan_mean(rows: Sequence[dict], key: str) -> float:
    """The mean of ``key`` over the rows that have a number there (NaN when none has)."""
    values = [float(row[key]) for row in rows if key in row and not math.isnan(float(row[key]))]
    return float(np.mean(values)) if values else math.nan


def summarize_successes(name: str, rows: Sequence[dict], mean_keys: Sequence[str] = (),
                        label_keys: Sequence[str] = ()) -> dict:
    """One agent's episodes -> its success rate with the Wilson 95 % interval, the labels ``label_keys`` of its first
    row, and the NaN-aware means of ``mean_keys``."""
    if not rows:
        raise ValueError(f"agent {name!r} has no episodes to summarize")
    hits = sum(bool(row["success"]) for row in rows)
    low, high = wilson_interval(hits, len(rows))
    return {"agent": name, **{key: rows[0][key] for key in label_keys}, "episodes": len(rows), "successes": hits,
            "success_rate": hits / len(rows), "ci95_low": low, "ci95_high": high,
            **{key: nan_mean(rows, key) for key in mean_keys}}


def write_success_results(results: dict[str, list[Episode]], out: Path, title: str, mean_keys: Sequence[str] = (),
                          label_keys: Sequence[str] = (), gifs: bool = True, plot_title: str = "",
                          chance: float | None = None, chance_label: str = "", extra_panel: Callable[[Any, list[dict]], None] | None = None
                          ) -> list[dict]:
    """{agent: [(episode row, GIF) per episode]} -> ``episodes.csv/.md``, ``summary.csv/.md``, ``success.png`` and
    ``<agent>_success.gif`` / ``<agent>_failure.gif`` (the first of each; a GIF is one (T, H, W, 3) sequence's frames
    or several sequences shown side by side); returns the summary rows."""
    out = Path(out)
    rows, summaries = [], []
    for name, episodes in results.items():
        agent_rows = [row for row, _ in episodes]
        rows += agent_rows
        summaries.append(summarize_successes(name, agent_rows, mean_keys, label_keys))
        if not gifs:
            continue
        first = {}
        for row, gif in episodes:
            first.setdefault(bool(row["success"]), gif)
        for stale in ("success", "failure"):  # a GIF of an earlier run would pass for this run's
            (out / f"{name}_{stale}.gif").unlink(missing_ok=True)
        for success, gif in first.items():
            if gif is None or len(gif) == 0:
                continue
            sequences = [np.stack(gif)] if np.asarray(gif[0]).ndim == 3 else list(gif)
            save_rollout_gif(out / f"{name}_{'success' if success else 'failure'}.gif", sequences)
    write_table(out / "episodes.csv", rows, md_path=out / "episodes.md", title=title + " (per episode)")
    write_table(out / "summary.csv", summaries, md_path=out / "summary.md", title=title)
    plot_success(summaries, out / "success.png", plot_title, chance, extra_panel, chance_label)
    return summaries


def plot_success(summaries: list[dict], path: Path, title: str = "", chance: float | None = None,
                 extra_panel: Callable[[Any, list[dict]], None] | None = None, chance_label: str = "") -> None:
    """Success rate per agent with its 95 % interval (and a chance line); ``extra_panel(ax, summaries)`` draws a
    second panel beside it. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if extra_panel else 1, figsize=(10 if extra_panel else 6, 3.5))
    left = axes[0] if extra_panel else axes
    x = np.arange(len(summaries))
    rates = np.array([s["success_rate"] for s in summaries])
    err = np.array([rates - [s["ci95_low"] for s in summaries], [s["ci95_high"] for s in summaries] - rates])
    left.bar(x, rates, yerr=err, capsize=4, color="tab:blue")
    if chance is not None:
        left.axhline(chance, color="k", ls=":", lw=1, label=f"chance {chance_label or f'{chance:.2f}'}")
        left.legend()
    left.set_xticks(x, [s["agent"] for s in summaries])
    left.set_ylim(0, 1)
    left.set_ylabel("success rate (95 % CI)")
    left.set_title(f"{title} ({summaries[0]['episodes']} episodes each)" if title else
                   f"{summaries[0]['episodes']} episodes each")
    if extra_panel:
        extra_panel(axes[1], summaries)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    temporary.replace(path)
