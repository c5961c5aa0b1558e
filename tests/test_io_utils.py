"""Atomic writes, hashing and the numpy-only unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat

import numpy as np
import pytest

from come_rl.io_utils import (
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_text,
    safe_pickle_load,
    sha256_file,
)


def test_atomic_write_creates_parents_replaces_and_leaves_no_temp_files(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's private 0600


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "keep.bin"
    atomic_write_bytes(target, b"old")

    def failing_replace(source: str, destination: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_write_rejects_wrong_types(tmp_path) -> None:
    with pytest.raises(TypeError, match="atomic_write_text"):
        atomic_write_bytes(tmp_path / "x", "text")
    with pytest.raises(TypeError, match="expects str"):
        atomic_write_text(tmp_path / "x", b"bytes")


def test_atomic_save_npz_round_trip(tmp_path) -> None:
    frames = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = atomic_save_npz(tmp_path / "clip.npz", frames=frames, poses=np.eye(3))
    with np.load(path) as loaded:  # allow_pickle stays False
        np.testing.assert_array_equal(loaded["frames"], frames)
        np.testing.assert_array_equal(loaded["poses"], np.eye(3))
    with pytest.raises(ValueError, match="must end in '.npz'"):
        atomic_save_npz(tmp_path / "clip.bin", frames=frames)
    with pytest.raises(ValueError, match="dtype object"):
        atomic_save_npz(tmp_path / "objects.npz", bad=np.array([{"a": 1}], dtype=object))


def test_sha256_file(tmp_path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path, chunk_bytes=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_load_reads_numpy_and_plain_containers(tmp_path, protocol) -> None:
    payload = {"position": np.arange(6, dtype=np.float64).reshape(3, 2), "yaw": np.zeros(3, np.float32),
               "meta": [1, 2.5, "x", None, True, (3, 4)], "scalar": np.float32(1.5), "raw": b"\x00\x01"}
    path = tmp_path / "traj_data.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    loaded = safe_pickle_load(path)
    np.testing.assert_array_equal(loaded["position"], payload["position"])
    assert loaded["yaw"].dtype == np.float32
    assert loaded["meta"] == payload["meta"] and loaded["scalar"] == np.float32(1.5)
    assert loaded["raw"] == b"\x00\x01"
    with open(path, "rb") as handle:
        assert safe_pickle_load(handle)["position"].shape == (3, 2)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_pickle_load_refuses_code_and_names_the_file(tmp_path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"weights": _RunsCode()}))
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl.*(posix|os)\.system"):
        safe_pickle_load(path)
    # Arbitrary classes (here collections.OrderedDict) are refused too, not only dangerous ones.
    from collections import OrderedDict

    with pytest.raises(pickle.UnpicklingError, match="OrderedDict"):
        safe_pickle_load(io.BytesIO(pickle.dumps(OrderedDict(a=1))))


def test_safe_pickle_load_bad_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        safe_pickle_load(tmp_path / "missing.pkl")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        safe_pickle_load(truncated)
    with pytest.raises(TypeError, match="path or a binary file"):
        safe_pickle_load(123)
