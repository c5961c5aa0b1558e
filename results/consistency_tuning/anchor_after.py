"""Session 32: the anchor_after variants against the shipped CoME on the tuning episodes, pooled over runs that split
the episodes (rows are keyed by episode seed).

    python results/consistency_tuning/anchor_after.py results/consistency_tuning/S32_after_a results/consistency_tuning/S32_after_b
    python results/consistency_tuning/anchor_after.py vs=stm,base results/stm_context/session33/held_stm_rule.csv

Prints, per row, the per-episode revisit and all-frame LPIPS and the paired difference to each reference row (``vs=``,
default ``come,base``; mean, 95 % t interval, share, lower in k of n: come_rl.experiments.consistency.paired_to). A
run is its out_dir or its consistency CSV.
"""

import csv
import sys

import numpy as np

from come_rl.experiments.consistency import format_paired, paired_to


def main(argv: list[str]) -> None:
    refs = argv[0].removeprefix("vs=").split(",") if argv and argv[0].startswith("vs=") else ["come", "base"]
    rows = []
    for run in argv[1:] if argv and argv[0].startswith("vs=") else argv:
        with open(run if run.endswith(".csv") else f"{run}/consistency.csv", newline="") as handle:
            rows += [{**row, "episode": row["seed"]} for row in csv.DictReader(handle)]
    names = list(dict.fromkeys(row["composition"] for row in rows))
    print(f"{len({row['seed'] for row in rows})} episodes (seeds {', '.join(sorted({row['seed'] for row in rows}))})")
    print("| row | LPIPS revisit | LPIPS all | " + " | ".join(f"{part} vs {ref}" for ref in refs
                                                          for part in ("revisit", "all")) + " |")
    print("|---|---|---|" + "---|" * (2 * len(refs)))
    of = {name: [row for row in rows if row["composition"] == name] for name in names}
    for name in names:
        revisit = np.mean([float(r["lpips_revisit"]) for r in of[name] if r["lpips_revisit"] != ""])
        every = np.mean([float(r["lpips_all"]) for r in of[name]])
        cells = [format_paired(paired_to(of[name], of[ref], f"lpips_{part}")) if name != ref else ""
                 for ref in refs for part in ("revisit", "all")]
        print(f"| {name} | {revisit:.4f} | {every:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
