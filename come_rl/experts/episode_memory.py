"""The episode store: every frame, action and pose the world model has observed in the current episode.

It is the short-term context (its last frames) and the long-term memory's training set (clips drawn from it are what
``memorize`` fine-tunes the LoRA adapters on). It lives on the CPU whatever the model's device (agents and experiments
read it; an episode's frames are small): the experts move the clips and contexts they are given to their own device.
"""

from __future__ import annotations

import numpy as np
import torch

from come_rl.conventions import frames_to_tensor
from come_rl.interfaces import ActionSpec

CPU = torch.device("cpu")


class EpisodeMemory:
    """Frames (T, C, H, W) in [-1, 1], actions (T, A) (row t = the action that led to frame t; row 0 zeros) and
    poses (T, 3) or None, grown one observation at a time."""

    def __init__(self, frame_shape: tuple[int, int, int], action_spec: ActionSpec):
        self.frame_shape, self.action_spec = tuple(frame_shape), action_spec
        self.clear()

    def clear(self) -> None:
        self._frames: list[torch.Tensor] = []
        self._actions: list[torch.Tensor] = []
        self._poses: list[torch.Tensor | None] = []

    def truncate(self, length: int) -> None:
        """Forget every observation after the first ``length`` (used to undo probe observations)."""
        del self._frames[length:], self._actions[length:], self._poses[length:]

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, frame: torch.Tensor, action: torch.Tensor, pose: torch.Tensor | None) -> None:
        if self._poses and (pose is None) != (self._poses[-1] is None):
            raise ValueError("give a pose with every observation of an episode or with none")
        self._frames.append(frame)
        self._actions.append(action)
        self._poses.append(pose)

    @property
    def frames(self) -> torch.Tensor:
        return torch.stack(self._frames)

    @property
    def actions(self) -> torch.Tensor:
        return torch.stack(self._actions)

    @property
    def poses(self) -> torch.Tensor | None:
        return None if not self._poses or self._poses[0] is None else torch.stack(self._poses)

    def last(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The last ``count`` frames, actions, poses; an episode shorter than that is padded by repeating its first
        observation with a zero action (the agent standing still), so experts always see full contexts."""
        if not self._frames:
            raise RuntimeError("the episode memory is empty: call WorldModel.observe(first_frame) after reset()")
        # only the last ``count`` observations are stacked: a long episode must not be copied at every imagine
        frames, actions = torch.stack(self._frames[-count:]), torch.stack(self._actions[-count:])
        poses = None if not self._poses or self._poses[0] is None else torch.stack(self._poses[-count:])
        missing = count - frames.shape[0]
        if missing > 0:
            frames = torch.cat([frames[:1].expand(missing, *frames.shape[1:]), frames])
            actions = torch.cat([torch.zeros(missing, actions.shape[1], device=actions.device), actions])
            if poses is not None:
                poses = torch.cat([poses[:1].expand(missing, *poses.shape[1:]), poses])
        return frames, actions, poses

    def sample_clips(self, batch_size: int, length: int, window: int | None = None,
                     generator: torch.Generator | None = None, change_weighting: float = 0.0, pad_start: bool = True,
                     pad_end: bool = False):
        """Random clips of ``length`` consecutive observations from the last ``window`` ones (all if None).

        ``change_weighting`` in [0, 1]: that fraction of the clips is drawn with probability proportional to how much
        the clip's last frame differs from the frame before it (mean absolute change), the rest uniformly. Under the
        residual parametrisation a clip whose frame does not change teaches the memory nothing about the episode's
        content, so weighting by change spends memorization steps where the episode's facts are (a tile uncovered,
        a room entered).

        ``pad_start``: clips may begin up to length - 2 frames before the episode (the first frame repeated with zero
        actions, as ``last`` pads), so that the episode's second frame is a target too.
        ``pad_end``: clips may end up to length - 2 frames after the episode (the last frame repeated with zero
        actions), so that time-reversed clips reach the episode's last transitions too.

        Returns frames (B, length, C, H, W), actions (B, length, A), poses (B, length, 3) or None.
        """
        total = len(self)
        if total < length:
            raise ValueError(f"the episode memory holds {total} frames, fewer than the {length} a training clip needs; "
                             f"observe more frames before memorize()")
        if not 0.0 <= change_weighting <= 1.0:
            raise ValueError(f"change_weighting must lie in [0, 1], got {change_weighting}")
        # Clips may begin before the episode (padded as ``last`` pads: the first frame repeated, zero actions), so that
        # every frame but the first is a target, as every frame is a prediction of imagine from the episode's start.
        earliest = -(length - 2) if pad_start else 0
        first = earliest if window is None else max(earliest, total - window)
        latest = total - 2 if pad_end and length >= 2 else total - length  # the last start a clip may have
        starts = torch.randint(first, latest + 1, (batch_size,), generator=generator, device=CPU)
        actions, poses = self.actions, self.poses  # small; the frames are gathered clip by clip (_gather)
        weighted = int(round(change_weighting * batch_size))
        if weighted:
            candidates = torch.arange(first, latest + 1, device=CPU)
            last = (candidates + length - 1).clamp(1, total - 1)
            change = (self.gather(last) - self.gather(last - 1)).abs().mean(dim=(1, 2, 3))
            if change.sum() > 0:
                picks = torch.multinomial(change / change.sum(), weighted, replacement=True, generator=generator)
                starts[:weighted] = candidates[picks]
        index = starts[:, None] + torch.arange(length, device=CPU)
        padded = (index < 0) | (index >= total)
        index = index.clamp(0, total - 1)
        clip_actions = actions[index]
        clip_actions[padded] = 0.0
        return self.gather(index), clip_actions, None if poses is None else poses[index]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The frames at ``index`` (any shape) as one tensor (*index.shape, C, H, W): only those frames are copied, so
        a memorization step costs the same at frame 50 and at frame 5000 of an episode (and so does its memory)."""
        flat = index.reshape(-1).tolist()
        return torch.stack([self._frames[i] for i in flat]).reshape(*index.shape, *self._frames[0].shape)

    def sample_reversed_clips(self, batch_size: int, length: int, inverse_actions, window: int | None = None,
                              generator: torch.Generator | None = None, pad_end: bool = False):
        """Clips of ``length`` observations played backwards in time, for worlds that declare themselves reversible.

        ``inverse_actions[a]`` is the discrete action that undoes action ``a`` (Memory Cards: up <-> down,
        left <-> right, toggle <-> toggle). A forward clip of length + 1 is reversed and its first frame dropped, so
        every remaining frame has the (inverted) action that led to it. Reversed, "a tile is covered" becomes "a tile
        is uncovered": the memory learns what a tile hides from an episode that only ever covered it.
        ``pad_end``: the reversed context may run past the episode's end (the last frame repeated, zero actions, as an
        episode's start is padded), so the episode's last transitions are reversed too: without it, a transition in the
        last length - 1 steps (in a Memory Cards zig-zag, covering the last tiles) never becomes a target.
        """
        if self.action_spec.kind != "discrete":
            raise ValueError("time-reversed clips need a discrete action space with declared inverse actions")
        inverse = torch.as_tensor(list(inverse_actions), dtype=torch.long, device=CPU)
        if inverse.shape != (self.action_spec.dim,) or inverse.min() < 0 or inverse.max() >= self.action_spec.dim:
            raise ValueError(f"inverse_actions must map each of the {self.action_spec.dim} actions to an action index, "
                             f"got {list(inverse_actions)}")
        frames, actions, poses = self.sample_clips(batch_size, length + 1, window, generator, pad_start=False,
                                                   pad_end=pad_end)
        # Reversed clip g_j = f_{L-j}; the action from g_{j-1} = f_{L-j+1} to g_j is inverse(a_{L-j+1}).
        frames = frames.flip(1)[:, 1:]
        original = actions.argmax(-1).flip(1)[:, :-1]  # a_{L}, a_{L-1}, ..., a_1 for g_1 .. g_L
        padded = (actions.abs().sum(-1) == 0).flip(1)[:, :-1]  # past the episode's end: no action, none inverted
        actions = torch.nn.functional.one_hot(inverse[original], self.action_spec.dim).float()
        actions[padded] = 0.0
        return frames, actions, None if poses is None else poses.flip(1)[:, 1:]

    def sample_revisit_clips(self, batch_size: int, length: int, pose_model, tolerance: float = 0.25,
                             yaw_tolerance: float = 0.5, generator: torch.Generator | None = None):
        """Clips that pair a context with a view of the same place from another time of the episode, keyed by pose.

        For a context ending at frame k and an action a, ``pose_model(pose_k, a)`` says where a leads; the target is a
        frame j != k, j != k + 1 of the episode whose pose lies within ``tolerance`` (position) and ``yaw_tolerance``
        (radians) of it. So the memory is asked to predict what the place looked like when the agent was there before
        or after, which is how a world model learns what a view hides now but showed once. Discrete action spaces try
        every action; continuous ones the episode's own actions. With ``pose_model=None`` the recorded step is used
        instead: the action taken after the context and the real pose it led to, so any world that records poses has
        revisit clips (Memory Maze, whose ball keeps momentum). Returns None when no (context, action) has a revisit.
        """
        poses = self.poses
        if poses is None:
            raise ValueError("revisit clips need poses: observe(frame, action, pose) every frame")
        total, k = len(self), length - 1
        if total < length:
            raise ValueError(f"the episode memory holds {total} frames, fewer than the {length} a clip needs")
        ends = torch.arange(k - 1, total, device=CPU)  # the context's last frame
        if pose_model is None:
            # The recorded step instead of a model: the action taken after each context and the pose it led to (a
            # world with momentum, such as Memory Maze, has no pose model of the pose alone). The last frame has none.
            ends = ends[:-1]
            candidates = self.actions[ends + 1]
            n_end, n_act = len(ends), 1
            next_poses = poses[ends + 1].float()
        else:
            if self.action_spec.kind == "discrete":
                candidates = torch.eye(self.action_spec.dim, device=CPU)
            else:
                candidates = torch.unique(self.actions[1:], dim=0)
            n_end, n_act = len(ends), len(candidates)
            with torch.no_grad():
                next_poses = pose_model(poses[ends].repeat_interleave(n_act, 0), candidates.repeat(n_end, 1)).float()
        position = torch.cdist(next_poses[:, :2], poses[:, :2])  # (n_end * n_act, total)
        yaw = torch.remainder(next_poses[:, 2:3] - poses[None, :, 2] + torch.pi, 2 * torch.pi) - torch.pi
        match = (position <= tolerance) & (yaw.abs() <= yaw_tolerance)
        end_index = ends.repeat_interleave(n_act)
        frame_index = torch.arange(total, device=CPU)[None]
        match &= (frame_index != end_index[:, None]) & (frame_index != end_index[:, None] + 1)
        pairs = match.nonzero()
        if len(pairs) == 0:
            return None
        picks = pairs[torch.randint(0, len(pairs), (batch_size,), generator=generator, device=CPU)]
        row, target = picks[:, 0], picks[:, 1]
        end, action = end_index[row], candidates[row if pose_model is None else row % n_act]
        context = end[:, None] - torch.arange(k - 1, -1, -1, device=CPU)[None]  # (B, k) frame indices, oldest first
        actions = self.actions
        clip_frames = torch.cat([self.gather(context), self.gather(target)[:, None]], dim=1)
        clip_actions = torch.cat([actions[context], action[:, None]], dim=1)
        clip_poses = torch.cat([poses[context], next_poses[row][:, None]], dim=1)
        return clip_frames, clip_actions, clip_poses


