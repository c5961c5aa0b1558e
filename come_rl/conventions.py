"""The toolkit's conventions in one module: how frames and poses are written, shared by envs, data, models and agents.

Frames: envs and agents speak uint8 (..., H, W, 3); the models speak float (..., 3, H, W) in [-1, 1]. Every conversion
goes through :func:`frames_to_tensor` and :func:`tensor_to_frames`.

Poses (the same as ``come_rl.interfaces``):

* An absolute pose is ``(x, y, yaw)`` in the world frame; yaw is the heading in radians measured
  counter-clockwise from the world x axis, wrapped to ``[-pi, pi)``.
* A relative motion at step ``t`` is ``(dx, dy, dyaw)``: the displacement from pose ``t`` to pose
  ``t + 1`` expressed in the *agent's own frame at step t* (x forward, y to the left), and the
  wrapped change of heading. Integrating the relative motions from the first pose gives the
  absolute poses back exactly (up to float rounding): that is what the spatial expert's pose
  encoder and the ATE/RPE metrics rely on.
* ``to_local_frame`` expresses poses in the frame of one *reference* pose instead (NWM's
  waypoints on RECON are of that kind: every future position in the frame of the current pose).
* The spatial expert sees a pose as the features ``(x, y, sin yaw, cos yaw)`` (:func:`pose_features`), as the authors
  feed their SLTM.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "absolute_to_relative",
    "frames_to_tensor",
    "from_local_frame",
    "pose_features",
    "relative_to_absolute",
    "tensor_to_frames",
    "to_local_frame",
    "wrap_angle",
    "yaw_from_direction",
]

# ---------------------------------------------------------------------------------------------------------- frames


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 in [0, 255], got {frames.dtype}")
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:  # torch.from_numpy warns on read-only memory (a loaded record, a broadcast view)
        frames = frames.copy()
    tensor = torch.from_numpy(frames).float().div_(127.5).sub_(1.0)
    return tensor.movedim(-1, -3)


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] (clamped) -> uint8 (..., H, W, 3), rounded to the nearest level."""
    return ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------- poses


def wrap_angle(angle: np.ndarray | float) -> np.ndarray:
    """Wrap angles (radians) to ``[-pi, pi)``; works elementwise on arrays of any shape."""
    angle = np.asarray(angle, dtype=np.float64)
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


