"""Paired per-episode comparison of two consistency runs on the same episodes (same seeds).

    python results/consistency_tuning/paired_runs.py <run A dir> <run B dir> [rows]

For each composition in both runs' consistency.csv (or the comma-separated ``rows``): mean revisit LPIPS of A and B
over the shared episodes, the mean per-episode difference B - A with its 95 % t interval, in how many episodes B is
lower, and the pooled revisit LPIPS (each revisit frame once) of both. Episodes without revisit frames are left out.
"""

import csv
import math
import sys
from pathlib import Path

from scipy import stats


def load(run: Path) -> dict[tuple[str, int], dict]:
    with open(run / "consistency.csv") as handle:
        return {(row["composition"], int(row["episode"])): row for row in csv.DictReader(handle)}


def main() -> None:
    a_dir, b_dir = Path(sys.argv[1]), Path(sys.argv[2])
    a, b = load(a_dir), load(b_dir)
    rows = sys.argv[3].split(",") if len(sys.argv) > 3 else sorted({k[0] for k in a} & {k[0] for k in b})
    print(f"B = {b_dir}, A = {a_dir}")
    print("| row | episodes | revisit A | revisit B | B - A (95 % t) | B lower in | pooled A | pooled B |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rows:
        keys = sorted(k for k in a if k[0] == name and k in b and int(a[k]["revisit_frames"]) > 0)
        if not keys:
            continue
        la = [float(a[k]["lpips_revisit"]) for k in keys]
        lb = [float(b[k]["lpips_revisit"]) for k in keys]
        frames = [int(a[k]["revisit_frames"]) for k in keys]
        diffs = [y - x for x, y in zip(la, lb)]
        n = len(diffs)
        mean = sum(diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
        pooled_a = sum(x * f for x, f in zip(la, frames)) / sum(frames)
        pooled_b = sum(y * f for y, f in zip(lb, frames)) / sum(frames)
        print(f"| {name} | {n} | {sum(la) / n:.3f} | {sum(lb) / n:.3f} | {mean:+.3f} ± {half:.3f} | "
              f"{sum(d < 0 for d in diffs)} of {n} | {pooled_a:.3f} | {pooled_b:.3f} |")


if __name__ == "__main__":
    main()
