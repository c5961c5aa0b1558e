"""DeepMind Lab: a gymnasium maze wrapper (where ``deepmind_lab`` imports) and a DMLab-40K reader.

DeepMind Lab has no Python 3.11 wheel: it is built from source with Bazel
(https://github.com/google-deepmind/lab, ``bazel build -c opt //python/pip_package:build_pip_package``
then ``pip install`` the wheel it makes, in a Python that DeepMind Lab's build supports). Where it
is missing, ``DMLabMazeEnv`` raises ``DeepMindLabUnavailableError`` saying so; the offline reader
below needs numpy only.

Action set (``Discrete(6)``, ``ACTION_MEANINGS``): the six movement actions of a random maze
walker: forward, backward, strafe left, strafe right, look left, look right, each held for
``action_repeat`` engine frames. DMLab-40K stores actions as integer ids 0-5 (TECO's config has
``action_dim: 6``); this mapping of ids to DMLab's 7-D action vector is our choice for the online
wrapper: the public release does not document it, so do not mix online rollouts and the
offline data in one model without checking it.

DMLab-40K offline videos (TECO, Yan et al. 2022; 40k trajectories of 300 frames at 64x64):
``<root>/{train,test}/<subfolder>/<name>.npz`` with ``video`` (T, 64, 64, 3) uint8 and ``actions``
(T,) integers. ``read_dmlab_episode`` turns one file into the toolkit's convention (T frames, T - 1
one-hot actions, ``frames[t + 1]`` follows ``actions[t]``); see ``action_alignment``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from come_rl.data.episodes import Episode, save_episode_shard, shard_file_name, write_manifest
from come_rl.interfaces import ActionSpec

ACTION_MEANINGS: tuple[str, ...] = ("forward", "backward", "strafe_left", "strafe_right", "look_left", "look_right")
# DeepMind Lab's action vector: LOOK_LEFT_RIGHT_PIXELS_PER_FRAME, LOOK_DOWN_UP_PIXELS_PER_FRAME,
# STRAFE_LEFT_RIGHT, MOVE_BACK_FORWARD, FIRE, JUMP, CROUCH.
DMLAB_ACTION_VECTORS = np.array([
    [0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, -1, 0, 0, 0],
    [0, 0, -1, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0],
    [-20, 0, 0, 0, 0, 0, 0],
    [20, 0, 0, 0, 0, 0, 0],
], dtype=np.intc)
DMLAB40K_NUM_ACTIONS = 6

_HOW_TO_GET_DMLAB = (
    "DeepMind Lab (the `deepmind_lab` module) is not installed, and there is no wheel for this Python. Build it "
    "from source: git clone https://github.com/google-deepmind/lab && cd lab && bazel build -c opt "
    "//python/pip_package:build_pip_package && ./bazel-bin/python/pip_package/build_pip_package /tmp/dmlab_pkg && "
    "pip install /tmp/dmlab_pkg/deepmind_lab-*.whl (needs Bazel, a C toolchain and a Python version the DeepMind "
    "Lab build supports). Without it you can still train on the DMLab-40K offline videos with "
    "envs.dmlab.read_dmlab_episode / DMLab40kDataset."
)


class DeepMindLabUnavailableError(ImportError):
    """Raised when the DMLab wrapper is used where ``deepmind_lab`` cannot be imported."""


def _import_deepmind_lab():
    try:
        import deepmind_lab
    except ImportError as error:
        raise DeepMindLabUnavailableError(_HOW_TO_GET_DMLAB) from error
    return deepmind_lab


class DMLabMazeEnv(gym.Env):
    """A DeepMind Lab maze level as a gymnasium env: uint8 (64, 64, 3) frames, ``Discrete(6)``.

    Args:
        level: DMLab level script, e.g. ``"nav_maze_random_goal_01"`` or
            ``"contributed/dmlab30/explore_goal_locations_small"``.
        image_size: square frame size.
        action_repeat: engine frames per action (DMLab runs at 60 fps).
        max_episode_steps: truncation (agent steps).
    ``info["pose"]``: ``(x, y, yaw)`` from DEBUG.POS.TRANS / DEBUG.POS.ROT when the level exposes them.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}  # noqa: RUF012 (gymnasium convention)

    def __init__(self, level: str = "nav_maze_random_goal_01", image_size: int = 64, action_repeat: int = 4,
                 max_episode_steps: int = 300, render_mode: str | None = "rgb_array"):
        deepmind_lab = _import_deepmind_lab()
        if action_repeat < 1 or max_episode_steps < 1:
            raise ValueError("action_repeat and max_episode_steps must be >= 1")
        self.level, self.image_size, self.action_repeat = level, int(image_size), int(action_repeat)
        self.max_episode_steps, self.render_mode = int(max_episode_steps), render_mode
        observations = ["RGB_INTERLEAVED", "DEBUG.POS.TRANS", "DEBUG.POS.ROT"]
        self._lab = deepmind_lab.Lab(level, observations, config={"width": str(image_size),
                                                                  "height": str(image_size), "fps": "60"})
        self.observation_space = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.action_space = spaces.Discrete(len(ACTION_MEANINGS))
        self.action_spec = ActionSpec.discrete(len(ACTION_MEANINGS))
        self._frame = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        self._info: dict[str, Any] = {}
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        super().reset(seed=seed)
        self._lab.reset(seed=int(self.np_random.integers(0, 2**31 - 1)))
        self._steps = 0
        self._read_observations()
        return self._frame.copy(), dict(self._info)

    def step(self, action):
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or not 0 <= action < 6:
            raise ValueError(f"action must be an int in [0, 6) {ACTION_MEANINGS}, got {action!r}")
        reward = float(self._lab.step(DMLAB_ACTION_VECTORS[int(action)], num_steps=self.action_repeat))
        self._steps += 1
        terminated = not self._lab.is_running()
        if not terminated:
            self._read_observations()
        truncated = self._steps >= self.max_episode_steps and not terminated
        return self._frame.copy(), reward, terminated, truncated, dict(self._info)

    def render(self):
        return self._frame.copy() if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        self._lab.close()

    def _read_observations(self) -> None:
        observations = self._lab.observations()
        self._frame = np.asarray(observations["RGB_INTERLEAVED"], dtype=np.uint8)
        info: dict[str, Any] = {}
        if "DEBUG.POS.TRANS" in observations and "DEBUG.POS.ROT" in observations:
            translation, rotation = observations["DEBUG.POS.TRANS"], observations["DEBUG.POS.ROT"]
            # DMLab's ROT is (pitch, yaw, roll) in degrees.
            info["pose"] = np.array([translation[0], translation[1], np.deg2rad(rotation[1])], dtype=np.float32)
        self._info = info


