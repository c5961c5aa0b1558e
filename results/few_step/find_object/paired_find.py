"""Pair two find-the-object runs on the same seeds: successes, the difference and its discordant episodes.

python results/few_step/find_object/paired_find.py <run A (episodes.csv's folder)> <run B>
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def successes(folder: Path) -> dict[int, int]:
    with open(folder / "episodes.csv") as handle:
        return {int(row["seed"]): int(row["success"]) for row in csv.DictReader(handle)}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p (binomial test of the discordant pairs at 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def main(a: str, b: str) -> None:
    first, second = successes(Path(a)), successes(Path(b))
    if set(first) != set(second):
        raise SystemExit(f"the runs have other seeds: {sorted(set(first) ^ set(second))}")
    n = len(first)
    only_a = sum(first[s] and not second[s] for s in first)
    only_b = sum(second[s] and not first[s] for s in first)
    print(f"episodes {n}: A {sum(first.values())}/{n}, B {sum(second.values())}/{n}; B - A = "
          f"{100 * (sum(second.values()) - sum(first.values())) / n:+.1f} points; only A {only_a}, only B {only_b}; "
          f"exact McNemar p = {mcnemar_exact(only_a, only_b):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
