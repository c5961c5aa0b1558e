"""The success-rate evaluation harness (come_rl.evaluation) on a toy worker: fan-out, summary, tables, GIFs, plot."""

import math

import numpy as np
import pytest

from come_rl.evaluation import nan_mean, play_agents, summarize_successes, write_success_results
from come_rl.fanout import FanoutSettings
from come_rl.results import read_rows, wilson_interval


class CoinWorker:
    """Succeeds on even tasks when ``name`` is 'even', never otherwise; one grey frame per episode as its GIF."""

    closed = []

    def __init__(self, name: str, level: int):
        self.name, self.level = name, level

    def run(self, task: int):
        success = self.name == "even" and task % 2 == 0
        row = {"agent": self.name, "episode": task, "success": success, "steps": float(task),
               "lpips": math.nan if task == 0 else 0.5}
        return row, [np.full((8, 8, 3), self.level, np.uint8)] * 2

    def close(self):
        CoinWorker.closed.append(self.name)


def test_play_agents_builds_each_worker_once_and_closes_it():
    CoinWorker.closed = []
    results = play_agents(CoinWorker, lambda name: (name, 100), ["even", "never"], range(4),
                          FanoutSettings(backend="local"), desc="toy", progress=False)
    assert [row["success"] for row, _ in results["even"]] == [True, False, True, False]
    assert not any(row["success"] for row, _ in results["never"])
    assert CoinWorker.closed == ["even", "never"]


def test_summary_tables_gifs_and_plot(tmp_path):
    results = play_agents(CoinWorker, lambda name: (name, 50), ["even", "never"], range(5),
                          FanoutSettings(backend="local"), desc="toy", progress=False)
    (tmp_path / "never_success.gif").write_bytes(b"stale")  # an earlier run's GIF must not pass for this run's
    summaries = write_success_results(results, tmp_path, "toy", mean_keys=("steps", "lpips"), plot_title="toy",
                                      chance=0.25)
    even = summaries[0]
    assert (even["agent"], even["episodes"], even["successes"]) == ("even", 5, 3)
    assert (even["ci95_low"], even["ci95_high"]) == pytest.approx(wilson_interval(3, 5))
    assert even["steps"] == pytest.approx(2.0) and even["lpips"] == pytest.approx(0.5)  # NaN of task 0 left out
    assert (tmp_path / "even_success.gif").is_file() and (tmp_path / "even_failure.gif").is_file()
    assert not (tmp_path / "never_success.gif").exists() and (tmp_path / "never_failure.gif").is_file()
    assert (tmp_path / "success.png").stat().st_size > 1000
    _, rows = read_rows(tmp_path / "episodes.csv")
    assert len(rows) == 10
    _, summary_rows = read_rows(tmp_path / "summary.csv")
    assert [r["successes"] for r in summary_rows] == ["3", "0"]


def test_summaries_refuse_an_agent_without_episodes_and_nan_mean_ignores_missing_values():
    with pytest.raises(ValueError, match="no episodes"):
        summarize_successes("empty", [])
    assert math.isnan(nan_mean([{"x": math.nan}, {}], "x"))
    assert nan_mean([{"x": 1.0}, {"x": 3.0}, {}], "x") == 2.0


def test_every_evaluation_record_round_trips_its_rows_and_arrays_and_a_damaged_one_names_the_fix(tmp_path):
    """One record format for every evaluation (come_rl.episode_records): rows through JSON (NaN kept), named arrays
    bit-exact; a record damaged after its atomic write is refused with its path and the fix."""
    from come_rl.episode_records import read_record, write_record

    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    rows = [{"composition": "base", "lpips_all": 0.25, "lpips_revisit": math.nan}, {"composition": "come", "x": 1}]
    write_record(tmp_path / "episode_0.npz", rows, real=frames, poses=np.array([[0.5, 1.5, 0.1]]))
    back, arrays = read_record(tmp_path / "episode_0.npz")
    assert back[0]["composition"] == "base" and back[0]["lpips_all"] == 0.25 and math.isnan(back[0]["lpips_revisit"])
    assert back[1] == rows[1] and sorted(arrays) == ["poses", "real"]
    assert np.array_equal(arrays["real"], frames) and arrays["real"].dtype == np.uint8
    (tmp_path / "episode_1.npz").write_bytes((tmp_path / "episode_0.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="episode_1.npz is unreadable.*delete it to rerun"):
        read_record(tmp_path / "episode_1.npz")


def test_one_resume_rule_for_every_evaluation_and_the_run_command(tmp_path, capsys):
    """check_records (the evaluations) and the run command's check_run_directory decide by compare_settings: equal
    settings resume; other settings with episode records are refused naming what changed; other settings without
    records (tables committed without them) start over; a damaged settings file names the fix."""
    import json

    from agents.runner import RUN_CONFIG_NAME, check_run_directory
    from come_rl.episode_records import RECORDS_DIR, check_records, write_record

    out = tmp_path / "eval"
    check_records(out, {"seed": 3, "episodes": 4, "lr": 1e-3}, ("episodes",))
    saved = out / RECORDS_DIR / "run_config.json"
    assert json.loads(saved.read_text()) == {"seed": 3, "lr": 1e-3}
    check_records(out, {"seed": 3, "episodes": 9, "lr": 1e-3}, ("episodes",))  # a free key changed: resumes
    check_records(out, {"seed": 4, "episodes": 4, "lr": 1e-3}, ("episodes",))  # no record yet: starts over
    assert json.loads(saved.read_text())["seed"] == 4 and "no episode records" in capsys.readouterr().out
    write_record(out / RECORDS_DIR / "episode_0.npz", {"x": 1.0})
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.001 -> 0\.002\); use another out_dir"):
        check_records(out, {"seed": 4, "episodes": 4, "lr": 2e-3}, ("episodes",))
    assert json.loads(saved.read_text())["lr"] == 1e-3, "the refused run changed nothing"

    run_dir = tmp_path / "run"
    config = {"planner": {"population": 16}, "run": {"seed": 0}}
    assert check_run_directory(run_dir, config) is False  # fresh
    run_dir.mkdir()
    (run_dir / RUN_CONFIG_NAME).write_text(json.dumps({"format": 1, "config": config}))
    assert check_run_directory(run_dir, config) is True
    other = {"planner": {"population": 8}, "run": {"seed": 0}}
    capsys.readouterr()
    assert check_run_directory(run_dir, other) is False  # tables without records: starts over
    assert check_run_directory(run_dir, other) is False  # checked again where the run opens it: said once
    assert capsys.readouterr().out.count("holds tables of other settings") == 1
    (run_dir / "episode_records").mkdir()
    (run_dir / "episode_records" / "episode_000000.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"planner\.population: 16 -> 8\); use another run\.out_dir"):
        check_run_directory(run_dir, other)
    (run_dir / RUN_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a settings file.*delete"):
        check_run_directory(run_dir, config)
