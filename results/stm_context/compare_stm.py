"""Paired comparison of two consistency runs on the same episodes (the same seed and episodes, two checkpoints):
each run's rows against its base row, and one row of the second run against the same row of the first.

    python results/stm_context/compare_stm.py <first consistency.csv> <second consistency.csv> [row]

Defaults: row stm. Prints, for LPIPS / SSIM / PSNR over all frames and LPIPS over revisit frames: the row minus the
base per episode (mean, 95 % t half-width, episodes lower, relative to the base's mean) for each run, and the second
run's row minus the first's.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = ("lpips_all", "lpips_revisit", "ssim_all", "psnr_all")


def paired(difference: pd.Series) -> tuple[float, float, int]:
    n = len(difference)
    half = float(stats.t.ppf(0.975, n - 1) * difference.std(ddof=1) / np.sqrt(n))
    return float(difference.mean()), half, int((difference < 0).sum())


def main(argv: list[str]) -> None:
    first, second = (pd.read_csv(path) for path in argv[:2])
    row = argv[2] if len(argv) > 2 else "stm"

    def column(frame: pd.DataFrame, name: str, col: str) -> pd.Series:
        return frame[frame.composition == name].set_index("episode")[col].sort_index()

    for col in COLUMNS:
        base = column(first, "base", col)
        if not np.allclose(base.to_numpy(), column(second, "base", col).to_numpy()):
            raise SystemExit(f"the two runs' base rows differ in {col}: not the same episodes")
        for label, frame in (("first", first), ("second", second)):
            mean, half, lower = paired(column(frame, row, col) - base)
            print(f"{col}: {row} ({label}) - base {mean:+.4f} ± {half:.4f} ({mean / base.mean():+.1%}, lower in "
                  f"{lower} of {len(base)})")
        mean, half, lower = paired(column(second, row, col) - column(first, row, col))
        print(f"{col}: {row} second - first {mean:+.4f} ± {half:.4f} (lower in {lower} of {len(base)})")


if __name__ == "__main__":
    main(sys.argv[1:])