def to_frame_tensor(frame, frame_shape: tuple[int, int, int]) -> torch.Tensor:
    """A uint8 (H, W, 3) array or a float (3, H, W) tensor in [-1, 1] -> float (3, H, W), validated."""
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8:
            raise ValueError(f"numpy frames must be uint8 (H, W, 3) in [0, 255], got dtype {frame.dtype}")
        if frame.shape != (frame_shape[1], frame_shape[2], frame_shape[0]):
            raise ValueError(f"frame has shape {frame.shape}, this world model takes "
                             f"{(frame_shape[1], frame_shape[2], frame_shape[0])}; resize it or load a model for it")
        return frames_to_tensor(frame).contiguous()
    if isinstance(frame, torch.Tensor):
        if tuple(frame.shape) != tuple(frame_shape):
            raise ValueError(f"frame tensor has shape {tuple(frame.shape)}, expected {tuple(frame_shape)} (C, H, W)")
        frame = frame.detach().float().cpu()  # the episode memory lives on the CPU
        if not torch.isfinite(frame).all():
            raise ValueError("frame contains NaN or inf")
        if frame.min() < -1.001 or frame.max() > 1.001:
            raise ValueError("float frames must lie in [-1, 1]; pass uint8 arrays for [0, 255] images")
        return frame
    raise TypeError(f"a frame must be a uint8 numpy array or a float tensor, got {type(frame).__name__}")


class PlaceMemory:
    """The places a world model has memorized: every frame it memorized, with the pose it was seen from, kept across
    the segments of an episode (``begin_segment`` empties the short-term store, not this) and emptied at ``reset``.

    It is the long-term memory's index by place: the adapters hold what the frames looked like, this holds where they
    were seen, so a planner can ask where a goal view was seen and which way led there
    (``planners.objectives.PlaceObjective``). A model without a long-term memory memorizes nothing and has no places.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._frames: list[torch.Tensor] = []
        self._poses: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frames: torch.Tensor, poses: torch.Tensor) -> None:
        """frames (N, C, H, W) in [-1, 1] and poses (N, 3), in the order they were seen."""
        if len(frames) != len(poses):
            raise ValueError(f"PlaceMemory.add got {len(frames)} frames and {len(poses)} poses; give one pose per frame")
        self._frames.extend(frames.to(CPU))
        self._poses.extend(poses.to(CPU, torch.float64))

    @property
    def frames(self) -> torch.Tensor:
        return torch.stack(self._frames)

    @property
    def poses(self) -> np.ndarray:
        return torch.stack(self._poses).numpy()
