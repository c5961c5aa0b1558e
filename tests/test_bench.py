"""The benchmarks write their tables (they time nothing a test asserts on: a benchmark is not a timed test)."""

import csv

import pytest

from come_rl.bench.threads import ThreadsBenchConfig, bench_threads


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


def test_the_world_model_benchmark_matches_the_naive_reference(tmp_path):
    """Every composition imagines the same frames (to 1e-5) as the naive reference (context prepared at every step,
    one network call per expert and condition), with fewer network calls; the memorization rows are there."""
    from come_rl.bench.world_model import WorldModelBenchConfig, bench_world_model

    rows = bench_world_model(WorldModelBenchConfig(checkpoint="come_rl/checkpoints/memory_cards", batch=2, horizon=1,
                                                   steps=2, repeats=1, threads=1, memorize_steps=1,
                                                   out_dir=str(tmp_path)))
    imagined = [row for row in rows if not row["composition"].startswith("memorize")]
    names = [row["composition"] for row in imagined]
    assert names[:3] == ["base", "base+ltm", "base+stm"]
    assert [name.replace(" (shipped)", "") for name in names[3:]] == [
        "CoME, STM/SLTM alpha 2", "CoME, STM/SLTM alpha 1", "CoME split: LTM t>=0.8, STM/SLTM alpha 1 below"]
    assert sum(name.endswith("(shipped)") for name in names) == 1  # the checkpoint's own CoME is one of the three
    # split gates: the LTM's pair at t = 1, the STM and SLTM at t = 0.5 (base skipped): 2 calls at each of the 2 steps
    assert imagined[5]["network_calls_per_denoising_step"] == 2.0
    assert imagined[4]["network_calls_per_denoising_step"] == 3.0  # 4 calls at the LTM's step, 2 below
    for row in imagined:
        assert row["max_abs_diff_to_naive"] < 1e-5, row
        assert row["naive_network_calls_per_step"] >= row["network_calls_per_denoising_step"] > 0
    come, cheaper = imagined[3], imagined[4]
    assert come["naive_network_calls_per_step"] > come["network_calls_per_denoising_step"]
    assert cheaper["naive_network_calls_per_step"] < come["naive_network_calls_per_step"]  # no unconditional passes
    assert any(row["composition"].startswith("memorize, shipped recipe") for row in rows)
    assert (tmp_path / "world_model.md").is_file()


def test_the_memorization_benchmark_times_each_recipe_against_both_sampling_steps(tmp_path):
    """Each recipe gets a row with its trained-parameter count and its step against base + LTM's and CoME's sampling
    steps at its own batch; CoME's sampling step runs more network calls than base + LTM's (what its extra time is)."""
    from come_rl.bench.memorize import DECODER, MemorizeBenchConfig, bench_memorize

    rows = bench_memorize(MemorizeBenchConfig(recipes={"every weight": {"batch_size": 4},
                                                       "decoder": {"batch_size": 4, "full_parameters": DECODER}},
                                              steps=1, sampler_steps=2, rounds=1, out_dir=str(tmp_path)))
    assert [row["recipe"] for row in rows] == ["every weight", "decoder"]
    every, decoder = rows
    assert every["trained_parameters_M"] > decoder["trained_parameters_M"] > 0.5
    for row in rows:
        assert row["batch"] == 4 and row["memorize_ms_per_step"] > 0
        assert row["x_base+ltm_sampling_step"] == pytest.approx(row["memorize_ms_per_step"] / row["sampling_step_ms_base+ltm"])
        assert row["sampling_step_ms_CoME"] > 0 and row["sampling_step_ms_base+ltm"] > 0  # times: reported, not tested
        assert row["network_calls_per_step_CoME"] > row["network_calls_per_step_base+ltm"] >= 1
    assert "bench memorize" in (tmp_path / "memorize.md").read_text()
    with pytest.raises(ValueError, match="recipes"):
        MemorizeBenchConfig(recipes={"x": 3})


