"""CoME with the STM gated at t >= 0.5 (old) and at every noise level (new) on 8 held-out episodes, pooled over the
two runs of session 33 whose row names differ (the gate changed in world_model.json between them):

    python results/stm_context/session33/come_check8.py results/stm_context/session33/come_stm_rule.csv \
        results/stm_context/session33/come_stm_rule_b.csv
"""

import csv
import sys

from come_rl.experiments.consistency import format_paired, paired_to


def rows(path: str, names: dict) -> dict:
    out: dict = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["composition"] in names:
                out.setdefault(names[row["composition"]], []).append({**row, "episode": row["seed"]})
    return out


def main(first: str, second: str) -> None:
    a = rows(first, {"come": "old", "come_stm_all": "new", "base": "base"})
    b = rows(second, {"come_gate05": "old", "come": "new", "base": "base"})
    merged = {key: a[key] + b[key] for key in a}
    print(f"{len(merged['new'])} episodes (seeds {', '.join(row['seed'] for row in merged['new'])})")
    for part in ("revisit", "all"):
        print(f"CoME, STM at every level minus gated at t >= 0.5, {part}: "
              f"{format_paired(paired_to(merged['new'], merged['old'], 'lpips_' + part))}")
        for key in ("old", "new"):
            print(f"  {key} vs base, {part}: {format_paired(paired_to(merged[key], merged['base'], 'lpips_' + part))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
