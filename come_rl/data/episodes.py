"""Offline episodes: compressed shards with a checksummed manifest, and a fast clip sampler.

Two layouts are read by the same ``EpisodeDataset``:

(a) A directory written by ``python -m come_rl.collect`` (``manifest.json`` + shards). A shard
    ``shard_<first>-<last+1>.npz`` holds a few whole episodes concatenated along time:

    ==================  ==========================  ==========================================
    key                 shape                       meaning
    ==================  ==========================  ==========================================
    ``frames``          (sum(T_i + 1), H, W, 3) u8  all frames, episode after episode
    ``actions``         (sum(T_i), A) float32       one-hot (discrete) or raw (continuous)
    ``rewards``         (sum(T_i),) float32         reward received after each action
    ``poses``           (sum(T_i + 1), 3) float32   (x, y, yaw); absent for pose-less envs
    ``episode_lengths`` (K,) int64                  T_i: actions per episode
    ``episode_seeds``   (K,) int64                  the env seed of each episode
    ``episode_indices`` (K,) int64                  global episode index
    ==================  ==========================  ==========================================

    ``manifest.json`` records the env, the action spec, frame shape, the seeds and, per shard,
    its episode range, size and SHA-256, so a truncated or tampered shard is caught on load.

(b) A directory of Memory Maze's published offline data (one ``.npz`` per episode, searched
    recursively): ``image`` (T+1, 64, 64, 3), ``action`` (T+1, 6) one-hot where row t is the
    action that *led to* ``image[t]`` (row 0 is a placeholder at reset), ``reward`` (T+1,),
    ``agent_pos`` (T+1, 2), ``agent_dir`` (T+1, 2), ...

Time alignment everywhere: ``frames[t + 1]`` follows ``actions[t]`` (see ``come_rl.interfaces``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from come_rl.conventions import yaw_from_direction
from come_rl.interfaces import ActionSpec
from come_rl.io_utils import atomic_save_npz, atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "come_rl.episodes/1"


@dataclass
class Episode:
    """One recorded episode of ``T`` steps.

    Attributes:
        frames: (T + 1, H, W, 3) uint8.
        actions: (T, A) float32; ``frames[t + 1]`` follows ``actions[t]``.
        rewards: (T,) float32.
        poses: (T + 1, 3) float32 ``(x, y, yaw)``, or None.
        seed: env seed the episode was reset with.
        index: global episode index in its data set.
    """

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    poses: np.ndarray | None
    seed: int
    index: int

    def __post_init__(self) -> None:
        steps = self.actions.shape[0]
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"episode {self.index}: frames must be uint8 (T+1, H, W, 3), got "
                             f"{self.frames.dtype} {self.frames.shape}")
        if self.frames.shape[0] != steps + 1 or self.rewards.shape != (steps,):
            raise ValueError(f"episode {self.index}: {self.frames.shape[0]} frames, {steps} actions and "
                             f"{self.rewards.shape} rewards; an episode of T steps needs T + 1 frames, T actions "
                             "and T rewards")
        if self.poses is not None and self.poses.shape != (steps + 1, 3):
            raise ValueError(f"episode {self.index}: poses must be (T + 1, 3) = ({steps + 1}, 3), got {self.poses.shape}")


def shard_file_name(first_episode: int, end_episode: int) -> str:
    """Shards are named by their episode range [first, end), so a resumed run never duplicates one."""
    return f"shard_{first_episode:06d}-{end_episode:06d}.npz"


def save_episode_shard(path: str | os.PathLike, episodes: list[Episode]) -> dict[str, Any]:
    """Write episodes to one compressed shard atomically; returns its manifest record."""
    if not episodes:
        raise ValueError("save_episode_shard: give at least one episode")
    has_poses = episodes[0].poses is not None
    if any((episode.poses is not None) != has_poses for episode in episodes):
        raise ValueError("save_episode_shard: either all episodes of a shard have poses or none has")
    arrays = {
        "frames": np.concatenate([episode.frames for episode in episodes]),
        "actions": np.concatenate([episode.actions for episode in episodes]).astype(np.float32),
        "rewards": np.concatenate([episode.rewards for episode in episodes]).astype(np.float32),
        "episode_lengths": np.array([episode.actions.shape[0] for episode in episodes], dtype=np.int64),
        "episode_seeds": np.array([episode.seed for episode in episodes], dtype=np.int64),
        "episode_indices": np.array([episode.index for episode in episodes], dtype=np.int64),
    }
    if has_poses:
        arrays["poses"] = np.concatenate([episode.poses for episode in episodes]).astype(np.float32)
    path = Path(path)
    atomic_save_npz(path, **arrays)
    return {
        "file": path.name,
        "episodes": [int(episodes[0].index), int(episodes[-1].index) + 1],
        "steps": int(arrays["episode_lengths"].sum()),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _open_npz(path: Path, fix: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz ({type(error).__name__}: {error}); it is truncated or "
                         f"corrupt. {fix}") from error


def load_episode_shard(path: str | os.PathLike) -> list[Episode]:
    """Read one shard back into episodes (no checksum check: see ``verify_shard``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"episode shard {path} does not exist")
    fix = "Delete it and rerun the same collect command to regenerate it."
    with _open_npz(path, fix) as archive:
        try:
            lengths = archive["episode_lengths"]
            frames, actions, rewards = archive["frames"], archive["actions"], archive["rewards"]
            poses = archive["poses"] if "poses" in archive.files else None
            seeds, indices = archive["episode_seeds"], archive["episode_indices"]
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise ValueError(f"{path} is missing data or is corrupt ({type(error).__name__}: {error}). {fix}") from error
    frame_starts = np.concatenate([[0], np.cumsum(lengths + 1)])
    action_starts = np.concatenate([[0], np.cumsum(lengths)])
    episodes = []
    for k in range(len(lengths)):
        frame_slice = slice(frame_starts[k], frame_starts[k + 1])
        action_slice = slice(action_starts[k], action_starts[k + 1])
        episodes.append(Episode(frames[frame_slice], actions[action_slice], rewards[action_slice],
                                None if poses is None else poses[frame_slice], int(seeds[k]), int(indices[k])))
    return episodes


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a collected data set."""
    manifest_path = Path(directory) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}; collect a data set there with "
                                "`python -m come_rl.collect env=memory_maze episodes=N steps=T out=DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error}); delete it and rerun the collect command "
                         "(its shards are re-verified and kept where they match)") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (shards sorted by their first episode)."""
    manifest = dict(manifest, format=MANIFEST_FORMAT)
    manifest["shards"] = sorted(manifest.get("shards", []), key=lambda record: record["episodes"][0])
    atomic_write_text(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_shard(directory: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """None when the shard file exists and matches its manifest record, else the reason it does not."""
    path = Path(directory) / record["file"]
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != record["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, the manifest says {record['bytes']} (truncated?)"
    if sha256_file(path) != record["sha256"]:
        return f"{path} does not match its SHA-256 in the manifest (modified or corrupt)"
    return None


class EpisodeDataset:
    """Episodes in memory, with vectorised sampling of training clips.

    Args:
        path: a collected directory (``manifest.json`` + shards) or a directory of Memory Maze's
            published offline ``.npz`` episodes.
        verify_checksums: check every shard's SHA-256 against the manifest before using it.
        max_episodes: load at most this many episodes (the published data sets are ~100 GB).

    Attributes:
        frames: list of (T_i + 1, H, W, 3) uint8 (views into one contiguous buffer).
        actions: list of (T_i, A) float32; ``frames[i][t + 1]`` follows ``actions[i][t]``.
        poses: list of (T_i + 1, 3) float32, or None when the data set has no poses.
        rewards: list of (T_i,) float32.
        seeds: list of int, the env seed of each episode (-1 where unknown).
        action_spec: the ``ActionSpec`` of ``actions``.
        meta: the manifest (collected data) or a description of the source.
    """

    def __init__(self, path: str | os.PathLike, verify_checksums: bool = True, max_episodes: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data set path {self.path} does not exist; collect one with "
                                    "`python -m come_rl.collect env=memory_maze episodes=N steps=T out=DIR` "
                                    "or point to a directory of Memory Maze offline .npz files")
        if not self.path.is_dir():
            raise NotADirectoryError(f"data set path {self.path} is a file; pass the directory that holds "
                                     f"{MANIFEST_NAME} (or the Memory Maze .npz episodes)")
        if max_episodes is not None and max_episodes <= 0:
            raise ValueError(f"max_episodes must be positive or None, got {max_episodes}")
        if (self.path / MANIFEST_NAME).is_file():
            episodes, self.meta, self.action_spec = self._load_collected(verify_checksums, max_episodes)
        else:
            episodes, self.meta, self.action_spec = self._load_memory_maze_offline(max_episodes)
        if not episodes:
            raise ValueError(f"data set {self.path} holds no episodes")
        self._pack(episodes)

    @classmethod
    def from_episodes(cls, episodes: list[Episode], action_spec: ActionSpec, meta: dict | None = None) -> "EpisodeDataset":
        """A data set of episodes already in memory (generated from seeds, e.g. ``online:memory_maze``)."""
        if not episodes:
            raise ValueError("from_episodes needs at least one episode")
        dataset = cls.__new__(cls)
        dataset.path, dataset.meta, dataset.action_spec = None, dict(meta or {}), action_spec
        dataset._pack(episodes)
        return dataset

    # ------------------------------------------------------------------------------------------- loading
    def _load_collected(self, verify: bool, max_episodes: int | None):
        manifest = read_manifest(self.path)
        fix = (f"Rerun the collect command that made it (see 'command' in {self.path / MANIFEST_NAME}) to regenerate "
               "the bad shard, or pass verify_checksums=False to skip the check at your own risk.")
        episodes: list[Episode] = []
        for record in manifest["shards"]:
            if max_episodes is not None and len(episodes) >= max_episodes:
                break
            if verify:
                problem = verify_shard(self.path, record)
                if problem is not None:
                    error_type = FileNotFoundError if "missing" in problem else ValueError
                    raise error_type(f"{problem}. {fix}")
            episodes.extend(load_episode_shard(self.path / record["file"]))
        spec = manifest["action_spec"]
        action_spec = (ActionSpec.discrete(spec["dim"]) if spec["kind"] == "discrete"
                       else ActionSpec.continuous(spec["low"], spec["high"]))
        return episodes[:max_episodes], manifest, action_spec

    def _load_memory_maze_offline(self, max_episodes: int | None):
        files = sorted(self.path.rglob("*.npz"))
        if not files:
            raise FileNotFoundError(f"{self.path} has neither {MANIFEST_NAME} nor any .npz episode; expected a "
                                    "collected data set or Memory Maze's offline data (one .npz per episode)")
        episodes = []
        for index, file in enumerate(files[:max_episodes]):
            fix = "Re-download or delete that file."
            with _open_npz(file, fix) as archive:
                missing = {"image", "action"} - set(archive.files)
                if missing:
                    raise ValueError(f"{file} lacks {sorted(missing)}: not a Memory Maze offline episode (keys "
                                     f"{sorted(archive.files)}); expected image, action, reward, agent_pos, agent_dir")
                frames = np.ascontiguousarray(archive["image"], dtype=np.uint8)
                # Row t of `action` is the action that led to image[t]; row 0 belongs to the reset.
                actions = archive["action"][1:].astype(np.float32)
                rewards = (archive["reward"][1:] if "reward" in archive.files
                           else np.zeros(len(actions))).astype(np.float32)
                poses = None
                if "agent_pos" in archive.files and "agent_dir" in archive.files:
                    yaw = yaw_from_direction(archive["agent_dir"].astype(np.float64))
                    poses = np.concatenate([archive["agent_pos"], yaw[:, None]], axis=1).astype(np.float32)
            episodes.append(Episode(frames, actions, rewards, poses, -1, index))
        if len({episode.poses is None for episode in episodes}) > 1:
            raise ValueError(f"some episodes in {self.path} have agent_pos/agent_dir and some do not")
        meta = {"source": "memory_maze_offline", "path": str(self.path), "files": [f.name for f in files[:max_episodes]]}
        return episodes, meta, ActionSpec.discrete(episodes[0].actions.shape[1])

    def _pack(self, episodes: list[Episode]) -> None:
        """Copy all episodes into contiguous buffers so clips are gathered with one fancy index."""
        frame_shape = episodes[0].frames.shape[1:]
        action_dim = episodes[0].actions.shape[1]
        for episode in episodes:
            if episode.frames.shape[1:] != frame_shape or episode.actions.shape[1] != action_dim:
                raise ValueError(f"episode {episode.index} has frames {episode.frames.shape[1:]} / action dim "
                                 f"{episode.actions.shape[1]}, others {frame_shape} / {action_dim}")
        has_poses = all(episode.poses is not None for episode in episodes)
        lengths = np.array([episode.actions.shape[0] for episode in episodes], dtype=np.int64)
        self.episode_lengths = lengths
        self._frame_offsets = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
        self._action_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._all_frames = np.empty((self._frame_offsets[-1], *frame_shape), dtype=np.uint8)
        self._all_actions = np.empty((self._action_offsets[-1], action_dim), dtype=np.float32)
        self._all_poses = np.empty((self._frame_offsets[-1], 3), dtype=np.float32) if has_poses else None
        self.frames, self.actions, self.rewards, self.seeds = [], [], [], []
        self.poses: list[np.ndarray] | None = [] if has_poses else None
        for k, episode in enumerate(episodes):
            frame_slice = slice(self._frame_offsets[k], self._frame_offsets[k + 1])
            action_slice = slice(self._action_offsets[k], self._action_offsets[k + 1])
            self._all_frames[frame_slice] = episode.frames
            self._all_actions[action_slice] = episode.actions
            self.frames.append(self._all_frames[frame_slice])
            self.actions.append(self._all_actions[action_slice])
            self.rewards.append(np.asarray(episode.rewards, dtype=np.float32))
            self.seeds.append(int(episode.seed))
            if has_poses:
                self._all_poses[frame_slice] = episode.poses
                self.poses.append(self._all_poses[frame_slice])

    # ------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_steps(self) -> int:
        """Total number of actions (transitions) in the data set."""
        return int(self.episode_lengths.sum())

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
        """Random contiguous clips of ``length`` frames, uniform over all valid clip starts.

        Returns:
            ``frames`` (B, L, H, W, 3) uint8, ``actions`` (B, L - 1, A) float32 where ``actions[:, i]``
            leads from ``frames[:, i]`` to ``frames[:, i + 1]``, ``poses`` (B, L, 3) float32 or None,
            ``episode`` (B,) int64 and ``start`` (B,) int64 (frame index of each clip's first frame).
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        if batch_size <= 0 or length < 1:
            raise ValueError(f"batch_size must be >= 1 and length >= 1, got {batch_size} and {length}")
        starts_per_episode = np.maximum(self.episode_lengths + 1 - length + 1, 0)
        total_starts = int(starts_per_episode.sum())
        if total_starts == 0:
            raise ValueError(f"no episode has {length} frames (longest: {int(self.episode_lengths.max()) + 1}); "
                             "ask for shorter clips or collect longer episodes")
        # Uniform over all (episode, start) pairs: draw a flat index and locate its episode.
        flat = rng.integers(0, total_starts, size=batch_size)
        cumulative = np.cumsum(starts_per_episode)
        episode = np.searchsorted(cumulative, flat, side="right")
        start = flat - (cumulative[episode] - starts_per_episode[episode])
        steps = np.arange(length)
        frame_index = (self._frame_offsets[episode] + start)[:, None] + steps
        action_index = (self._action_offsets[episode] + start)[:, None] + steps[:-1]
        return {
            "frames": self._all_frames[frame_index],
            "actions": self._all_actions[action_index],
            "poses": None if self._all_poses is None else self._all_poses[frame_index],
            "episode": episode.astype(np.int64),
            "start": start.astype(np.int64),
        }