def test_the_long_episode_benchmark_streams_memorization_and_records_memory(tmp_path):
    from come_rl.bench.long_episode import LongEpisodeBenchConfig, bench_long_episode

    rows = bench_long_episode(LongEpisodeBenchConfig(steps=20, memorize_every=10, memorize_steps=1, threads=1,
                                                     out_dir=str(tmp_path)))
    assert [row["env_step"] for row in rows] == [10, 20]
    assert [row["frames_in_memory"] for row in rows] == [11, 21]  # the first frame and one per step
    assert all(row["memorize_seconds"] > 0 and row["rss_MB"] > 0 for row in rows)
    assert rows[0]["peak_growth_since_first"] == 0.0 and rows[1]["peak_growth_since_first"] >= 0.0
    assert (tmp_path / "long_episode.png").stat().st_size > 0 and "peak RSS" in (tmp_path / "long_episode.md").read_text()
    with pytest.raises(ValueError, match="memorize_every"):
        bench_long_episode(LongEpisodeBenchConfig(steps=5, memorize_every=10, out_dir=str(tmp_path)))


def test_one_benchmark_cli_runs_every_subcommand_by_key_value(tmp_path, capsys):
    from come_rl.bench import main

    main(["dit", 'names=["dit_cpu"]', "batch_sizes=[1]", "repeats=1", f"out={tmp_path / 'dit.csv'}"])
    assert (tmp_path / "dit.csv").is_file() and (tmp_path / "dit.md").is_file()
    main(["planners", "decisions=1", "horizon=1", f"out={tmp_path / 'planners.csv'}"])
    assert "Planning time per decision" in (tmp_path / "planners.md").read_text()
    with pytest.raises(SystemExit, match="usage: python -m come_rl.bench"):
        main(["nope"])
    with pytest.raises(SystemExit, match="unknown key"):
        main(["planners", "decisons=1"])


