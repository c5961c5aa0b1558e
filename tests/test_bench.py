"""The benchmarks write their tables (they time nothing a test asserts on: a benchmark is not a timed test)."""

import csv

import pytest

from come_rl.bench import ThreadsBenchConfig, bench_threads


def test_the_threads_benchmark_times_every_setting_and_writes_its_table(tmp_path):
    rows = bench_threads(ThreadsBenchConfig(batch=2, horizon=1, steps=1, threads=[1, 2], busy=[0, 1], repeats=1,
                                            out_dir=str(tmp_path)))
    assert [(r["other_busy_processes"], r["torch_threads"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["median_s_per_decision_imagine"] > 0 and r["calls"] == 1 for r in rows)
    assert rows[0]["median_over_1_thread"] == 1.0 and rows[2]["median_over_1_thread"] == 1.0
    with open(tmp_path / "threads.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "1-thread matmul loop" in (tmp_path / "threads.md").read_text()
    with pytest.raises(ValueError, match="threads must list"):
        bench_threads(ThreadsBenchConfig(threads=[0], out_dir=str(tmp_path)))
