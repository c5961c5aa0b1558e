"""The find-the-object tuning table (closed form) and a tiny real run; the diagnosis AUC."""

import numpy as np
import pytest

from agents.find_object_tuning import TuneConfig, table, tune
from agents.return_to_place_diagnosis import auc


def _record(distances, goal_tiles=(0, 1), covered=True):
    goal = np.zeros(16, bool)
    goal[list(goal_tiles)] = True
    return {"distances": np.asarray(distances, float)[None], "goal_tiles": goal, "covered_start": np.array(covered)}


def test_table_scores_each_sample_count_and_reduction():
    d = np.ones((16, 4))
    d[0] = [0.9, 0.1, 0.1, 0.1]  # a goal tile: its first sample is bad, the others good
    d[5] = [0.5, 0.95, 0.95, 0.95]  # a wrong tile: its first sample looks best
    d[6, 3] = 0.01  # a wrong tile with one lucky sample
    rows = {(r["samples"], r["score"]): r for r in table([_record(d)], [100], 4)}
    assert rows[(1, "mean")]["success_rate"] == 0.0  # sample 0 alone picks tile 5
    assert rows[(2, "mean")]["success_rate"] == 1.0  # tile 0: 0.5 < tile 5: 0.725
    assert rows[(4, "mean")]["success_rate"] == 1.0
    assert rows[(4, "min")]["success_rate"] == 0.0  # the lucky sample of tile 6 wins
    assert rows[(4, "median")]["success_rate"] == 1.0
    assert rows[(4, "mean")]["covered_starts"] == "1/1" and rows[(4, "mean")]["uncovered_starts"] == "0/0"


def test_tiny_tuning_run_writes_its_table_and_resumes(tmp_path):
    config = TuneConfig(episodes=1, steps="0,1", samples=2, sampler_steps=1, out_dir=str(tmp_path))
    rows = tune(config)
    assert {(r["memorize_steps"], r["samples"]) for r in rows} >= {(0, 1), (0, 2), (1, 1), (1, 2)}
    raw = tmp_path / "raw" / "100.npz"
    assert raw.exists() and (tmp_path / "tuning.md").exists()
    with np.load(raw) as saved:
        assert saved["distances"].shape == (2, 16, 2) and saved["goal_tiles"].sum() == 2
    before = raw.stat().st_mtime_ns
    assert tune(config) == rows  # resumed from raw/, same table
    assert raw.stat().st_mtime_ns == before


@pytest.mark.parametrize("steps", ["200,100", "a,b", ""])
def test_tuning_rejects_bad_budgets(tmp_path, steps):
    with pytest.raises(ValueError, match="steps must be"):
        tune(TuneConfig(steps=steps, out_dir=str(tmp_path)))


def test_auc_is_the_mann_whitney_probability():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert np.isnan(auc(np.array([]), np.array([1.0])))
