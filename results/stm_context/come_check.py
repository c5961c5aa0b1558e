"""CoME with two STMs on the same episodes, from the per-episode records of two consistency runs (each run's
``<out_dir>/episode_records``; an interrupted run leaves the episodes it finished, and this reads those):

    python results/stm_context/come_check.py <first out_dir> <second out_dir>

Prints per episode the base's and each run's CoME LPIPS (all frames, revisit frames) and the second run's CoME minus
the first's, averaged over the episodes both finished.
"""

from __future__ import annotations

import glob
import json
import sys

import numpy as np


def rows(out_dir: str) -> dict:
    found = {}
    for path in sorted(glob.glob(f"{out_dir}/episode_records/episode_*.npz")):
        for row in json.loads(str(np.load(path, allow_pickle=True)["row"])):
            found[(row["episode"], row["composition"])] = row
    return found


def main(argv: list[str]) -> None:
    first, second = rows(argv[0]), rows(argv[1])
    episodes = sorted({e for e, c in first if c == "come"} & {e for e, c in second if c == "come"})
    if not episodes:
        raise SystemExit("no episode with a come row in both runs")
    differences = []
    for e in episodes:
        old, new, base = first[(e, "come")], second[(e, "come")], first[(e, "base")]
        print(f"episode {e}: base {base['lpips_all']:.4f} / {base['lpips_revisit']:.4f}, CoME first {old['lpips_all']:.4f}"
              f" / {old['lpips_revisit']:.4f}, second {new['lpips_all']:.4f} / {new['lpips_revisit']:.4f} (LPIPS all / "
              f"revisit; memorized in {new.get('memorize_seconds', float('nan')):.0f} s)")
        differences.append((new["lpips_all"] - old["lpips_all"], new["lpips_revisit"] - old["lpips_revisit"]))
    d = np.array(differences)
    print(f"second - first, CoME: all {d[:, 0].mean():+.4f}, revisit {d[:, 1].mean():+.4f} over {len(episodes)} episodes "
          f"(per episode within {np.abs(d).max():.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
