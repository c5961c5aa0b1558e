"""Where in a rollout a row gains or loses against the base: LPIPS(row) - LPIPS(base) per block of imagined steps,
over revisit frames and over all frames, from a consistency run's per-frame columns.

    python results/consistency_s32/per_step.py results/consistency_s32 come,base_anchored,ltm,stm

Prints a markdown table (the numbers of results/consistency_s32/README.md, "Where CoME loses").
"""

import csv
import sys

import numpy as np

BLOCKS = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 8), (8, 16), (16, 32)]


def per_frame(rows: list[dict], name: str, key: str) -> dict[str, np.ndarray]:
    return {r["episode"]: np.array([float(v) for v in r[key].split()]) for r in rows if r["composition"] == name}


def main(run: str, names: list[str]) -> None:
    with open(f"{run}/consistency.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    base = per_frame(rows, "base", "lpips_per_frame")
    revisit = per_frame(rows, "base", "revisit_per_frame")
    episodes = sorted(base, key=int)
    horizon = len(base[episodes[0]])
    blocks = [(lo, min(hi, horizon)) for lo, hi in BLOCKS if lo < horizon]
    heads = [f"steps {lo + 1}-{hi}" if hi - lo > 1 else f"step {lo + 1}" for lo, hi in blocks]
    print("| row - base | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(blocks))
    mask = np.array([revisit[e] for e in episodes]) > 0
    print("| revisit frames (of all) | " + " | ".join(f"{int(mask[:, lo:hi].sum())} ({mask[:, lo:hi].size})"
                                                  for lo, hi in blocks) + " |")
    for name in names:
        mine = per_frame(rows, name, "lpips_per_frame")
        diff = np.array([mine[e] - base[e] for e in episodes])
        cells = []
        for lo, hi in blocks:
            block, seen = diff[:, lo:hi], mask[:, lo:hi]
            on_revisits = f"{block[seen].mean():+.3f}" if seen.any() else "-"
            cells.append(f"{on_revisits} / {block.mean():+.3f}")
        print(f"| {name}: revisit / all | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
