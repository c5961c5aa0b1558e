"""How long must the maze STM's window be before its older frames show something the last three do not? Poses only,
no model: for every step t of held-out episodes of the exploring policy (the data every maze expert is trained on), is
the view at t a "window revisit" for a window of W frames: its pose lies within a tolerance of a pose among frames
t-W .. t-4, and of none among the last three, t-3 .. t-1? Two tolerances: the consistency tables' revisit rule (0.5
cell and 45 degrees: loose next to one step of motion, at most 0.25 cell or 18 degrees, so the last frame nearly always
matches) and a tight one (0.15 cell and 10 degrees: the same view, nearly pixel for pixel).

    python results/stm_context/window_length.py [seed] [episodes] [windows] [out_dir]

Defaults: seed 55000 (the probe's held-out episodes, ``online:memory_maze``: 1000 steps each, generated from their
seeds), 4 episodes, windows 16,32,64,128,256,400, out_dir results/stm_context. Writes ``window_length.csv`` / ``.md``
(one row per tolerance and window: steps counted, window revisits, their share with a 95 % Wilson interval) and
``window_length.png``. Steps t < W are left out of window W's count (their window is not full).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from come_rl.data_sources import SeededEpisodePool  # noqa: E402
from come_rl.experiments.consistency import revisit_mask  # noqa: E402
from come_rl.results import wilson_interval, write_table  # noqa: E402

RECENT = 3
TOLERANCES = {"0.5 cell, 45 deg (revisit rule)": (0.5, 45.0), "0.15 cell, 10 deg (same view)": (0.15, 10.0)}


def window_revisit_steps(poses: np.ndarray, window: int, distance: float, degrees: float) -> np.ndarray:
    """(T,) bool over steps t >= window of one episode's poses (T + window, 3): window revisits (module docstring)."""
    flags = []
    for t in range(window, len(poses)):
        target = poses[t][None]
        older = revisit_mask(poses[t - window:t - RECENT], target, distance, degrees)[0]
        recent = revisit_mask(poses[t - RECENT:t], target, distance, degrees)[0]
        flags.append(older and not recent)
    return np.asarray(flags, dtype=bool)


def main(argv: list[str]) -> None:
    seed = int(argv[0]) if argv else 55000
    episodes = int(argv[1]) if len(argv) > 1 else 4
    windows = [int(w) for w in (argv[2] if len(argv) > 2 else "16,32,64,128,256,400").split(",")]
    out = Path(argv[3]) if len(argv) > 3 else Path(__file__).parent
    if min(windows) <= RECENT:
        raise ValueError(f"windows must be longer than the last {RECENT} frames, got {windows}")
    pool = SeededEpisodePool("memory_maze", episodes=episodes, seed=seed)
    poses = [np.asarray(p, dtype=np.float64) for p in pool.dataset.poses]
    rows = []
    for name, (distance, degrees) in TOLERANCES.items():
        for window in windows:
            flags = np.concatenate([window_revisit_steps(p, window, distance, degrees) for p in poses
                                    if len(p) > window])
            low, high = wilson_interval(int(flags.sum()), len(flags))
            rows.append({"tolerance": name, "window": window, "steps": len(flags), "window_revisits": int(flags.sum()),
                         "share": float(flags.mean()), "share_ci95_low": max(low, 0.0), "share_ci95_high": high})
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "window_length.csv", rows, md_path=out / "window_length.md",
                title=f"Window revisits of the exploring policy by STM window length ({episodes} held-out Memory Maze "
                      f"episodes of 1000 steps, seeds {seed}+; a step counts when its pose is within the tolerance of a "
                      f"pose among frames t-W .. t-4 and of none among t-3 .. t-1; "
                      f"`python results/stm_context/window_length.py {seed} {episodes} "
                      f"{','.join(map(str, windows))}`)")
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name in TOLERANCES:
        own = [r for r in rows if r["tolerance"] == name]
        share = np.array([r["share"] for r in own]) * 100
        errors = np.array([[r["share"] - r["share_ci95_low"], r["share_ci95_high"] - r["share"]] for r in own]).T * 100
        axis.errorbar(windows, share, yerr=np.clip(errors, 0, None), marker="o", capsize=3, label=name)
    axis.legend(fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_xticks(windows, [str(w) for w in windows])
    axis.set_xlabel("STM window W (frames)")
    axis.set_ylabel("steps whose view only frames\nt-W .. t-4 saw (%)")
    axis.set_title("What an STM window could show (exploring policy)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "window_length.png", dpi=120)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
