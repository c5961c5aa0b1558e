"""Per-episode pairs of the held-out recall runs at 2 and 10 DDIM steps (the same episodes, the same memorized
weights), read from the runs' episode records:

    python results/few_step/heldout/paired_recall.py [out_dir]     # out_dir of the two runs (results/few_step/heldout)
"""

import glob
import json
import sys

import numpy as np
from scipy import stats

RULE = "PoCE w=2.5, gated t>=0.8"


def load(out_dir: str, steps: int) -> dict:
    """{episode record name: (start, [recalled per tile])} of the run with suffix _s<steps>."""
    found = {}
    for path in sorted(glob.glob(f"{out_dir}/records/memory_cards_recall_s{steps}/episode_records/*.npz")):
        with np.load(path) as record:
            row = json.loads(str(record["row"]))
        for name, _, start, tiles in row["scores"]:
            if name == RULE:
                found[path.split("/")[-1]] = (start, [hit for _, hit in tiles])
    return found


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "results/few_step/heldout"
    two, ten = load(out_dir, 2), load(out_dir, 10)
    for start in ("covered", "uncovered"):
        keys = [key for key in two if two[key][0] == start and key in ten]
        pairs = [(a, b) for key in keys for a, b in zip(two[key][1], ten[key][1])]
        diff = np.array([np.mean(two[key][1]) - np.mean(ten[key][1]) for key in keys])
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        only_two = sum(a and not b for a, b in pairs)
        only_ten = sum(b and not a for a, b in pairs)
        print(f"{start}: {len(keys)} episodes, {len(pairs)} tiles: 2 steps {100 * np.mean([a for a, _ in pairs]):.1f} %, "
              f"10 steps {100 * np.mean([b for _, b in pairs]):.1f} %, 2 - 10 per episode {100 * diff.mean():+.1f} ± "
              f"{100 * half:.1f} points; tiles recalled only at 2: {only_two}, only at 10: {only_ten}")


if __name__ == "__main__":
    main()
