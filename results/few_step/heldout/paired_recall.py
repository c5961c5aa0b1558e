"""Per-episode pairs of two held-out recall runs at A and B DDIM steps (suffixes _sA and _sB: the same episodes, the
same memorized weights), or of two runs named by their suffixes (A and B not numbers: two models on the same
episodes), read from the runs' episode records:

    python results/few_step/heldout/paired_recall.py [out_dir] [A] [B]
    # defaults: results/few_step/heldout 2 10; session 26: results/few_step/heldout_1step 1 10;
    # session 27: results/few_step/heldout_shortcut 2 10; pooled over sets (comma-separated out_dirs):
    # python results/few_step/heldout/paired_recall.py results/few_step/heldout_shortcut,results/few_step/heldout_6400 2 10
"""

import glob
import json
import sys

import numpy as np
from scipy import stats

RULE = "PoCE w=2.5, gated t>=0.8"


def load(out_dir: str, steps: str) -> dict:
    """{episode record name: (start, [recalled per tile])} of the run with suffix _s<steps> (or the suffix given)."""
    found = {}
    suffix = f"_s{steps}" if steps.isdigit() else steps
    for path in sorted(glob.glob(f"{out_dir}/records/memory_cards_recall{suffix}/episode_records/*.npz")):
        with np.load(path) as record:
            row = json.loads(str(record["row"]))
        for name, _, start, tiles in row["scores"]:
            if name == RULE:
                found[path.split("/")[-1]] = (start, [hit for _, hit in tiles])
    return found


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "results/few_step/heldout"
    a, b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("2", "10")
    two, ten = {}, {}
    for folder in out_dir.split(","):  # several held-out sets pooled, each episode paired within its own set
        two.update({(folder, key): value for key, value in load(folder, a).items()})
        ten.update({(folder, key): value for key, value in load(folder, b).items()})
    for start in ("covered", "uncovered"):
        keys = [key for key in two if two[key][0] == start and key in ten]
        pairs = [(a, b) for key in keys for a, b in zip(two[key][1], ten[key][1])]
        diff = np.array([np.mean(two[key][1]) - np.mean(ten[key][1]) for key in keys])
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        only_two = sum(a and not b for a, b in pairs)
        only_ten = sum(b and not a for a, b in pairs)
        print(f"{start}: {len(keys)} episodes, {len(pairs)} tiles: {a} steps {100 * np.mean([x for x, _ in pairs]):.1f} %, "
              f"{b} steps {100 * np.mean([y for _, y in pairs]):.1f} %, {a} - {b} per episode {100 * diff.mean():+.1f} ± "
              f"{100 * half:.1f} points; tiles recalled only at {a}: {only_two}, only at {b}: {only_ten}")


if __name__ == "__main__":
    main()
