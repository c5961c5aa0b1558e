"""results/shared_prefixes/seconds.png: seconds per decision before and after, from the benches' CSVs in this folder.

    python results/shared_prefixes/plot.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from come_rl.results import read_rows  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    lazy = {row["variant"]: float(row["median_decision_s"]) for row in read_rows(HERE / "bench_lazy" / "decision.csv")[1]}
    before = next(v for k, v in lazy.items() if k.startswith("fp32, reference_tree"))
    after = next(v for k, v in lazy.items() if k.startswith("fp32, this_tree"))
    maze = {row["share_prefixes"]: float(row["median_decision_s"]) for row in read_rows(HERE / "bench" / "decision_steps.csv")[1]}
    find = {row["share_prefixes"]: float(row["median_decision_s"])
            for row in read_rows(HERE / "bench" / "find_decision_steps.csv")[1]}
    panels = [("Memory Maze CEM 24 x 4, 1 step", [("before", before), ("lazy prepare", after),
                                                   ("+ shared prefixes\n(cold population)", maze["True"])]),
              ("Memory Cards find the object, CoME, 2 steps", [("before", find["False"]), ("shared prefixes", find["True"])])]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, (title, bars) in zip(axes, panels):
        names, seconds = zip(*bars)
        axis.bar(names, seconds, color=["#888888"] + ["#2a7ab9"] * (len(bars) - 1))
        for i, value in enumerate(seconds):
            axis.text(i, value, f"{value:.2f} s", ha="center", va="bottom")
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("seconds per decision (fp32, 1 thread)")
    figure.tight_layout()
    figure.savefig(HERE / "seconds.png", dpi=110)


if __name__ == "__main__":
    main()
