"""Shared pytest set-up: one CPU thread per test process, an isolated weight cache, a network block."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

# The machines this runs on have 2 cores shared with other jobs; more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import importlib.util

import pytest
import torch

torch.set_num_threads(1)

# Load triton (pulled in by torch._dynamo via peft/transformers) before any test module loads MuJoCo's
# EGL backend: loading Mesa's EGL first and triton's libtriton second segfaults the process (both carry
# LLVM), as `python -c "import memory_maze.tasks; import peft"` shows; the other order is fine.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

# Converted LPIPS weights go to a per-session cache so tests exercise the conversion and never touch
# the user's ~/.cache/come_rl. A cache the caller set explicitly is respected.
_SESSION_CACHE_DIR: str | None = None
if "COME_RL_CACHE" not in os.environ:
    _SESSION_CACHE_DIR = tempfile.mkdtemp(prefix="come_rl_test_cache_")
    os.environ["COME_RL_CACHE"] = _SESSION_CACHE_DIR


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION_CACHE_DIR is not None:
        shutil.rmtree(_SESSION_CACHE_DIR, ignore_errors=True)


class NetworkAccessBlocked(RuntimeError):
    """Raised when a test tries to reach the network while `no_network` is active."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every internet (AF_INET/AF_INET6) connection or DNS lookup fail, to prove a code path is offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkAccessBlocked(f"network access attempted during an offline test: {args!r}")

    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
