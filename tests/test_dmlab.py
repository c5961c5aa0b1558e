"""DeepMind Lab: clear error where deepmind_lab is missing; DMLab-40K reader on a file in TECO's format."""

import importlib.util

import numpy as np
import pytest

from come_rl.data import EpisodeDataset
from envs.dmlab import (
    DeepMindLabUnavailableError,
    DMLabMazeEnv,
    find_dmlab_episodes,
    read_dmlab_episode,
    write_dmlab_shards_to_episode_dataset,
)

HAS_DMLAB = importlib.util.find_spec("deepmind_lab") is not None


def write_teco_episode(path, steps=10, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8)
    actions = rng.integers(0, 6, steps).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, video=video, actions=actions)
    return video, actions


@pytest.mark.skipif(HAS_DMLAB, reason="deepmind_lab is installed here")
def test_missing_deepmind_lab_raises_with_instructions():
    with pytest.raises(DeepMindLabUnavailableError, match="bazel build"):
        DMLabMazeEnv()
    import gymnasium as gym

    import envs  # noqa: F401

    with pytest.raises(ImportError, match="github.com/google-deepmind/lab"):
        gym.make("come_rl/DMLabMaze-v0")


@pytest.mark.skipif(not HAS_DMLAB, reason="needs deepmind_lab")
def test_dmlab_env_runs():  # pragma: no cover - only where DeepMind Lab is built
    env = DMLabMazeEnv(max_episode_steps=5)
    frame, _ = env.reset(seed=0)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    for _ in range(5):
        frame, _, _, truncated, _ = env.step(0)
    assert truncated


def test_reader_one_hot_and_alignment(tmp_path):
    video, actions = write_teco_episode(tmp_path / "train" / "0" / "ep.npz")
    frames, one_hot = read_dmlab_episode(tmp_path / "train" / "0" / "ep.npz")
    np.testing.assert_array_equal(frames, video)
    assert one_hot.shape == (9, 6) and one_hot.dtype == np.float32
    np.testing.assert_array_equal(one_hot.argmax(axis=1), actions[1:])
    _, after = read_dmlab_episode(tmp_path / "train" / "0" / "ep.npz", action_alignment="taken_after")
    np.testing.assert_array_equal(after.argmax(axis=1), actions[:-1])


def test_reader_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "wrong_keys.npz", image=np.zeros((3, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="'video' and 'actions'"):
        read_dmlab_episode(tmp_path / "wrong_keys.npz")
    np.savez(tmp_path / "bad_action.npz", video=np.zeros((3, 8, 8, 3), np.uint8), actions=np.array([0, 1, 7]))
    with pytest.raises(ValueError, match=r"integers in \[0, 6\)"):
        read_dmlab_episode(tmp_path / "bad_action.npz")
    np.savez(tmp_path / "short.npz", video=np.zeros((3, 8, 8, 3), np.uint8), actions=np.array([0, 1]))
    with pytest.raises(ValueError, match="3 frames but 2 actions"):
        read_dmlab_episode(tmp_path / "short.npz")
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="truncated.npz"):
        read_dmlab_episode(tmp_path / "truncated.npz")
    with pytest.raises(FileNotFoundError, match="train"):
        find_dmlab_episodes(tmp_path / "nowhere")


def test_conversion_to_episode_dataset(tmp_path):
    videos = [write_teco_episode(tmp_path / "dmlab" / "train" / str(k % 2) / f"{k}.npz", seed=k) for k in range(3)]
    out = write_dmlab_shards_to_episode_dataset(tmp_path / "dmlab", tmp_path / "shards", episodes_per_shard=2)
    data = EpisodeDataset(out)
    assert len(data) == 3 and data.poses is None and data.action_spec.dim == 6
    files = find_dmlab_episodes(tmp_path / "dmlab")
    for k, file in enumerate(files):
        np.testing.assert_array_equal(data.frames[k], np.load(file)["video"])
    assert sorted(v[0].sum() for v in videos) == sorted(int(f.sum()) for f in data.frames)
    batch = data.sample_clips(4, 6, np.random.default_rng(0))
    assert batch["frames"].shape == (4, 6, 64, 64, 3) and batch["poses"] is None
