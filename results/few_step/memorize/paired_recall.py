"""Per-episode pairs of two recall runs on the same episodes (the same seeds), read from their episode records:

    python results/few_step/memorize/paired_recall.py <records dir A> <records dir B>

(a run's records: <out_dir>/records/memory_cards_recall<suffix>/episode_records). For each start: recall of A and B
pooled over tiles, the mean per-episode difference B - A with its 95 % t interval, the tiles recalled only by one, and
the memorization seconds per episode of each (the records' own timings).
"""

import glob
import sys

import numpy as np
from scipy import stats

from come_rl.episode_records import read_record

RULE = "PoCE w=2.5, gated t>=0.8"


def load(records: str) -> dict:
    """{record name: (start, [recalled per tile], memorization seconds)}."""
    found = {}
    for path in sorted(glob.glob(f"{records}/*.npz")):
        row, _ = read_record(path)
        seconds = sum(s for _, _, s in row["seconds"])
        for name, _, start, tiles in row["scores"]:
            if name == RULE:
                found[path.split("/")[-1]] = (start, [hit for _, hit in tiles], seconds)
    return found


def main() -> None:
    a, b = load(sys.argv[1]), load(sys.argv[2])
    for start in ("covered", "uncovered"):
        keys = [key for key in a if a[key][0] == start and key in b]
        if not keys:
            continue
        pairs = [(x, y) for key in keys for x, y in zip(a[key][1], b[key][1])]
        diff = np.array([np.mean(b[key][1]) - np.mean(a[key][1]) for key in keys])
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
        print(f"{start}: {len(keys)} episodes, {len(pairs)} tiles: A {100 * np.mean([x for x, _ in pairs]):.1f} %, "
              f"B {100 * np.mean([y for _, y in pairs]):.1f} %, B - A per episode {100 * diff.mean():+.1f} ± "
              f"{100 * half:.1f} points; only A: {sum(x and not y for x, y in pairs)}, only B: "
              f"{sum(y and not x for x, y in pairs)}; memorization s per episode A "
              f"{np.mean([a[k][2] for k in keys]):.1f}, B {np.mean([b[k][2] for k in keys]):.1f}")


if __name__ == "__main__":
    main()
