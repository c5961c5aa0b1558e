"""Clips whose next view only an older frame of the window saw: what a short-term memory expert must read its window for.

In Memory Maze one step moves at most a quarter cell or turns 18 degrees, so the last frame nearly always shows most of
the next view and uniform clips rarely need anything older. The clips that do are those whose target pose lies within
``distance`` cells and ``degrees`` of heading of a context frame older than the last ``recent`` and of none of those
(a turn that comes back: left, left, right, right). They are ~10 % of the steps of the exploring policy's episodes in
a window of 16 frames; :class:`SameViewClips` makes them a chosen share of every training batch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RECENT", "SAME_VIEW_DEGREES", "SAME_VIEW_DISTANCE", "SameViewClips", "window_same_view"]

SAME_VIEW_DISTANCE = 0.15
"""cells: nearly the same place (a move is at most a quarter cell)."""
SAME_VIEW_DEGREES = 10.0
"""degrees: nearly the same heading (a turn step is at most 18 degrees)."""
RECENT = 3
"""the newest context frames that do not count as "older"."""


def window_same_view(poses: np.ndarray, window: int, recent: int = RECENT, distance: float = SAME_VIEW_DISTANCE,
                     degrees: float = SAME_VIEW_DEGREES) -> np.ndarray:
    """(T,) bool for an episode's poses (T, 3) (x, y in cells, yaw in radians): whether frame t's view was seen by one
    of frames t - window .. t - recent - 1 and by none of frames t - recent .. t - 1 (within ``distance`` cells and
    ``degrees``). Frames with fewer than ``window`` frames before them are False."""
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 3:
        raise ValueError(f"poses must have shape (T, 3) (x, y, yaw), got {poses.shape}")
    if not np.isfinite(poses).all():
        raise ValueError("poses contain NaN or inf")
    if not 0 <= recent < window:
        raise ValueError(f"need 0 <= recent < window, got recent={recent}, window={window}")
    t = len(poses)
    older = np.zeros(t, bool)
    newer = np.zeros(t, bool)
    for lag in range(1, window + 1):
        if lag >= t:
            break
        close = np.linalg.norm(poses[lag:, :2] - poses[:-lag, :2], axis=1) <= distance
        turn = np.abs((poses[lag:, 2] - poses[:-lag, 2] + math.pi) % (2 * math.pi) - math.pi)
        same = close & (turn <= math.radians(degrees))
        (newer if lag <= recent else older)[lag:] |= same
    valid = np.arange(t) >= window
    return older & ~newer & valid


class SameViewClips:
    """A clip source: the clips of ``source`` (a recorded data set or ``online:memory_maze``: episodes with poses), with
    ``fraction`` of each batch (rounded) replaced by clips whose target's view only an older context frame saw
    (:func:`window_same_view` with window = clip length - 2, the context frames of a training clip).

    The replaced rows are the first ones; their (episode, start) are drawn uniformly among such clips from the same
    ``rng`` after the source's clips, so one seed gives one sequence of batches (a resumed run draws the same).
    """

    def __init__(self, source, fraction: float, recent: int = RECENT, distance: float = SAME_VIEW_DISTANCE,
                 degrees: float = SAME_VIEW_DEGREES):
        dataset = getattr(source, "dataset", None)
        if dataset is None or getattr(dataset, "_all_poses", None) is None:
            raise ValueError("same_view_fraction needs episodes with poses: pass a collected Memory Maze data set "
                             "(python -m come_rl.collect env=memory_maze ...) or data=online:memory_maze")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"same_view_fraction must be in (0, 1] (the share of each batch), got {fraction}")
        self.source, self.dataset, self.fraction = source, dataset, float(fraction)
        self.recent, self.distance, self.degrees = int(recent), float(distance), float(degrees)
        self.action_spec, self.frame_size = source.action_spec, source.frame_size
        self._starts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getattr__(self, name):  # state_dict / load_state_dict of the wrapped source, when it has them
        if name in ("source", "dataset"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def starts(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(episode, start) of every clip of ``length`` frames whose last frame's view only an older context frame saw."""
        if length not in self._starts:
            window = length - 2
            if window <= self.recent:
                raise ValueError(f"a clip of {length} frames has {window} context frames, none older than the last "
                                 f"{self.recent}: same_view_fraction needs a longer context (context_frames > {self.recent})")
            episodes, starts = [], []
            for index, poses in enumerate(self.dataset.poses):
                targets = np.flatnonzero(window_same_view(poses, window, self.recent, self.distance, self.degrees))
                targets = targets[targets >= length - 1]
                episodes.append(np.full(len(targets), index, np.int64))
                starts.append(targets - (length - 1))
            self._starts[length] = (np.concatenate(episodes), np.concatenate(starts))
            if len(self._starts[length][0]) == 0:
                raise ValueError(f"no clip of {length} frames in this data has its target's view only in an older "
                                 f"context frame; collect more or longer episodes, or set same_view_fraction=0")
        return self._starts[length]

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        clips = self.source.sample_clips(batch_size, length, rng)
        rows = int(round(self.fraction * batch_size))
        if rows == 0:
            return clips
        episodes, starts = self.starts(length)
        pick = rng.integers(0, len(episodes), rows)
        ds = self.dataset
        episode, start = episodes[pick], starts[pick]
        steps = np.arange(length)
        frame_index = (ds._frame_offsets[episode] + start)[:, None] + steps
        action_index = (ds._action_offsets[episode] + start)[:, None] + steps[:-1]
        out = {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in clips.items()}
        out["frames"][:rows] = ds._all_frames[frame_index]
        out["actions"][:rows] = ds._all_actions[action_index]
        out["poses"][:rows] = ds._all_poses[frame_index]
        out["episode"][:rows], out["start"][:rows] = episode, start
        return out
