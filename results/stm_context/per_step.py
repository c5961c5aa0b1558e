"""Where in a rollout one row differs from another, per block of imagined steps, from consistency runs' per-frame columns.

    # the same row in two runs (e.g. two STM checkpoints on the same seeds): second - first, all frames, per episode
    python results/stm_context/per_step.py row=stm <first consistency.csv> <second consistency.csv>
    # one row against the base, pooled over runs by episode: revisit frames (count, mean difference) and all frames
    python results/stm_context/per_step.py row=come vs=base <run dir> [<run dir> ...]

Prints a markdown table; intervals are 95 % t intervals over episodes.
"""

import csv
import sys
from pathlib import Path

import numpy as np

BLOCKS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
T95 = {15: 2.131, 16: 2.120}  # small-sample t quantiles; 1.96 beyond


def frames(path: Path, row: str, key: str) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        return {r["seed"]: np.array([float(v) for v in r[key].split()])
                for r in csv.DictReader(handle) if r["composition"] == row}


def interval(x: np.ndarray) -> str:
    half = T95.get(len(x) - 1, 1.96) * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return f"{x.mean():+.4f} ± {half:.4f}"


def main(argv: list[str]) -> None:
    keys = dict(a.split("=", 1) for a in argv if "=" in a)
    paths = [Path(a) for a in argv if "=" not in a]
    row = keys.get("row", "stm")
    if "vs" not in keys:
        first, second = (frames(p, row, "lpips_per_frame") for p in paths[:2])
        seeds = sorted(set(first) & set(second), key=int)
        diff = np.stack([second[s] - first[s] for s in seeds])
        print(f"| {row}: second - first ({len(seeds)} episodes) | LPIPS, all frames |\n|---|---|")
        for lo, hi in BLOCKS:
            print(f"| steps {lo + 1}-{hi} | {interval(diff[:, lo:hi].mean(1))} |")
        return
    vs, per = keys["vs"], {}
    for run in paths:
        csv_path = run / "consistency.csv" if run.is_dir() else run
        mine, base = frames(csv_path, row, "lpips_per_frame"), frames(csv_path, vs, "lpips_per_frame")
        revisit = frames(csv_path, vs, "revisit_per_frame")
        per.update({s: (mine[s] - base[s], revisit[s] > 0.5) for s in mine if s in base})
    diff, mask = np.stack([d for d, _ in per.values()]), np.stack([m for _, m in per.values()])
    print(f"| {row} - {vs} ({len(per)} episodes) | revisit frames | mean difference on them | all frames, per episode |")
    print("|---|---|---|---|")
    for lo, hi in BLOCKS:
        d, m = diff[:, lo:hi], mask[:, lo:hi]
        print(f"| steps {lo + 1}-{hi} | {int(m.sum())} | {d[m].mean():+.4f} | {interval(d.mean(1))} |")


if __name__ == "__main__":
    main(sys.argv[1:])
