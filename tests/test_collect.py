"""Offline collection and the episode reader: shards, manifest checksums, resume, clip sampling."""

import json

import numpy as np
import pytest

from come_rl.collect import collect, main, parse_arguments
from come_rl.data import EpisodeDataset, read_manifest
from come_rl.conventions import yaw_from_direction


def cards_config(out, **overrides):
    arguments = [f"out={out}", "env=memory_cards", "episodes=6", "steps=20", "episodes_per_shard=2", "seed=3"]
    arguments += [f"{key}={value}" for key, value in overrides.items()]
    return parse_arguments(arguments)


def load_arrays(directory):
    data = EpisodeDataset(directory)
    return data, np.concatenate(data.frames), np.concatenate(data.actions)


def test_collect_writes_verified_shards_and_reader_serves_aligned_clips(tmp_path):
    manifest = collect(cards_config(tmp_path / "cards"))
    assert manifest["complete"] and [record["file"] for record in manifest["shards"]] == [
        "shard_000000-000002.npz", "shard_000002-000004.npz", "shard_000004-000006.npz"]
    data = EpisodeDataset(tmp_path / "cards")
    assert len(data) == 6 and data.num_steps == 120
    assert data.action_spec.kind == "discrete" and data.action_spec.dim == 5
    assert data.seeds == [3, 4, 5, 6, 7, 8]
    for frames, actions, poses in zip(data.frames, data.actions, data.poses):
        assert frames.shape == (21, 48, 48, 3) and frames.dtype == np.uint8
        assert actions.shape == (20, 5) and actions.dtype == np.float32
        np.testing.assert_array_equal(actions.sum(axis=1), 1.0)  # one-hot
        assert poses.shape == (21, 3)
        # Memory Cards poses are the cursor: a move action changes it by exactly one cell (or not at a border).
        step = np.abs(np.diff(poses[:, :2], axis=0)).sum(axis=1)
        toggles = actions.argmax(axis=1) == 4
        assert np.all(step[toggles] == 0) and np.all(step <= 1)

    batch = data.sample_clips(8, 5, np.random.default_rng(0))
    assert batch["frames"].shape == (8, 5, 48, 48, 3) and batch["actions"].shape == (8, 4, 5)
    assert batch["poses"].shape == (8, 5, 3)
    for b in range(8):
        episode, start = batch["episode"][b], batch["start"][b]
        np.testing.assert_array_equal(batch["frames"][b], data.frames[episode][start:start + 5])
        np.testing.assert_array_equal(batch["actions"][b], data.actions[episode][start:start + 4])
        np.testing.assert_array_equal(batch["poses"][b], data.poses[episode][start:start + 5])
    # Full-length clips can only start at frame 0.
    whole = data.sample_clips(4, 21, np.random.default_rng(1))
    assert np.all(whole["start"] == 0)
    with pytest.raises(ValueError, match="no episode has 22 frames"):
        data.sample_clips(1, 22, np.random.default_rng(0))


def test_same_seed_same_data_whatever_the_number_of_workers(tmp_path):
    collect(cards_config(tmp_path / "one"))
    collect(cards_config(tmp_path / "two", workers=2))
    _, frames_one, actions_one = load_arrays(tmp_path / "one")
    _, frames_two, actions_two = load_arrays(tmp_path / "two")
    np.testing.assert_array_equal(frames_one, frames_two)
    np.testing.assert_array_equal(actions_one, actions_two)
    collect(cards_config(tmp_path / "other_seed", seed=4))
    _, frames_other, _ = load_arrays(tmp_path / "other_seed")
    # Seed 4 is episode 1 of seed 3: episodes are seeded one by one (base seed + index).
    np.testing.assert_array_equal(frames_other[:21], frames_one[21:42])


