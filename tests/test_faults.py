"""Faults at scale: a full disk, two runs into one directory, Ctrl-C / SIGTERM in the middle of training.

Interrupt moments are drawn from a seeded generator (``random.Random(SEED)``): a failure names the moment, and a rerun of
the test draws the same one. No assertion reads wall time.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from come_rl.io_utils import WriteError, atomic_write_bytes, atomic_write_text
from come_rl.locks import LOCK_NAME, DirectoryBusyError, hold_directory

SEED = 27
TRAIN_ARGS = ["model=unet_cards", "out=ckpt", "threads=1", "batch_size=4", "online_episodes=16",
              'backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32}', "log_every=1", "checkpoint_seconds=1000"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A real 256 KiB file system (tmpfs) where the machine allows mounting one; otherwise a directory whose writes
    fail with ENOSPC once more than 256 KiB would be written (injected at the write call)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    if not mounted:
        real_write = os.write

        def write(fd, data):
            if os.fstat(fd).st_size + len(data) > 256 * 1024 and str(mount) in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # lazy: never leave a busy mount behind


def test_a_full_disk_names_the_path_and_keeps_the_previous_file(small_disk):
    target = small_disk / "table.csv"
    atomic_write_text(target, "step,loss\n1,0.5\n")
    with pytest.raises(WriteError) as caught:
        atomic_write_bytes(target, os.urandom(600 * 1024))
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert str(target) in message and "no space left" in message and "0.61 MB" in message
    assert "free space" in message and "previous content is intact" in message
    assert target.read_text() == "step,loss\n1,0.5\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["table.csv"]  # no temporary file left


def test_a_checkpoint_on_a_full_disk_fails_clearly_and_leaves_no_temporary_file(small_disk):
    import torch

    from come_rl.checkpoint import expert_spec, save_expert
    from come_rl.diffusion import CosineSchedule
    from come_rl.experts.expert import DiffusionExpert
    from come_rl.nets.unet import UNetConfig, VideoUNet

    config = dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[48, 96, 192])
    expert = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule())  # 15 MB of weights
    with pytest.raises(WriteError, match="base.safetensors: no space left on the device .*it needed 15"):
        save_expert(small_disk, expert, expert_spec(expert, "unet", config))
    assert list(small_disk.iterdir()) == []
    from come_rl.checkpoint import torch_save_atomic

    with pytest.raises(WriteError, match="train_state.pt: no space left"):
        torch_save_atomic({"weights": torch.zeros(200_000)}, small_disk / "base_train_state.pt")
    assert list(small_disk.iterdir()) == []


def test_an_unwritable_directory_is_named(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: make the directory a file's child instead
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        with pytest.raises((WriteError, OSError), match="a_file"):
            atomic_write_text(blocker / "out" / "table.csv", "x")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(WriteError, match="permission denied"):
        atomic_write_text(locked / "table.csv", "x")


def test_one_writer_per_directory_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "results"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "what": "come_rl.run",
                                                 "command": "python -m come_rl.run"}))
        with pytest.raises(DirectoryBusyError, match=f"pid {holder.pid}"):
            hold_directory(out, "test")
        from come_rl.episode_records import check_records

        with pytest.raises(DirectoryBusyError, match="in use by another run"):
            check_records(out, {"seed": 1}, ())
    finally:
        holder.kill()
        holder.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = hold_directory(out, "test")
    assert any("stale lock" in str(w.message) for w in caught)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert hold_directory(out, "test") is lock  # the holder itself may ask again
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_second_training_into_a_live_runs_out_is_refused(tmp_path):
    from come_rl.train import parse_overrides, train

    first = subprocess.Popen([sys.executable, "-m", "come_rl.train", *TRAIN_ARGS, "steps=100000"], cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "ckpt" / LOCK_NAME
        for _ in range(6000):
            if lock.exists() and lock.read_text():
                break
            assert first.poll() is None, "the first training run ended before taking its directory"
            time.sleep(0.02)
        args = [a if not a.startswith("out=") else f"out={tmp_path / 'ckpt'}" for a in TRAIN_ARGS]
        with pytest.raises(DirectoryBusyError, match=f"pid {first.pid}"):
            train(parse_overrides([*args, "steps=1"]))
    finally:
        first.kill()
        first.wait()


def _train(cwd: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "come_rl.train", *TRAIN_ARGS, *extra], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT takes the same path (the run test below sends it)
def test_ctrl_c_or_sigterm_saves_says_how_to_resume_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, sig):
    steps = 24
    (tmp_path / "reference").mkdir()
    reference = _train(tmp_path / "reference", [f"steps={steps}"])
    assert reference.returncode == 0, reference.stderr[-2000:]
    moment = random.Random(SEED + int(sig)).randint(3, steps - 6)  # the logged step after which the signal comes
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "come_rl.train", *TRAIN_ARGS, f"steps={steps}"], cwd=run_dir,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = run_dir / "ckpt" / "train_log.csv"
    while not (log.exists() and len(log.read_text().splitlines()) - 1 >= moment):
        assert process.poll() is None, f"training ended before step {moment}: {process.stderr.read()[-2000:]}"
        time.sleep(0.005)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + int(sig), f"signal after logged step {moment}: exit {process.returncode}\n{err}"
    assert "run the same command again to resume" in err, err[-2000:]
    stopped_at = json.loads((run_dir / "ckpt" / "base.json").read_text())["step"]
    assert moment <= stopped_at < steps, f"signal after step {moment}, saved at {stopped_at}"
    assert not list((run_dir / "ckpt").glob(".*.tmp")) and not (run_dir / "ckpt" / LOCK_NAME).exists()
    resumed = _train(run_dir, [f"steps={steps}"])
    assert resumed.returncode == 0 and f"resumed base from step {stopped_at}" in resumed.stdout, resumed.stderr[-2000:]
    assert (run_dir / "ckpt" / "base.safetensors").read_bytes() == (tmp_path / "reference" / "ckpt" / "base.safetensors"
                                                                    ).read_bytes(), f"signal after step {moment}"


@pytest.mark.parametrize("sig", [signal.SIGINT])  # SIGTERM takes the same path (the training test sends it)
def test_an_interrupted_run_keeps_finished_episodes_and_resumes(tmp_path, sig):
    """The planning run on the point-mass world (an exact closed-form model: seconds per episode)."""
    args = ["env=point_mass", "model=point_mass", "agent=cem", "run.episodes=4", "run.out_dir=out", "run.progress=false",
            "run.lpips_metric=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    (tmp_path / "ref").mkdir()
    reference = subprocess.run([sys.executable, "-m", "come_rl.run", *args], cwd=tmp_path / "ref", env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    after = random.Random(SEED * 10 + int(sig)).randint(1, 3)  # finished episodes before the signal
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "come_rl.run", *args], cwd=run_dir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = run_dir / "out" / "episode_records"
    while len(list(records.glob("episode_*.npz"))) < after:
        assert process.poll() is None, f"the run ended before {after} episodes: {process.stderr.read()[-2000:]}"
        time.sleep(0.005)
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    finished = len(list(records.glob("episode_*.npz")))
    if process.returncode == 0:  # the signal came after the last episode's record: nothing left to stop
        assert finished == 4
    else:
        assert process.returncode == 128 + int(sig), f"after {after} episodes: exit {process.returncode}\n{err[-2000:]}"
        assert "run the same command again to resume" in err and f"{finished} finished episode record" in err
        assert after <= finished < 4
    assert not list(records.glob(".*.tmp"))
    resumed = subprocess.run([sys.executable, "-m", "come_rl.run", *args], cwd=run_dir, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows_without_timing(run_dir / "out" / "episodes.csv") == _rows_without_timing(
        tmp_path / "ref" / "out" / "episodes.csv"), f"signal after {after} episodes"


def _rows_without_timing(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and any("seconds" in key for key in rows[0]), "no timing column left: update this helper"
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]
