"""Where a consistency run's revisit error lies: revisit frames re-anchored or not, and how far off the imagined poses
were (needs the per-frame columns the consistency command writes since session 26).

    python results/consistency_tuning/anchor_split.py <run dir> [rows]

For each composition (or the comma-separated ``rows``), pooled over every imagined frame of every episode: revisit
frames re-anchored and not (how many, their mean LPIPS, the mean distance in cells of their imagined pose to the real
one), frames re-anchored that are not revisits (anchors at a place the real path was not near), and the share of
revisit frames whose imagined pose lay within the anchoring distance (0.35 cell) of the real one.
"""

import csv
import sys
from pathlib import Path

import numpy as np


def frames_of(row: dict, key: str, kind=float) -> np.ndarray:
    return np.array([kind(v) for v in row[key].split()]) if row.get(key) else np.array([])


def main() -> None:
    run = Path(sys.argv[1])
    with open(run / "consistency.csv") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "anchored_per_frame" not in rows[0]:
        raise SystemExit(f"{run}/consistency.csv has no per-frame columns (made before session 26): rerun the command")
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(dict.fromkeys(r["composition"] for r in rows))
    print(f"{run}: pooled over frames")
    print("| row | revisit frames | re-anchored: n, LPIPS, pose error | not re-anchored: n, LPIPS, pose error "
          "| anchored off-revisit: n, LPIPS | revisit frames posed within 0.35 cell |")
    print("|---|---|---|---|---|---|")
    for name in names:
        mine = [r for r in rows if r["composition"] == name]
        if not mine:
            continue
        lpips = np.concatenate([frames_of(r, "lpips_per_frame") for r in mine])
        revisit = np.concatenate([frames_of(r, "revisit_per_frame", int) for r in mine]).astype(bool)
        anchored = np.concatenate([frames_of(r, "anchored_per_frame", int) for r in mine]).astype(bool)
        errors = [frames_of(r, "pose_error_per_frame") for r in mine]
        error = np.concatenate(errors) if all(len(e) for e in errors) else np.full(len(lpips), np.nan)

        def cell(mask, with_error=True, lpips=lpips, error=error) -> str:
            if not mask.any():
                return "0"
            text = f"{int(mask.sum())}, {lpips[mask].mean():.3f}"
            return text + (f", {np.nanmean(error[mask]):.2f}" if with_error and np.isfinite(error[mask]).any() else "")

        near = f"{np.mean(error[revisit] <= 0.35):.0%}" if np.isfinite(error).all() and revisit.any() else "-"
        print(f"| {name} | {int(revisit.sum())} | {cell(revisit & anchored)} | {cell(revisit & ~anchored)} "
              f"| {cell(~revisit & anchored, False)} | {near} |")


if __name__ == "__main__":
    main()