# --------------------------------------------------------------------------------------- offline data
def read_dmlab_episode(path: str | os.PathLike, action_alignment: str = "led_to",
                       num_actions: int = DMLAB40K_NUM_ACTIONS) -> tuple[np.ndarray, np.ndarray]:
    """One DMLab-40K ``.npz`` -> ``(frames (T, H, W, 3) uint8, actions (T - 1, num_actions) float32 one-hot)``.

    Args:
        action_alignment: ``"led_to"``: ``actions[t]`` is the action that produced ``video[t]``
            (``actions[0]`` belongs to the first frame and is dropped; the reading of TECO's loader,
            which conditions frame t on action t); ``"taken_after"``: ``actions[t]`` was taken at
            ``video[t]`` (the last one is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DMLab-40K episode {path} does not exist")
    if action_alignment not in ("led_to", "taken_after"):
        raise ValueError(f"action_alignment must be 'led_to' or 'taken_after', got {action_alignment!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "video" not in archive.files or "actions" not in archive.files:
                raise ValueError(f"{path} must contain 'video' and 'actions' (TECO's DMLab format), has "
                                 f"{sorted(archive.files)}")
            video, actions = archive["video"], archive["actions"]
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz ({error}); re-download or delete it") from error
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{path}: video must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    actions = np.asarray(actions).reshape(-1)
    if actions.shape[0] != video.shape[0]:
        raise ValueError(f"{path}: {video.shape[0]} frames but {actions.shape[0]} actions (TECO stores one per frame)")
    if not np.issubdtype(actions.dtype, np.integer) or actions.min() < 0 or actions.max() >= num_actions:
        raise ValueError(f"{path}: actions must be integers in [0, {num_actions}), got {actions.dtype} "
                         f"in [{actions.min()}, {actions.max()}]")
    kept = actions[1:] if action_alignment == "led_to" else actions[:-1]
    one_hot = np.zeros((kept.shape[0], num_actions), np.float32)
    one_hot[np.arange(kept.shape[0]), kept] = 1.0
    return video, one_hot


def find_dmlab_episodes(root: str | os.PathLike, split: str = "train") -> list[Path]:
    """All episode files of a split: ``<root>/<split>/*/*.npz`` (sorted)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not (root / split).is_dir():
        raise FileNotFoundError(f"{root / split} does not exist; pass the DMLab-40K root that holds train/ and test/ "
                                "(TECO's release, scripts/download/dmlab.sh)")
    files = sorted((root / split).glob("*/*.npz"))
    if not files:
        raise FileNotFoundError(f"no episodes matching {root / split}/*/*.npz")
    return files


def write_dmlab_shards_to_episode_dataset(root: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                                          max_episodes: int | None = None, episodes_per_shard: int = 16) -> Path:
    """Convert DMLab-40K episodes into a ``come_rl.data`` directory (shards + manifest) for training."""
    from tqdm import tqdm


    files = find_dmlab_episodes(root, split)[:max_episodes]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, batch = [], []
    for index, file in enumerate(tqdm(files, desc="DMLab-40K -> shards", unit="ep")):
        frames, actions = read_dmlab_episode(file)
        batch.append(Episode(frames, actions, np.zeros(len(actions), np.float32), None, -1, index))
        if len(batch) == episodes_per_shard or index == len(files) - 1:
            records.append(save_episode_shard(out / shard_file_name(batch[0].index, batch[-1].index + 1), batch))
            batch = []
    frame_shape = list(read_dmlab_episode(files[0])[0].shape[1:])
    write_manifest(out, {"identity": {"source": "dmlab40k", "split": split}, "env": "dmlab40k", "shards": records,
                         "total_episodes": len(files), "frame_shape": frame_shape, "has_poses": False,
                         "action_spec": {"kind": "discrete", "dim": DMLAB40K_NUM_ACTIONS,
                                         "meanings": list(ACTION_MEANINGS)},
                         "complete": True, "command": f"envs.dmlab.write_dmlab_shards_to_episode_dataset({str(root)!r})"})
    return out
