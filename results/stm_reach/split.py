"""Session 36: where can the maze STM help? Splits each held-out consistency run's imagined frames by what a window
could have seen, and compares two rows (default: + STM against the base) per episode within each part.

    python results/stm_reach/split.py results/consistency_s34 results/consistency_s35            # + STM vs base
    python results/stm_reach/split.py rows=come,base results/consistency_s34 results/consistency_s35

A frame k of the horizon (k = 0 .. H - 1, the context is frames 0 .. C - 1) is a
- "base window" revisit: its real pose is within the revisit tolerance (0.5 cell, 45 degrees) of one of the frames
  the base still reads real at step k (the last 3 context frames that have not slid out: index >= C - 3 + k);
- "STM window" revisit: not that, but within tolerance of a real frame still in the STM's 16-frame window at step k
  (index >= C - 16 + k): what the STM's window recall could fetch and the base cannot;
- "beyond" revisit: a revisit (of the memorized 0 .. C - 1) that neither window holds: the LTM's and SLTM's part;
- not a revisit.
The episodes are regenerated from their seeds (``online:memory_maze``, as the consistency run did; ~1 min per episode
on one core, cached in ``--cache``), the per-frame LPIPS are the runs' own columns. Writes ``split.csv`` (or ``out=<csv>``; one row per
run episode, part and composition, every composition of the runs) and prints the table: mean per-episode paired difference (row - reference) with a 95 %
t interval, over the episodes that have frames of that part.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from come_rl.data_sources import SeededEpisodePool
from come_rl.experiments.consistency import mean_interval, revisit_mask

HERE = Path(__file__).resolve().parent
PARTS = ("base_window", "stm_window", "beyond", "none")


def episode_poses(seed: int, steps: int, cache: Path) -> np.ndarray:
    path = cache / f"poses_{seed}_{steps}.npy"
    if not path.exists():
        poses = np.asarray(SeededEpisodePool("memory_maze", episodes=1, steps=steps, seed=seed).dataset.poses[0])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), poses)
        path.with_suffix(".tmp.npy").replace(path)
    return np.load(path)


def frame_parts(poses: np.ndarray, context: int, horizon: int) -> list[str]:
    parts = []
    for k in range(horizon):
        query = poses[context + k][None]
        if revisit_mask(poses[max(context - 3 + k, 0):context], query)[0]:
            parts.append("base_window")
        elif revisit_mask(poses[max(context - 16 + k, 0):context], query)[0]:
            parts.append("stm_window")
        elif revisit_mask(poses[:context], query)[0]:
            parts.append("beyond")
        else:
            parts.append("none")
    return parts


def main(argv: list[str]) -> None:
    rows_arg = [a for a in argv if a.startswith("rows=")]
    names = rows_arg[0].removeprefix("rows=").split(",") if rows_arg else ["stm", "base"]
    runs = [Path(a) for a in argv if not a.startswith(("rows=", "--cache=", "out="))]
    out_arg = [a for a in argv if a.startswith("out=")]
    cache_arg = [a for a in argv if a.startswith("--cache=")]
    cache = Path(cache_arg[0].removeprefix("--cache=")) if cache_arg else Path("/tmp/stm_reach_poses")
    context, horizon = 400, 32
    records = []  # (run, seed, part, row, mean lpips over the part's frames, frames)
    for run in runs:
        with open(run / "consistency.csv", newline="") as handle:
            table = list(csv.DictReader(handle))
        for seed in sorted({int(r["seed"]) for r in table}):
            poses = episode_poses(seed, context + horizon - 1, cache)
            parts = np.array(frame_parts(poses, context, horizon))
            by_row = {r["composition"]: np.array([float(v) for v in r["lpips_per_frame"].split()])
                      for r in table if int(r["seed"]) == seed}
            for part in PARTS:
                mask = parts == part
                for name in by_row:  # every row of the run, for later splits; the table compares ``names``
                    if mask.any():
                        records.append({"run": run.name, "seed": seed, "part": part, "row": name,
                                        "lpips": float(by_row[name][mask].mean()), "frames": int(mask.sum())})
    out = Path(out_arg[0].removeprefix("out=")) if out_arg else HERE / "split.csv"
    with open(out.with_suffix(".tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    out.with_suffix(".tmp").replace(out)
    episodes = len({(r["run"], r["seed"]) for r in records})
    print(f"{episodes} episodes; frames per part: " + ", ".join(
        f"{p} {sum(r['frames'] for r in records if r['part'] == p and r['row'] == names[-1])}" for p in PARTS))
    reference = names[-1]
    print("| part | episodes | frames | " + " | ".join(f"{n} LPIPS" for n in names)
          + f" | {names[0]} - {reference} (95 % t) | lower in |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for part in PARTS:
        keyed = {(r["run"], r["seed"], r["row"]): r for r in records if r["part"] == part}
        eps = sorted({(run, seed) for run, seed, row in keyed if row == reference})
        eps = [e for e in eps if all((*e, n) in keyed for n in names)]
        if not eps:
            continue
        diffs = [keyed[(*e, names[0])]["lpips"] - keyed[(*e, reference)]["lpips"] for e in eps]
        mean, half = mean_interval(diffs)
        means = [np.mean([keyed[(*e, n)]["lpips"] for e in eps]) for n in names]
        frames = sum(keyed[(*e, reference)]["frames"] for e in eps)
        print(f"| {part} | {len(eps)} | {frames} | " + " | ".join(f"{m:.4f}" for m in means)
              + f" | {mean:+.4f} ± {half:.4f} | {sum(d < 0 for d in diffs)} of {len(eps)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
