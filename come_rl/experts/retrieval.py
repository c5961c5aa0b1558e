"""Pose-keyed retrieval for the spatial expert: the memorized frame seen nearest the pose to imagine.

A spatial expert built with ``retrieval`` (``UNetConfig.retrieval``) reads, as its first context slot, the frame of the
episode memory whose recorded pose is nearest the pose of the frame it predicts, and the difference of the two poses
in its conditioning. The frames after it are its ordinary (temporal) context. On a revisit the retrieved frame shows
nearly the view to predict, whatever the rollout's own frames have drifted to: memory keyed by absolute pose, as the
paper's SLTM is, read from the stored frames instead of (or beside) adapter weights. The LoRA memory of the LTM is
unchanged.

Nearness is one number: the position distance in units of ``POSITION_SCALE`` cells plus the heading difference in
units of ``HEADING_SCALE`` radians (the revisit tolerances of the consistency experiment: 0.5 cell, 45 degrees).

Training shows the expert what sampling shows it. At imagined step h of a rollout the memory ends h frames before the
predicted one, so a training clip whose target is frame t retrieves among frames ``0 .. t - 1 - g`` of its episode,
g drawn uniformly from ``0 .. max_gap - 1`` (:class:`RetrievalClips`).

Training on real context alone teaches the expert to ignore what it retrieves: one step ahead, the last real frame
(warped by the action) is a better guess than the nearest memorized view, and a rollout's own frames are always
trusted. In a rollout they drift, while the poses (from the pose model) and the retrieved view stay right. With
``stale_fraction`` > 0 a share of the clips shows exactly that: their past frames are the episode's frames s steps
earlier (s uniform in ``1 .. max_stale``), their actions and poses the true ones, so the retrieved view and the pose
difference are the trustworthy cues.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["HEADING_SCALE", "POSITION_SCALE", "RetrievalClips", "nearest_pose_index", "paired_pose_distance",
           "pose_distance"]

POSITION_SCALE = 0.5
"""cells: a position difference of this size counts 1."""
HEADING_SCALE = math.pi / 4
"""radians: a heading difference of this size counts 1."""


def pose_distance(memory_poses, query):
    """Distances (..., N) between poses ``memory_poses`` (N, 3) and ``query`` (..., 3), each (x, y, yaw): the position
    distance / ``POSITION_SCALE`` plus the wrapped heading difference / ``HEADING_SCALE``. numpy or torch in, same out."""
    memory = memory_poses[None] if query.ndim == 2 else memory_poses
    q = query[:, None] if query.ndim == 2 else query[None]
    return paired_pose_distance(memory, q)


def paired_pose_distance(a, b):
    """The distance of each pose of ``a`` to the pose of ``b`` at the same place (..., 3) -> (...); broadcasts."""
    position = (((a[..., :2] - b[..., :2]) ** 2).sum(-1)) ** 0.5
    turn = abs((a[..., 2] - b[..., 2] + math.pi) % (2 * math.pi) - math.pi)  # wrapped; numpy and torch alike
    return position / POSITION_SCALE + turn / HEADING_SCALE


def nearest_pose_index(memory_poses, query):
    """Index (B,) of the memorized pose nearest each query pose (B, 3) (the first one on ties)."""
    if len(memory_poses) == 0:
        raise ValueError("retrieval needs at least one memorized frame with a pose")
    distances = pose_distance(memory_poses, query)
    return distances.argmin(-1)


class RetrievalClips:
    """A clip source for an expert with ``retrieval``: the clips of ``source`` (a recorded data set or
    ``online:memory_maze``) with their first context frame replaced by the retrieved one.

    A clip of L frames from ``source`` is, after ``clips_to_tensors`` drops its first frame, K context frames and the
    target. Here frame 1 (the first context slot) becomes the episode's frame nearest the target's pose among frames
    ``0 .. target - 1 - g`` (g uniform in ``0 .. max_gap - 1``, drawn from the same ``rng`` after the clip), its pose
    the retrieved frame's pose and the action into it zero. With ``stale_fraction`` > 0 that share of the clips has its
    past frames (slots after the retrieved one) replaced by the frames ``s`` steps earlier, s uniform in
    ``1 .. max_stale`` (drawn after g), actions and poses unchanged: the drift of a rollout, see the module docstring.
    """

    def __init__(self, source, max_gap: int = 32, stale_fraction: float = 0.0, max_stale: int = 32,
                 blind: bool = False):
        dataset = getattr(source, "dataset", None)
        if dataset is None or getattr(dataset, "_all_poses", None) is None:
            raise ValueError("a retrieval expert trains on episodes with poses: pass a collected data set "
                             "(python -m come_rl.collect env=memory_maze ...) or data=online:memory_maze")
        if max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {max_gap}")
        if not 0.0 <= stale_fraction <= 1.0:
            raise ValueError(f"stale_fraction must be in [0, 1] (the share of clips with stale past frames), got "
                             f"{stale_fraction}")
        if max_stale < 1:
            raise ValueError(f"max_stale must be >= 1, got {max_stale}")
        self.source, self.dataset, self.max_gap = source, dataset, max_gap
        self.stale_fraction, self.max_stale = float(stale_fraction), int(max_stale)
        if blind and stale_fraction:
            raise ValueError("a blind retrieving expert has no past frames to make stale: pick one")
        self.blind = bool(blind)
        self.action_spec, self.frame_size = source.action_spec, source.frame_size

    def __getattr__(self, name):  # state_dict / load_state_dict of the wrapped source, when it has them
        if name in ("source", "dataset"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        if length < 3:
            raise ValueError(f"a retrieval clip needs >= 3 frames (a dropped one, the retrieved one, the target), got {length}")
        clips = self.source.sample_clips(batch_size, length, rng)
        gaps = rng.integers(0, self.max_gap, batch_size)
        if self.stale_fraction > 0:  # drawn only when asked: a run without it keeps the random stream it had
            stale = np.where(rng.random(batch_size) < self.stale_fraction,
                             rng.integers(1, self.max_stale + 1, batch_size), 0)
        else:
            stale = np.zeros(batch_size, dtype=np.int64)
        ds = self.dataset
        frames, actions, poses = clips["frames"].copy(), clips["actions"].copy(), clips["poses"].copy()
        for i in range(batch_size):
            offset = int(ds._frame_offsets[int(clips["episode"][i])])
            start = int(clips["start"][i])
            target = start + length - 1  # the target's index in its episode
            last = max(target - 1 - int(gaps[i]), 0)
            memory = ds._all_poses[offset:offset + last + 1]
            j = int(nearest_pose_index(memory, poses[i, -1][None])[0])
            frames[i, 1] = ds._all_frames[offset + j]
            poses[i, 1] = ds._all_poses[offset + j]
            actions[i, 0] = 0.0
            if self.blind:  # no past frames: every slot shows the retrieved view (UNetConfig.retrieval_blind)
                frames[i, 2:length - 1] = frames[i, 1]
                poses[i, 2:length - 1] = poses[i, 1]
            s = min(int(stale[i]), start + 2)  # the past frames (clip slots 2 .. length - 2), s steps earlier
            if s > 0:
                frames[i, 2:length - 1] = ds._all_frames[offset + start + 2 - s:offset + start + length - 1 - s]
        out = dict(clips, frames=frames, actions=actions, poses=poses)
        if self.stale_fraction > 0:  # what the expert is told (UNetConfig.staleness_levels): the lag / max_stale
            out["staleness"] = (np.minimum(stale, [int(c) + 2 for c in clips["start"]]) / self.max_stale).astype(np.float32)
        return out
