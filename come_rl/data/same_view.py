"""Clips whose next view only an older frame of the window saw: what a short-term memory expert must read its window for.

In Memory Maze one step moves at most a quarter cell or turns 18 degrees, so the last frame nearly always shows most of
the next view and uniform clips rarely need anything older. The clips that do are those whose target pose lies within
``distance`` cells and ``degrees`` of heading of a context frame older than the last ``recent`` and of none of those
(a turn that comes back: left, left, right, right). They are ~10 % of the steps of the exploring policy's episodes in
a window of 16 frames; :class:`SameViewClips` makes them a chosen share of every training batch.

In a rollout the newest frames of the window are the model's own and drift, while the older real ones still hold what
was seen: :class:`StaleRecentClips` teaches that situation with real frames only, by showing a share of the clips with
their newest context frames stale (each the frame some steps before it), actions and target true.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RECENT", "SAME_VIEW_DEGREES", "SAME_VIEW_DISTANCE", "SameViewClips", "StaleRecentClips", "window_same_view"]

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


class StaleRecentClips:
    """A clip source: the clips of ``source`` with ``fraction`` of the rows (drawn from ``rng`` after the source's
    clips, so one seed gives one sequence of batches) made to look like a rollout that drifted: their newest ``r``
    context frames (``r`` uniform in 1 .. ``max_recent``) are each replaced by the frame ``s`` steps before it in the
    clip (``s`` uniform in 1 .. ``max_stale``, clamped at the clip's first frame), as a rollout's frames lag the
    motion; the older context frames, the actions, the poses and the target stay true. An STM trained on them can
    learn when its newest frames are not to be trusted and what its window's older frames (and its recall of them)
    then hold. The last context frame changes in those rows, so a residual target is the change from the stale
    frame: what a rollout's next frame must undo.

    ``told`` > 0: each clip also says how many of its newest context frames are stale (``staleness``: r / ``told``,
    0 for true rows), the context level an STM built with ``UNetConfig.staleness_levels`` = ``told`` is given, as a
    rollout tells it how many of its newest frames are imagined; true rows then teach it its one-step behaviour."""

    def __init__(self, source, fraction: float, max_recent: int, max_stale: int = 4, told: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"stale_recent_fraction must be in (0, 1] (the share of each batch), got {fraction}")
        if isinstance(max_recent, bool) or int(max_recent) != max_recent or max_recent < 1:
            raise ValueError(f"stale_recent_max must be an integer >= 1 (newest context frames made stale), got "
                             f"{max_recent}")
        if isinstance(max_stale, bool) or int(max_stale) != max_stale or max_stale < 1:
            raise ValueError(f"stale_recent_steps must be an integer >= 1 (steps a stale frame lags), got {max_stale}")
        self.source, self.fraction = source, float(fraction)
        if isinstance(told, bool) or int(told) != told or told < 0 or (told and told < max_recent):
            raise ValueError(f"told must be 0 (not told) or the STM's context length >= stale_recent_max={max_recent}, "
                             f"got {told}")
        self.max_recent, self.max_stale, self.told = int(max_recent), int(max_stale), int(told)
        self.action_spec, self.frame_size = source.action_spec, source.frame_size

    def __getattr__(self, name):  # starts() of a SameViewClips, state_dict of a data source, ...
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        clips = self.source.sample_clips(batch_size, length, rng)
        context = length - 1  # frames 0 .. length - 2 are context, the last one the target
        if self.max_recent >= context:
            raise ValueError(f"stale_recent_max={self.max_recent} leaves no true context frame in a clip of {length} "
                             f"frames ({context} context frames): use at most {context - 1}")
        rows = np.flatnonzero(rng.random(batch_size) < self.fraction)
        recent = rng.integers(1, self.max_recent + 1, len(rows))
        stale = rng.integers(1, self.max_stale + 1, len(rows))
        frames = clips["frames"].copy()
        for row, r, s in zip(rows, recent, stale):
            positions = np.arange(context - r, context)
            frames[row, positions] = clips["frames"][row, np.maximum(positions - s, 0)]
        out = {**clips, "frames": frames}
        if self.told:
            staleness = np.zeros(batch_size, np.float32)
            staleness[rows] = recent / self.told
            out["staleness"] = staleness
        return out
