"""Crash safety: kill -9 at a random moment, run the same command again, get what an uninterrupted run writes.

Each test starts a real subprocess of a command (``come_rl.run``, ``come_rl.train``, ``come_rl.collect``) with a budget
of seconds, waits until it has finished some unit of work (an episode record, a checkpoint, a shard in the manifest),
kills it with SIGKILL after a random further delay, runs the same command to the end and compares its final table with
an uninterrupted run's (outside timing columns). The delay is drawn from a generator seeded by the test's name and
``COME_RL_CRASH_SEED`` (default 0; set it to draw other moments) and shown with the seed in every assertion message,
so a failure names the moment that broke it and the seed that draws that delay again (the work done by then still
depends on the machine's speed, which the window scales with). The command runs in a directory of its own with a relative output path, so
that paths written into the outputs (``out=`` in a manifest or a checkpoint's config) are the same for both runs.

How each test was checked to fail (each break made by hand, run, seen to fail, undone):
- run: running every episode again instead of skipping the recorded ones fails the "resumed from episode k" line and
  the untouched earlier records; running without the per-episode seeds (``seeds=None``) makes ``steps.csv`` differ
  from the uninterrupted run's. The check for stray temporary files caught a real miss (a table's staging copy's own
  temporary file was not cleaned up).
- train: without ``trim_train_log`` the rows logged between the last checkpoint and the kill appear twice; without the
  online pool's state restored from the checkpoint the losses after the resume differ.
- collect: recollecting the shards the manifest already lists rewrites files finished before the kill (new inode).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_reproducibility import TIMING_COLUMNS, read_without_timing

KILLED = -signal.SIGKILL


def command(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def run_to_end(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command(module, args), cwd=cwd, env=environment(), capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, f"{module} {args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def kill_at_random_moment(module: str, args: list[str], cwd: Path, progressed: Callable[[], bool],
                          nearly_done: Callable[[], bool], window: float) -> str:
    """Start the command, wait until ``progressed()``, then SIGKILL it after a delay drawn uniformly from
    [0, ``window``] seconds, or as soon as ``nearly_done()``, so that the kill lands before the command's own end.

    ``window``: how long the uninterrupted run worked after the same progress, read from its outputs, so that the
    draw spans the work on a fast or a slow machine. Returns a description of the moment for assertion messages.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "killed_run.log", "w") as log:
        process = subprocess.Popen(command(module, args), cwd=cwd, env=environment(), stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while not progressed():
            assert process.poll() is None, f"{module} ended ({process.returncode}) before any progress: " + \
                (cwd / "killed_run.log").read_text()[-3000:]
            assert time.monotonic() - started < 480, f"{module} made no progress in 480 s"
            time.sleep(0.01)
        seed = f"{os.environ.get('COME_RL_CRASH_SEED', '0')}:{module}"
        delay = random.Random(seed).uniform(0.0, window)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not nearly_done() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        moment = (f"killed {time.monotonic() - started:.2f} s after start, {delay:.2f} s drawn after the first progress "
                  f"(delay seed {seed!r}: COME_RL_CRASH_SEED={os.environ.get('COME_RL_CRASH_SEED', '0')})")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == KILLED, f"{module} ended by itself before the kill ({process.returncode}); {moment}"
    return moment


def identity(path: Path) -> tuple[int, int]:
    """(inode, mtime): an atomic rewrite (temporary file + rename) changes the inode even within one mtime tick."""
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


# ------------------------------------------------------------------------------------------ come_rl.run
# The README's main command on Memory Cards with a tiny random-init world model (base + LoRA long-term memory): the
# shipped Memory Maze model costs 7 s of start-up per process (model, MuJoCo) and 3.5 s per episode, three times the
# budget of this test; the runner, the seeding and the memorization are the same. An episode: 20 steps, 4 candidates,
# one denoising step, memorization in the preload (2 steps) and in the stream (every 4 steps), the GIF's imagine on.
EPISODES, STEPS, MEMORIZE_EVERY = 5, 20, 4
RUN_ARGS = [
    "env=memory_cards", "agent=cem", f"run.episodes={EPISODES}", "run.threads=1", "run.progress=false",
    "run.gif_episodes=1", "planner.population=4", "planner.elites=2", "agent.horizon=2", "agent.replan_every=1",
    "env.task.goal_offset=6", f"env.task.max_steps={STEPS}", "env.task.memorize_steps=2", "model.sampler_steps=1",
    "+model.memorize={batch_size: 2}", f"memory.memorize_every={MEMORIZE_EVERY}", "memory.memorize_steps=1",
    "run.out_dir=out",
]


@pytest.fixture(scope="module")
def tiny_cards_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_nwm_protocol import TINY_CARDS, save_tiny_world_model

    return save_tiny_world_model(tmp_path_factory.mktemp("wm") / "cards", TINY_CARDS, {"kind": "discrete", "dim": 5})


def test_killed_evaluation_resumes_at_the_first_unfinished_episode(tmp_path: Path, tiny_cards_model: Path) -> None:
    args = [*RUN_ARGS, f"model.checkpoint={tiny_cards_model}"]
    reference, resumed = tmp_path / "reference" / "out", tmp_path / "resumed" / "out"
    run_to_end("come_rl.run", args, reference.parent)
    done = sorted((reference / "episode_records").glob("episode_*.npz"))
    window = 1.25 * (done[-1].stat().st_mtime - done[0].stat().st_mtime)  # episodes 1.., and then the tables
    records = resumed / "episode_records"

    def record_count() -> int:
        return len(list(records.glob("episode_*.npz"))) if records.is_dir() else 0

    # the kill lands in a later episode, or after the last record while the tables, plot and GIF are written
    moment = kill_at_random_moment("come_rl.run", args, resumed.parent, progressed=lambda: record_count() >= 1,
                                   nearly_done=lambda: record_count() >= EPISODES, window=window)
    finished = sorted(records.glob("episode_*.npz"))
    assert 1 <= len(finished) <= EPISODES, moment
    before = {path.name: identity(path) for path in finished}
    recorded = {int(path.stem.split("_")[1]) for path in finished}
    for name in ("episodes.csv", "steps.csv"):  # what the killed run left: whole recorded episodes, each once (each
        if not (resumed / name).is_file():      # table is replaced as a whole, one after the other)
            continue
        with open(resumed / name, newline="") as handle:
            rows = [(int(row["episode"]), int(row.get("step", 0))) for row in csv.DictReader(handle)]
        assert rows == sorted(set(rows)) and {episode for episode, _ in rows} <= recorded, f"{name}: {rows}; {moment}"
        for episode in {episode for episode, _ in rows}:
            steps = [step for index, step in rows if index == episode]
            assert steps == list(range(len(steps))), f"{name}: episode {episode} is torn; {moment}"

    result = run_to_end("come_rl.run", args, resumed.parent)
    line = f"resumed {resumed.resolve()} from episode {len(finished)}: {len(finished)} of {EPISODES} episodes"
    print(f"{moment}; {line}")  # shown with -s, or on failure
    assert line in result.stdout, f"{moment}; expected {line!r} in:\n{result.stdout[-3000:]}"
    assert {path.name: identity(path) for path in finished} == before, f"finished episodes were run again; {moment}"
    for name in TIMING_COLUMNS:
        header_a, rows_a = read_without_timing(reference / name)
        header_b, rows_b = read_without_timing(resumed / name)
        assert header_a == header_b, f"{name}; {moment}"
        assert rows_a == rows_b, f"{name} differs from the uninterrupted run's; {moment}"
    _, steps = read_without_timing(resumed / "steps.csv")
    keys = [(row["episode"], row["step"]) for row in steps]
    assert len(keys) == len(set(keys)) == EPISODES * STEPS, f"missing or duplicated step rows; {moment}"
    _, episodes = read_without_timing(resumed / "episodes.csv")
    assert [int(row["episode"]) for row in episodes] == list(range(EPISODES)), moment
    # the budget exercised what it is meant to: memorization in the preload and in the stream
    memorize_calls = STEPS // MEMORIZE_EVERY
    assert all(int(row["preload/steps"]) == 2 and int(row["memorize_calls"]) == memorize_calls for row in episodes)
    assert (resumed / "rollout.gif").read_bytes() == (reference / "rollout.gif").read_bytes(), moment
    assert not [path.name for path in resumed.rglob("*") if path.name.endswith((".tmp", ".staging", ".tmp.png"))]


def test_a_rerun_with_another_configuration_is_refused_before_any_work(tmp_path: Path) -> None:
    """In process, no episode run: the check comes before the env and the world model are built."""
    from test_cli import TINY, compose_config

    from agents.runner import RUN_CONFIG_NAME, check_run_directory
    from come_rl.run import resume_config, run

    out = tmp_path / "out"
    cfg = compose_config([*TINY, f"run.out_dir={out}"])
    recorded = resume_config(cfg)
    assert "name" not in recorded["run"] and recorded["planner"]["seed"] == cfg.run.seed  # resolved
    assert check_run_directory(out, recorded) is False  # nothing there yet: a fresh start
    recorded["planner"]["population"] = 8
    out.mkdir()
    (out / RUN_CONFIG_NAME).write_text(json.dumps({"format": 1, "config": recorded}))
    (out / "episodes.csv").write_text("episode\n0\n")
    (out / "episode_records").mkdir()
    (out / "episode_records" / "episode_000000.npz").write_bytes(b"a finished episode")
    with pytest.raises(ValueError, match=r"planner\.population: 8 -> 16.*another run\.out_dir, or delete"):
        run(cfg)
    assert sorted(path.name for path in out.iterdir()) == ["episode_records", "episodes.csv", RUN_CONFIG_NAME], \
        "the old run is kept"
    # tables of another configuration without records (results committed without their records, or run on another
    # device): nothing to resume or mix with, so the run starts there afresh
    (out / "episode_records" / "episode_000000.npz").unlink()
    assert check_run_directory(out, resume_config(cfg)) is False
    # what may change on a resume: the run's name, its progress bar, and more episodes
    more = resume_config(compose_config([*TINY, f"run.out_dir={out}", "run.episodes=5", "run.progress=true"]))
    assert more == resume_config(cfg)


# ------------------------------------------------------------------------------------------ come_rl.train
TRAIN_STEPS = 60
TRAIN_ARGS = ["model=unet_cards", "out=ckpt", "threads=1", "batch_size=4", "online_episodes=16",
              'backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32}', f"steps={TRAIN_STEPS}", "log_every=1",
              "checkpoint_seconds=0.5"]


def read_train_log(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as handle:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(handle)]  # "seconds" is wall-clock


def test_killed_training_resumes_with_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    from come_rl.world_model import WorldModel

    reference, resumed = tmp_path / "reference" / "ckpt", tmp_path / "resumed" / "ckpt"
    run_to_end("come_rl.train", TRAIN_ARGS, reference.parent)
    with open(reference / "train_log.csv", newline="") as handle:
        window = float(list(csv.DictReader(handle))[-1]["seconds"])  # training time, start-up excluded

    def logged_steps() -> int:
        log = resumed / "train_log.csv"
        return max(len(log.read_text().splitlines()) - 1, 0) if log.is_file() else 0

    # checkpoints every 0.5 s and a log row every step: the kill usually leaves rows the resumed run logs again
    moment = kill_at_random_moment("come_rl.train", TRAIN_ARGS, resumed.parent,
                                   progressed=lambda: (resumed / "base_train_state.pt").is_file(),
                                   nearly_done=lambda: logged_steps() >= TRAIN_STEPS - 8, window=window)
    result = run_to_end("come_rl.train", TRAIN_ARGS, resumed.parent)
    resumed_from = [line for line in result.stdout.splitlines() if "resumed base from step" in line]
    assert resumed_from, f"the rerun did not resume; {moment}\n{result.stdout[-2000:]}"
    step = int(resumed_from[0].split("resumed base from step ")[1].split()[0])
    print(f"{moment}; resumed from step {step}")  # shown with -s, or on failure
    assert 0 < step < TRAIN_STEPS, moment
    log = read_train_log(resumed / "train_log.csv")
    assert [row[0] for row in log] == list(range(1, TRAIN_STEPS + 1)), f"missing or duplicated log rows; {moment}"
    assert log == read_train_log(reference / "train_log.csv"), f"losses differ from the uninterrupted run's; {moment}"
    spec = json.loads((resumed / "base.json").read_text())
    assert spec["step"] == TRAIN_STEPS, moment
    # the same EMA weights, bit for bit: model, optimizer, data and noise generators all came back from the checkpoint
    assert (resumed / "base.safetensors").read_bytes() == (reference / "base.safetensors").read_bytes(), moment
    model = WorldModel.load(resumed, experts=["base"])  # checks the weights' SHA-256 and that they are finite
    assert model.base is not None
    assert not [path.name for path in resumed.iterdir() if path.name.endswith(".tmp")], moment


# ------------------------------------------------------------------------------------------ come_rl.collect
COLLECT_EPISODES = 20
COLLECT_ARGS = ["env=memory_cards", f"episodes={COLLECT_EPISODES}", "steps=300", "episodes_per_shard=1", "seed=3",
                "out=data"]


def manifest_without_timing(directory: Path) -> dict:
    """The manifest without ``last_run`` (seconds, speed and steps of the last invocation, which a resume splits)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    assert "last_run" in manifest, "the timing entry is gone; update this test"
    return {key: value for key, value in manifest.items() if key != "last_run"}


def test_killed_collection_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    from come_rl.data import EpisodeDataset

    reference, resumed = tmp_path / "reference" / "data", tmp_path / "resumed" / "data"
    run_to_end("come_rl.collect", COLLECT_ARGS, reference.parent)
    written = sorted(path.stat().st_mtime for path in reference.glob("shard_*.npz"))
    window = written[-1] - written[0]

    def listed_shards() -> list[str]:
        try:
            return [record["file"] for record in json.loads((resumed / "manifest.json").read_text())["shards"]]
        except (FileNotFoundError, ValueError):  # not written yet (the manifest itself is replaced atomically)
            return []

    moment = kill_at_random_moment("come_rl.collect", COLLECT_ARGS, resumed.parent,
                                   progressed=lambda: len(listed_shards()) >= 1,
                                   nearly_done=lambda: len(listed_shards()) >= COLLECT_EPISODES - 3, window=window)
    finished = listed_shards()
    print(f"{moment}; {len(finished)} of {COLLECT_EPISODES} shards listed")  # shown with -s, or on failure
    before = {name: identity(resumed / name) for name in finished}
    run_to_end("come_rl.collect", COLLECT_ARGS, resumed.parent)
    assert {name: identity(resumed / name) for name in finished} == before, f"finished shards were redone; {moment}"
    assert manifest_without_timing(resumed) == manifest_without_timing(reference), moment  # files, sizes, SHA-256
    shards = sorted(path.name for path in resumed.iterdir() if path.name != "manifest.json")
    assert shards == sorted(path.name for path in reference.iterdir() if path.name != "manifest.json"), moment
    data = EpisodeDataset(resumed)  # verifies every shard against the manifest
    assert data.seeds == list(range(3, 3 + COLLECT_EPISODES)), f"missing or duplicated episodes; {moment}"
    np.testing.assert_array_equal(np.concatenate(data.frames), np.concatenate(EpisodeDataset(reference).frames))
