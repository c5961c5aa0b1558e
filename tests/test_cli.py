"""Smoke tests of `python -m come_rl.run` as a user runs it (subprocess, tiny budget)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

TINY = [
    "env=point_mass", "model=point_mass", "agent=cem", "run.episodes=2", "run.threads=1",
    "planner.population=16", "planner.elites=4", "planner.iterations=1", "agent.horizon=4",
    "env.task.goal_offset=4", "env.task.max_steps=4", "run.progress=false",
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "come_rl.run", *args], check=False, cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_cli_point_mass_writes_results(tmp_path: Path) -> None:
    out_dir = tmp_path / "results" / "smoke"
    result = run_cli([*TINY, f"run.out_dir={out_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reached the goal (within 0.1) in " in result.stdout and "/2 episodes" in result.stdout
    for name in ("steps.csv", "steps.md", "episodes.csv", "episodes.md", "summary.csv", "summary.md",
                 "distance.png", "rollout.gif"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    with open(out_dir / "episodes.csv") as handle:
        episodes = list(csv.DictReader(handle))
    assert len(episodes) == 2
    for row in episodes:
        for key in ("final_distance", "start_distance", "ate", "rpe", "lpips_to_goal"):
            value = float(row[key])
            assert math.isfinite(value) and value >= 0.0, (key, value)
        assert int(row["steps"]) == 4
        # a point mass moves at most 0.2 per axis per step: 4 steps change the distance by <= 4 * 0.2 * sqrt(2)
        assert abs(float(row["final_distance"]) - float(row["start_distance"])) <= 4 * 0.2 * math.sqrt(2) + 1e-6
    with open(out_dir / "steps.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 4
    assert (out_dir / "distance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "rollout.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    # Hydra's own output goes under results/runs, not outputs/ in the working directory
    assert not (tmp_path / "outputs").exists()
    assert any((tmp_path / "results" / "runs").rglob("config.yaml"))


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    unknown = run_cli(["agent=does_not_exist"], tmp_path)
    assert unknown.returncode != 0
    assert "agent" in unknown.stderr and "does_not_exist" in unknown.stderr
    assert "cem" in unknown.stderr, "Hydra lists the available options"



def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import come_rl.run

    with initialize_config_dir(config_dir=str(Path(come_rl.run.__file__).parent / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "run.name=test"])


def test_bad_settings_fail_before_any_work(tmp_path: Path) -> None:
    import pytest

    from come_rl.run import run

    cases = [
        ([*TINY, "planner.population=2", "planner.elites=4"], ValueError, r"elites \(4\) must not exceed population \(2\)"),
        ([*TINY, "agent.horizon=0"], ValueError, "agent.horizon must be >= 1"),
        (["env=memory_maze", "model.checkpoint=/nonexistent/model"], FileNotFoundError,
         "model.checkpoint='/nonexistent/model' does not exist"),
        ([*TINY, "planner._target_=no_such_module.Planner"], ValueError, "could not be imported"),
        ([*TINY, "+env.evaluation=tour"], ValueError, r"env.evaluation='tour' is not an evaluation of come_rl.run"),
        (["agent=cem", "env=memory_maze", "planner.repeats=2"], ValueError,
         "set agent.objective.repeats instead, or agent.objective.share_prefixes=false"),
        (["env=memory_cards_find", "model=memory_cards", "env.task.share_prefixes=yes"], ValueError,
         "env.task.share_prefixes must be true or false"),
    ]
    for overrides, error, match in cases:
        cfg = compose_config([*overrides, f"run.out_dir={tmp_path / 'never'}"])
        with pytest.raises(error, match=match):
            run(cfg)
    assert not (tmp_path / "never").exists()


def test_device_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    import pytest
    import torch

    from come_rl import devices
    from come_rl.run import device_settings, resume_config, run

    cfg = compose_config(TINY)
    assert (cfg.device, cfg.precision, cfg.compile) == ("auto", "auto", False)
    assert device_settings(compose_config([*TINY, "device=cpu"])) == {"device": torch.device("cpu"),
                                                                      "precision": "fp32", "compile": False}
    # the CPU in fp32 is recorded as nothing (run directories of before devices resume); anything else is recorded
    assert "device" not in resume_config(compose_config([*TINY, "device=cpu"]))
    assert resume_config(compose_config([*TINY, "device=cpu", "compile=true"]))["device"] == {
        "device": "cpu", "precision": "fp32", "compile": True}
    cases = [("device=tpu", "unknown device 'tpu'"), ("precision=fp16", "unknown precision 'fp16'"),
             ("compile=maybe", "compile must be true or false")]
    if not torch.cuda.is_available():
        cases += [("device=cuda", r"device='cuda' but torch.cuda.is_available\(\) is False; use device=cpu or auto")]
        if not devices.cpu_supports_bf16():
            cases += [("precision=bf16", "precision=bf16 on the CPU needs oneDNN bfloat16 kernels")]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            run(compose_config([*TINY, override, f"run.out_dir={tmp_path / 'never'}"]))
    assert not (tmp_path / "never").exists()


def test_cli_help_lists_groups(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    for group in ("env:", "agent:", "planner:", "model:", "memory_maze", "point_mass", "mppi", "nwm"):
        assert group in result.stdout, group


def test_bare_checkpoint_names_resolve_in_the_package(tmp_path: Path, monkeypatch) -> None:
    import pytest

    import come_rl.run as run_module

    packaged = tmp_path / "checkpoints"
    (packaged / "memory_maze").mkdir(parents=True)
    monkeypatch.setattr(run_module, "packaged_checkpoints_dir", lambda: packaged)
    assert run_module.resolve_checkpoint("memory_maze") == packaged / "memory_maze"
    existing = tmp_path / "mine"
    existing.mkdir()
    assert run_module.resolve_checkpoint(str(existing)) == existing
    with pytest.raises(FileNotFoundError, match=r"model.checkpoint='memory_cards' does not exist.*memory_maze"):
        run_module.resolve_checkpoint("memory_cards")
    cfg = compose_config(["env=memory_maze"])
    assert cfg.model.checkpoint == "memory_maze" and list(cfg.model.experts) == ["base", "ltm"]
    assert cfg.env.task.preload_memory and cfg.model.sampler_steps == 1


def test_memory_cards_with_a_come_model_preloads_memory(tmp_path: Path) -> None:
    from test_nwm_protocol import TINY_CARDS, save_tiny_world_model

    from come_rl.run import run

    checkpoint = save_tiny_world_model(tmp_path / "wm", TINY_CARDS, {"kind": "discrete", "dim": 5})
    rows = {}
    for experts in ("[base,ltm]", "[base]"):
        out_dir = tmp_path / experts.strip("[]").replace(",", "_")
        cfg = compose_config([
            "env=memory_cards", "agent=cem", f"model.checkpoint={checkpoint}", f"model.experts={experts}",
            "model.sampler_steps=1", "+model.memorize={batch_size: 2}", "env.task.memorize_steps=2",
            "env.task.max_steps=2", "agent.horizon=2", "planner.population=4", "planner.elites=2",
            "run.episodes=1", "run.lpips_metric=false", "run.gif_episodes=0", "run.progress=false", "run.threads=1",
            "agent.objective._target_=planners.objectives.PixelGoalObjective", f"run.out_dir={out_dir}"])
        run(cfg)
        with open(out_dir / "episodes.csv") as handle:
            rows[experts] = list(csv.DictReader(handle))[0]
    come, ablation = rows["[base,ltm]"], rows["[base]"]
    assert int(come["steps"]) == 2 and int(come["preload/steps"]) == 2 and int(come["preload/frames"]) == 7
    assert math.isfinite(float(come["preload/loss_last"]))
    # without the LTM nothing is memorized (the world model says so), the reference is still observed
    assert int(ablation["preload/steps"]) == 0 and int(ablation["preload/frames"]) == 7


def test_find_the_object_through_the_run_command(tmp_path: Path) -> None:
    out_dir = tmp_path / "find"
    common = ["env=memory_cards_find", "model=memory_cards", "run.episodes=1", "run.threads=1", "run.progress=false",
              "model.sampler_steps=1", "env.task.memorize_steps=1", f"run.out_dir={out_dir}"]
    result = run_cli([*common, "env.task.samples=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out_dir / "summary.md").read_text()
    assert "2 imagined samples per tile" in summary and "1 memorization steps" in summary
    # every finished episode is recorded: the same command with one episode more plays only that one
    record = out_dir / "episode_records" / "base+ltm_0.npz"
    assert record.is_file()
    first = record.stat().st_mtime_ns
    more = run_cli([*common[:2], "run.episodes=2", *common[3:], "env.task.samples=2"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert record.stat().st_mtime_ns == first and (out_dir / "episode_records" / "base+ltm_1.npz").is_file()
    assert "| base+ltm | 2 |" in (out_dir / "summary.md").read_text()
    other = run_cli([*common, "env.task.samples=3"], tmp_path)  # another setting into the same directory: refused
    assert other.returncode != 0 and "other settings" in other.stderr + other.stdout
    bad = run_cli([*common, "env.task.samples=0"], tmp_path)
    assert bad.returncode != 0 and "env.task.samples" in bad.stderr + bad.stdout


def test_ray_backend_is_refused_for_runs_that_play_in_one_process(tmp_path: Path) -> None:
    """run.backend=ray fans out goal-reaching episodes; a find-the-object or RECON run says which command fans it out."""
    import pytest

    from come_rl.run import run

    for overrides, command in ((["env=memory_cards_find", "model=memory_cards"], "agents.find_object"),
                               (["env=recon", "agent=nwm", f"data_dir={tmp_path}"], "agents.nwm_protocol")):
        cfg = compose_config([*overrides, "run.backend=ray", "run.name=x", f"run.out_dir={tmp_path / 'out'}"])
        with pytest.raises(ValueError, match=f"fans out goal-reaching episodes only.*{command}"):
            run(cfg)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_run_settings_are_typed_by_their_schema() -> None:
    import pytest
    from omegaconf import OmegaConf

    from come_rl.run import RunSettings

    cfg = compose_config(TINY)
    assert OmegaConf.get_type(cfg.run) is RunSettings and cfg.run.episodes == 2
    for override, reason in [("run.episodes=abc", "'abc' of type 'str' could not be converted to Integer"),
                             ("run.lpips_metric=perhaps", "not a valid bool"),
                             ("run.episods=3", "Key 'episods' not in 'RunSettings'")]:
        with pytest.raises(Exception) as error:
            compose_config([*TINY, override])
        assert reason in f"{error.value} {error.value.__cause__}", override


def test_a_model_or_agent_config_without_its_target_gets_a_clear_error() -> None:
    import pytest
    from omegaconf import OmegaConf

    from come_rl.run import build_agent, build_world_model

    with pytest.raises(ValueError, match="model.loader is now model._target_"):
        build_world_model(OmegaConf.create({"loader": "come_rl.world_model.WorldModel.load", "checkpoint": "x"}))
    with pytest.raises(ValueError, match="the model config needs a _target_"):
        build_world_model(OmegaConf.create({"checkpoint": "memory_cards"}))
    with pytest.raises(ValueError, match="the agent config has no _target_"):
        build_agent(OmegaConf.create({"horizon": 4}), world_model=None, planner=None)


def test_the_agents_share_the_cem_settings_and_differ_in_their_planner() -> None:
    from omegaconf import OmegaConf

    cem = compose_config(["agent=cem"])
    for name, planner in (("mppi", "planners.mppi.MPPIPlanner"), ("random_shooting", "planners.random_shooting.RandomShootingPlanner")):
        cfg = compose_config([f"agent={name}"])
        assert OmegaConf.to_container(cfg.agent) == OmegaConf.to_container(cem.agent)
        assert cfg.planner._target_ == planner != cem.planner._target_
    # an override of agent=mppi changes only that run's agent
    assert compose_config(["agent=mppi", "agent.horizon=6"]).agent.horizon == 6 and cem.agent.horizon == 4