def test_killed_collection_resumes_without_corrupt_or_duplicated_shards(tmp_path):
    out = tmp_path / "cards"
    collect(cards_config(out))
    _, frames_before, actions_before = load_arrays(out)
    manifest = read_manifest(out)
    # Simulate a kill at several moments: a shard truncated on disk, a shard deleted, a shard written
    # but not yet recorded in the manifest, and a temp file of an interrupted atomic write.
    (out / "shard_000000-000002.npz").write_bytes((out / "shard_000000-000002.npz").read_bytes()[:1000])
    (out / "shard_000002-000004.npz").unlink()
    manifest["shards"] = [record for record in manifest["shards"] if record["file"] != "shard_000004-000006.npz"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".shard_000004-000006.npz.abc.tmp").write_bytes(b"partial")

    with pytest.raises(ValueError, match=r"shard_000000-000002\.npz.*Rerun the collect command"):
        EpisodeDataset(out)

    assert main([f"out={out}", "env=memory_cards", "episodes=6", "steps=20", "episodes_per_shard=2", "seed=3"]) == 0
    resumed = read_manifest(out)
    assert resumed["complete"] and len(resumed["shards"]) == 3
    assert sorted(path.name for path in out.iterdir()) == [
        "manifest.json", "shard_000000-000002.npz", "shard_000002-000004.npz", "shard_000004-000006.npz"]
    _, frames_after, actions_after = load_arrays(out)
    np.testing.assert_array_equal(frames_after, frames_before)
    np.testing.assert_array_equal(actions_after, actions_before)

    # Extending a data set keeps the verified shards and adds the new ones.
    collect(cards_config(out, episodes=8))
    assert EpisodeDataset(out).num_steps == 160


def test_tampered_shard_is_caught_and_bad_arguments_are_refused(tmp_path):
    out = tmp_path / "cards"
    collect(cards_config(out))
    shard = out / "shard_000002-000004.npz"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"shard_000002-000004\.npz does not match its SHA-256"):
        EpisodeDataset(out)
    with pytest.raises(ValueError, match="holds a data set made with"):
        collect(cards_config(out, steps=30))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EpisodeDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="env must be one of"):
        parse_arguments(["env=atari", "episodes=1", "steps=1", "out=x"])
    with pytest.raises(ValueError, match="missing steps"):
        parse_arguments(["env=memory_cards", "episodes=1", "out=x"])
    with pytest.raises(ValueError, match="bad value for"):
        parse_arguments(["env=memory_cards", "episodes=two", "steps=1", "out=x"])
    assert main(["env=memory_cards"]) == 2


def test_memory_maze_offline_format_is_read(tmp_path):
    rng = np.random.default_rng(0)
    steps = 12
    action_ids = rng.integers(0, 6, steps)
    action = np.zeros((steps + 1, 6), np.float32)
    action[np.arange(1, steps + 1), action_ids] = 1.0  # row t: the action that led to image[t]
    angles = rng.uniform(-np.pi, np.pi, steps + 1)
    agent_dir = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    agent_pos = rng.uniform(0, 9, (steps + 1, 2))
    image = rng.integers(0, 256, (steps + 1, 64, 64, 3), dtype=np.uint8)
    (tmp_path / "train").mkdir()
    np.savez_compressed(tmp_path / "train" / "episode_a.npz", image=image, action=action,
                        reward=np.zeros(steps + 1, np.float32), agent_pos=agent_pos, agent_dir=agent_dir,
                        maze_layout=np.ones((9, 9), np.uint8))
    data = EpisodeDataset(tmp_path)
    assert data.meta["source"] == "memory_maze_offline" and data.action_spec.dim == 6
    np.testing.assert_array_equal(data.frames[0], image)
    np.testing.assert_array_equal(data.actions[0].argmax(axis=1), action_ids)
    np.testing.assert_allclose(data.poses[0][:, :2], agent_pos, atol=1e-5)
    np.testing.assert_allclose(data.poses[0][:, 2], yaw_from_direction(agent_dir), atol=1e-5)
    batch = data.sample_clips(3, 4, np.random.default_rng(0))
    assert batch["actions"].shape == (3, 3, 6)
    np.savez_compressed(tmp_path / "train" / "episode_b.npz", video=image)
    with pytest.raises(ValueError, match="episode_b.npz lacks"):
        EpisodeDataset(tmp_path)


def test_memory_maze_collection_records_poses(tmp_path):
    import memory_maze  # noqa: F401  (a hard dependency: a broken install fails here, never skips)
    out = tmp_path / "maze"
    assert main([f"out={out}", "env=memory_maze", "episodes=1", "steps=6", "seed=2"]) == 0
    data = EpisodeDataset(out)
    assert data.frames[0].shape == (7, 64, 64, 3) and data.actions[0].shape == (6, 6)
    assert data.poses[0].shape == (7, 3) and np.all((data.poses[0][:, :2] > 0) & (data.poses[0][:, :2] < 9))
    assert data.meta["env"] == "memory_maze" and data.meta["episode_seeds"] == [2]
