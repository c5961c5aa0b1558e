"""come_rl.fanout: the local backend, bad settings, and an unreachable Ray address fails fast (no hang)."""

import socket
import time

import pytest

from come_rl.fanout import check_backend, check_ray_address, init_ray, run_tasks


class _Square:
    def __init__(self, offset):
        self.offset, self.calls = offset, 0

    def run(self, task):
        self.calls += 1
        return task * task + self.offset


def test_nothing_left_to_run_starts_no_ray_cluster(monkeypatch):
    """A resumed Ray run whose episodes all finished (come_rl.run run.backend=ray, the same command again) plays
    nothing and starts neither Ray nor a worker: it only rebuilds its tables."""
    import come_rl.fanout as fanout

    started = []
    monkeypatch.setattr(fanout, "init_ray", lambda **kwargs: started.append(kwargs))
    assert list(fanout.iter_tasks(_Square, (0,), [], backend="ray", workers=2, progress=False)) == []
    assert started == []
    with pytest.raises(ValueError, match="workers must"):  # settings are still checked first
        list(fanout.iter_tasks(_Square, (0,), [], backend="ray", workers=0))


def test_local_backend_runs_in_order_with_one_worker():
    assert run_tasks(_Square, (1,), [3, 1, 2], progress=False) == [10, 2, 5]


@pytest.mark.parametrize("backend, workers, message", [("slurm", 1, "backend must be one of"),
                                                        ("ray", 0, "workers must be"), ("local", True, "workers must")])
def test_bad_backend_settings(backend, workers, message):
    with pytest.raises(ValueError, match=message):
        check_backend(backend, workers)


def test_an_unreachable_ray_address_is_a_clear_error_not_a_hang(monkeypatch):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot be reached"):
        init_ray()
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="not host:port"):
        check_ray_address("just-a-host")
    check_ray_address("auto")  # left to Ray


class _DiesOnce:
    """Kills its own process the first time it runs task 2 (a worker killed mid-episode), or every time (always)."""

    def __init__(self, marker_dir, always=False):
        self.marker_dir, self.always = marker_dir, always

    def run(self, task):
        import os
        from pathlib import Path

        marker = Path(self.marker_dir) / f"task{task}.died"
        if task == 2 and (self.always or not marker.exists()):
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return task * task


def test_a_dead_ray_worker_is_restarted_and_its_task_replayed_or_the_run_stops_naming_it(tmp_path):
    """One Ray session (its start is most of the cost): a worker killed mid-task once, then one that keeps dying."""
    import sys

    import ray
    from ray import cloudpickle

    from come_rl.fanout import WorkerDied, iter_tasks

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests folder
    try:
        rows = run_tasks(_DiesOnce, (str(tmp_path),), [1, 2, 3, 4], backend="ray", workers=2, threads=1,
                         progress=False)
        assert rows == [1, 4, 9, 16]
        assert (tmp_path / "task2.died").exists()  # it did die once, and the replay gave the same row
        finished = []
        with pytest.raises(WorkerDied, match=r"more than retries=1 times while running task 2 .*the 1 task\(s\) "
                                             r"before it finished. Rerun the same command to resume"):
            for row in iter_tasks(_DiesOnce, (str(tmp_path), True), [1, 2, 3], backend="ray", workers=1, threads=1,
                                  progress=False, retries=1):
                finished.append(row)
        assert finished == [1]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        run_tasks(_DiesOnce, (str(tmp_path),), [1], backend="ray", retries=-1)