def test_the_decision_benchmark_splits_a_default_decision_and_compares_precisions(tmp_path):
    """The default CEM decision's time splits into imagination, LPIPS and the planner; fp32 is its own reference, and
    bf16 (where the CPU runs it) plans from frames close to fp32's. (compile is left to the benchmark: inductor needs a
    C compiler and minutes.)"""
    from come_rl import devices
    from come_rl.bench.decision import DecisionBenchConfig, bench_decision

    rows = bench_decision(DecisionBenchConfig(population=4, elites=2, horizon=2, steps=1, decisions=1,
                                              variants=["fp32", "bf16"], out_dir=str(tmp_path)))
    assert [row["variant"] for row in rows] == (["fp32", "bf16"] if devices.cpu_supports_bf16() else ["fp32"])
    fp32 = rows[0]
    assert fp32["frames_mean_abs_diff_to_fp32"] == 0.0 and fp32["plans_equal_to_fp32"] == 1.0
    for row in rows:
        parts = row["median_imagine_s"] + row["median_lpips_s"] + row["median_planner_s"]
        assert row["median_imagine_s"] > 0 and row["median_lpips_s"] > 0
        assert abs(parts - row["median_decision_s"]) < 1e-6
        assert 0 < row["share_outside_world_model"] < 1
    if len(rows) == 2:
        assert 0 < rows[1]["frames_mean_abs_diff_to_fp32"] < 0.05
    assert "One CEM decision of the default run" in (tmp_path / "decision.md").read_text()
    with pytest.raises(ValueError, match="variants must start with fp32"):
        bench_decision(DecisionBenchConfig(variants=["bf16", "fp16"], out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="is not a come_rl checkout .* git worktree add"):
        bench_decision(DecisionBenchConfig(reference_tree=str(tmp_path), out_dir=str(tmp_path)))


def test_the_decision_steps_benchmark_times_each_step_count_in_one_run(tmp_path):
    from come_rl.bench.decision import DecisionStepsBenchConfig, bench_decision_steps

    rows = bench_decision_steps(DecisionStepsBenchConfig(steps="1,2", population=8, elites=2, horizon=2, decisions=1,
                                                         share_prefixes="false,true", out_dir=str(tmp_path)))
    assert [(row["denoising_steps"], row["share_prefixes"]) for row in rows] == [(1, False), (1, True), (2, False),
                                                                                 (2, True)]
    assert rows[0]["decision_x_1_steps"] == 1.0 and rows[1]["median_decision_s"] > 0
    # 8 candidates x 2 frames x one network call per denoising step (the maze rule runs one pass where the LTM takes
    # part: the base's coefficient is 0 there)
    assert rows[0]["network_rows"] == 8 * 2 * 1 and rows[2]["network_rows"] == 8 * 2 * 2
    assert rows[1]["network_rows"] < rows[0]["network_rows"]  # 8 candidates over 6 actions share a first action
    with pytest.raises(ValueError, match="list false and/or true"):
        bench_decision_steps(DecisionStepsBenchConfig(share_prefixes="yes", out_dir=str(tmp_path)))
    assert "by denoising steps" in (tmp_path / "decision_steps.md").read_text()
    with pytest.raises(ValueError, match="comma-separated integers"):
        bench_decision_steps(DecisionStepsBenchConfig(steps="1,x", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="integers >= 1"):
        bench_decision_steps(DecisionStepsBenchConfig(steps="0", out_dir=str(tmp_path)))


def test_the_place_decision_benchmark_plans_the_same_with_the_last_step_posed_only(tmp_path):
    from come_rl.bench.decision import PlaceDecisionBenchConfig, bench_place_decision

    rows = bench_place_decision(PlaceDecisionBenchConfig(population=6, elites=2, horizon=2, decisions=1,
                                                         out_dir=str(tmp_path)))
    assert [row["variant"] for row in rows] == ["last frame sampled", "last step's pose only"]
    assert all(row["plans_equal"] == 1.0 and row["median_decision_s"] > 0 for row in rows)
    # horizon 2: the pose-only variant runs the first step's distinct actions alone (at most 6 rows)
    assert rows[1]["network_rows"] <= 6 < rows[0]["network_rows"]
    assert "with its place objective" in (tmp_path / "place_decision.md").read_text()
    with pytest.raises(ValueError, match="has no odometry head"):
        bench_place_decision(PlaceDecisionBenchConfig(checkpoint="memory_cards", decisions=1, out_dir=str(tmp_path)))


def test_the_memory_format_benchmark_times_both_layouts_on_the_same_inputs(tmp_path):
    from come_rl import devices
    from come_rl.bench.memory_format import MemoryFormatBenchConfig, bench_memory_format

    rows = bench_memory_format(MemoryFormatBenchConfig(sample_batch=2, train_batch=2, memorize_steps=1, rounds=1,
                                                       out_dir=str(tmp_path)))
    assert [row["item"] for row in rows] == ["sampling call", "training step", "memorization step"]
    assert all(row["as_built_s"] > 0 and row["channels_last_s"] > 0 for row in rows)
    assert rows[0]["max_abs_diff_of_eps"] < 1e-3  # the same predictions up to float rounding
    assert devices.CHANNELS_LAST_ON_CPU  # the benchmark's switch is put back
    assert "channels-last" in (tmp_path / "memory_format.md").read_text()
    with pytest.raises(ValueError, match="must be >= 1"):
        MemoryFormatBenchConfig(rounds=0)
    with pytest.raises(ValueError, match="pass a Memory Maze checkpoint"):
        bench_memory_format(MemoryFormatBenchConfig(checkpoint="memory_cards", out_dir=str(tmp_path)))


def test_the_find_decision_steps_benchmark_times_the_agents_decision_at_each_step_count(tmp_path):
    from come_rl.bench.decision import FindDecisionStepsBenchConfig, bench_find_decision_steps

    from come_rl import devices

    precisions = "fp32,bf16" if devices.cpu_supports_bf16() else "fp32"
    rows = bench_find_decision_steps(FindDecisionStepsBenchConfig(agent="base", steps="1,2", samples=1, decisions=1,
                                                                  precisions=precisions, share_prefixes="false,true",
                                                                  out_dir=str(tmp_path)))
    assert [(row["precision"], row["denoising_steps"], row["share_prefixes"]) for row in rows] == [
        (precision, k, share) for precision in precisions.split(",") for k in (1, 2) for share in (False, True)]
    assert rows[1]["network_rows"] < 0.6 * rows[0]["network_rows"]  # the walks to the 16 tiles form a tree
    assert rows[0]["decision_x_fp32_1_steps"] == 1.0  # the reference cell
    assert all(row["median_decision_s"] > 0 for row in rows)
    assert "precisions alternated" in (tmp_path / "find_decision_steps.md").read_text()
    with pytest.raises(ValueError, match="fp32 and/or bf16"):
        bench_find_decision_steps(FindDecisionStepsBenchConfig(precisions="fp16", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="choose from"):
        bench_find_decision_steps(FindDecisionStepsBenchConfig(agent="oracle", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="integers >= 1"):
        bench_find_decision_steps(FindDecisionStepsBenchConfig(steps="0", out_dir=str(tmp_path)))


def test_the_world_model_benchmark_refuses_a_maze_checkpoint_naming_the_fix():
    from come_rl.bench.common import filled_cards_model

    with pytest.raises(ValueError, match="pass a Memory Cards checkpoint"):
        filled_cards_model("come_rl/checkpoints/memory_maze", steps=2, experts=["base"])
