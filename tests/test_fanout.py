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