def wrap_angle_tensor(angle: torch.Tensor) -> torch.Tensor:
    """:func:`wrap_angle` for tensors (any shape, dtype and device kept): angles (radians) to ``[-pi, pi)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def yaw_from_direction(direction: np.ndarray) -> np.ndarray:
    """Heading of a 2D direction vector: ``direction (..., 2) -> yaw (...)`` in ``[-pi, pi)``."""
    direction = np.asarray(direction, dtype=np.float64)
    if direction.shape[-1] != 2:
        raise ValueError(f"direction must have a last axis of size 2 (dx, dy), got shape {direction.shape}")
    return wrap_angle(np.arctan2(direction[..., 1], direction[..., 0]))


def _check_poses(poses: np.ndarray, name: str) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim < 1 or poses.shape[-1] != 3:
        raise ValueError(f"{name} must have a last axis of size 3 (x, y, yaw), got shape {poses.shape}")
    return poses


def absolute_to_relative(poses: np.ndarray) -> np.ndarray:
    """Absolute poses -> per-step relative motion in the agent's frame.

    Args:
        poses: ``(..., T + 1, 3)`` absolute ``(x, y, yaw)``.

    Returns:
        ``(..., T, 3)`` float64 ``(dx, dy, dyaw)``: step ``t`` rotated into the frame of pose ``t``
        (the rotation by ``-yaw_t``), ``dyaw`` wrapped to ``[-pi, pi)``.
    """
    poses = _check_poses(poses, "poses")
    if poses.ndim < 2 or poses.shape[-2] < 1:
        raise ValueError(f"poses must have shape (..., T + 1, 3) with T + 1 >= 1, got {poses.shape}")
    world_delta = poses[..., 1:, :2] - poses[..., :-1, :2]
    yaw = poses[..., :-1, 2]
    cos_yaw, sin_yaw = np.cos(yaw), np.sin(yaw)
    # R(-yaw) @ world_delta: world displacement seen from the agent's heading at step t.
    forward = cos_yaw * world_delta[..., 0] + sin_yaw * world_delta[..., 1]
    left = -sin_yaw * world_delta[..., 0] + cos_yaw * world_delta[..., 1]
    turn = wrap_angle(poses[..., 1:, 2] - poses[..., :-1, 2])
    return np.stack([forward, left, turn], axis=-1)


def relative_to_absolute(relative_motion: np.ndarray, initial_pose: np.ndarray) -> np.ndarray:
    """Integrate per-step relative motion back into absolute poses (inverse of ``absolute_to_relative``).

    Args:
        relative_motion: ``(T, 3)`` ``(dx, dy, dyaw)`` in the agent's frame at each step.
        initial_pose: ``(3,)`` absolute pose of step 0.

    Returns:
        ``(T + 1, 3)`` float64 absolute poses, the first one ``initial_pose`` (yaw wrapped).
    """
    relative_motion = _check_poses(relative_motion, "relative_motion")
    initial_pose = _check_poses(initial_pose, "initial_pose")
    if relative_motion.ndim != 2 or initial_pose.shape != (3,):
        raise ValueError(f"relative_motion must be (T, 3) and initial_pose (3,), got {relative_motion.shape} "
                         f"and {initial_pose.shape}")
    # The heading before step t is the initial yaw plus all earlier turns, so the headings come from
    # one cumulative sum and the rotations of all steps are vectorised (no Python loop over time).
    turns = relative_motion[:, 2]
    headings_before = initial_pose[2] + np.concatenate([[0.0], np.cumsum(turns)[:-1]])
    cos_yaw, sin_yaw = np.cos(headings_before), np.sin(headings_before)
    world_dx = cos_yaw * relative_motion[:, 0] - sin_yaw * relative_motion[:, 1]
    world_dy = sin_yaw * relative_motion[:, 0] + cos_yaw * relative_motion[:, 1]
    poses = np.empty((relative_motion.shape[0] + 1, 3), dtype=np.float64)
    poses[0] = initial_pose
    poses[1:, 0] = initial_pose[0] + np.cumsum(world_dx)
    poses[1:, 1] = initial_pose[1] + np.cumsum(world_dy)
    poses[1:, 2] = initial_pose[2] + np.cumsum(turns)
    poses[:, 2] = wrap_angle(poses[:, 2])
    return poses


def to_local_frame(poses: np.ndarray, reference_pose: np.ndarray) -> np.ndarray:
    """Express absolute poses in the frame of one reference pose.

    Args:
        poses: ``(..., 3)`` absolute poses.
        reference_pose: ``(3,)`` the pose whose frame is used (x forward, y left).

    Returns:
        ``(..., 3)``: positions rotated by ``-reference_yaw`` after subtracting the reference
        position; yaw as the wrapped difference to the reference yaw.
    """
    poses = _check_poses(poses, "poses")
    reference_pose = _check_poses(reference_pose, "reference_pose")
    delta = poses[..., :2] - reference_pose[:2]
    cos_yaw, sin_yaw = np.cos(reference_pose[2]), np.sin(reference_pose[2])
    local_x = cos_yaw * delta[..., 0] + sin_yaw * delta[..., 1]
    local_y = -sin_yaw * delta[..., 0] + cos_yaw * delta[..., 1]
    return np.stack([local_x, local_y, wrap_angle(poses[..., 2] - reference_pose[2])], axis=-1)


def from_local_frame(local_poses: np.ndarray, reference_pose: np.ndarray) -> np.ndarray:
    """Inverse of ``to_local_frame``: ``(..., 3)`` poses in the reference frame -> world frame."""
    local_poses = _check_poses(local_poses, "local_poses")
    reference_pose = _check_poses(reference_pose, "reference_pose")
    cos_yaw, sin_yaw = np.cos(reference_pose[2]), np.sin(reference_pose[2])
    world_x = reference_pose[0] + cos_yaw * local_poses[..., 0] - sin_yaw * local_poses[..., 1]
    world_y = reference_pose[1] + sin_yaw * local_poses[..., 0] + cos_yaw * local_poses[..., 1]
    return np.stack([world_x, world_y, wrap_angle(local_poses[..., 2] + reference_pose[2])], axis=-1)


def pose_features(poses: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., 3) poses (x, y, yaw) -> (..., 4) features (x, y, sin yaw, cos yaw), as the authors feed the SLTM; a
    tensor keeps its device, anything else becomes a CPU tensor."""
    if isinstance(poses, torch.Tensor):
        poses = poses.float()
    else:
        poses = torch.as_tensor(np.asarray(poses), dtype=torch.float32, device="cpu")
    return torch.cat([poses[..., :2], torch.sin(poses[..., 2:3]), torch.cos(poses[..., 2:3])], dim=-1)
