"""ATE and RPE with evo, in the convention of Navigation World Models (NWM) by default.

NWM's evaluation (and the CoME paper's RECON table) reports
- ATE: evo's APE of the translation part, RMSE over the poses, no alignment;
- RPE: evo's RPE of the translation part, delta = 1 frame, consecutive pairs, RMSE;
in the units of the input positions (NWM: waypoint spacings of 0.25 m).

Poses are `(T, 3)` arrays of planar (x, y, yaw) with yaw in radians, or `(T, 4, 4)` SE(3) matrices.
Only `evo.core` is imported: `evo.tools.settings` (also pulled in by `evo.tools.plot`) writes
`~/.evo` on import.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
from evo.core import lie_algebra, metrics
from evo.core.geometry import GeometryException
from evo.core.trajectory import PoseTrajectory3D
from evo.core.units import Unit

AlignMode = Literal["se3", "sim3", "origin"] | None
_ALIGN_MODES = (None, "se3", "sim3", "origin")


def planar_poses_to_se3(poses_xy_yaw: np.ndarray) -> np.ndarray:
    """(T, 3) planar poses (x, y, yaw [rad]) -> (T, 4, 4) SE(3) matrices (rotation about z, z = 0)."""
    poses_xy_yaw = np.asarray(poses_xy_yaw, dtype=np.float64)
    if poses_xy_yaw.ndim != 2 or poses_xy_yaw.shape[1] != 3:
        raise ValueError(f"planar poses must have shape (T, 3) = (x, y, yaw), got {poses_xy_yaw.shape}")
    cos_yaw, sin_yaw = np.cos(poses_xy_yaw[:, 2]), np.sin(poses_xy_yaw[:, 2])
    matrices = np.tile(np.eye(4), (len(poses_xy_yaw), 1, 1))
    matrices[:, 0, 0], matrices[:, 0, 1] = cos_yaw, -sin_yaw
    matrices[:, 1, 0], matrices[:, 1, 1] = sin_yaw, cos_yaw
    matrices[:, 0, 3], matrices[:, 1, 3] = poses_xy_yaw[:, 0], poses_xy_yaw[:, 1]
    return matrices


def _to_se3(poses: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(poses, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf; drop or interpolate those poses first")
    if array.ndim == 2 and array.shape[1] == 3:
        return planar_poses_to_se3(array)
    if array.ndim == 3 and array.shape[1:] == (4, 4):
        for index, matrix in enumerate(array):
            if not lie_algebra.is_se3(matrix):
                raise ValueError(f"{name}[{index}] is not a valid SE(3) matrix (orthonormal rotation, last row "
                                 "[0, 0, 0, 1])")
        return array
    raise ValueError(f"{name} must be (T, 3) planar poses (x, y, yaw) or (T, 4, 4) SE(3) matrices, got shape "
                     f"{array.shape}")


def _trajectory_pair(estimate: np.ndarray, reference: np.ndarray,
                     min_poses: int) -> tuple[PoseTrajectory3D, PoseTrajectory3D]:
    estimate_se3 = _to_se3(estimate, "estimate")
    reference_se3 = _to_se3(reference, "reference")
    if len(estimate_se3) != len(reference_se3):
        raise ValueError(f"estimate has {len(estimate_se3)} poses and reference {len(reference_se3)}; they must be "
                         "sampled at the same frames (same length)")
    if len(estimate_se3) < min_poses:
        raise ValueError(f"need at least {min_poses} poses, got {len(estimate_se3)}")
    # Both are sampled at the same frames, so frame indices serve as timestamps (no syncing needed).
    timestamps = np.arange(len(estimate_se3), dtype=np.float64)
    return (PoseTrajectory3D(poses_se3=list(estimate_se3), timestamps=timestamps),
            PoseTrajectory3D(poses_se3=list(reference_se3), timestamps=timestamps.copy()))


def _align(estimate: PoseTrajectory3D, reference: PoseTrajectory3D, align: AlignMode) -> PoseTrajectory3D:
    if align not in _ALIGN_MODES:
        raise ValueError(f"align must be one of {_ALIGN_MODES}, got {align!r}")
    if align is None:
        return estimate
    aligned = copy.deepcopy(estimate)  # evo aligns in place; callers' trajectories stay untouched
    try:
        if align == "origin":
            aligned.align_origin(reference)
        else:
            aligned.align(reference, correct_scale=(align == "sim3"))
    except GeometryException as error:
        raise ValueError(f"Umeyama alignment ({align}) failed: {error}; the reference path is degenerate (all "
                         "positions on one straight line or one point); use align=None or 'origin'") from error
    return aligned


def absolute_trajectory_error(estimate: np.ndarray, reference: np.ndarray, align: AlignMode = None) -> float:
    """ATE: RMSE of the position error, evo APE (translation part).

    Args:
        estimate, reference: (T, 3) planar poses (x, y, yaw) or (T, 4, 4) SE(3) poses, same T >= 1.
        align: None (NWM's convention), 'origin' (first poses made equal), 'se3' (Umeyama rigid) or
            'sim3' (Umeyama with scale); alignment moves the estimate onto the reference.
    Returns:
        sqrt(mean_t |p_est(t) - p_ref(t)|^2), in the units of the positions.
    """
    min_poses = 3 if align in ("se3", "sim3") else 1
    estimate_trajectory, reference_trajectory = _trajectory_pair(estimate, reference, min_poses)
    estimate_trajectory = _align(estimate_trajectory, reference_trajectory, align)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((reference_trajectory, estimate_trajectory))
    return float(ape.get_statistic(metrics.StatisticsType.rmse))


def relative_pose_error(estimate: np.ndarray, reference: np.ndarray, delta: int = 1,
                        align: AlignMode = None) -> float:
    """RPE: RMSE of the translation of the relative-motion error, evo RPE over consecutive pairs.

    Over evo's consecutive, non-overlapping pairs (0, d), (d, 2d), ... with d = delta:
    E_i = (Q_i^-1 Q_{i+d})^-1 (P_i^-1 P_{i+d}) with reference Q and estimate P; the error is
    |translation(E_i)| = |m_P(i) - m_Q(i)|, where m is the motion from frame i to i + d expressed in that
    path's own pose at i (so a constant offset between the paths gives 0, a heading error does not).

    Args:
        estimate, reference: (T, 3) or (T, 4, 4), same T >= delta + 1.
        delta: frame gap of the pairs (NWM: 1).
        align: as in `absolute_trajectory_error` (RPE is invariant to 'origin' and 'se3'; 'sim3' rescales).
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)) or delta < 1:
        raise ValueError(f"delta must be a positive integer number of frames, got {delta!r}")
    min_poses = max(int(delta) + 1, 3 if align in ("se3", "sim3") else 1)
    estimate_trajectory, reference_trajectory = _trajectory_pair(estimate, reference, min_poses)
    estimate_trajectory = _align(estimate_trajectory, reference_trajectory, align)
    rpe = metrics.RPE(metrics.PoseRelation.translation_part, delta=int(delta), delta_unit=Unit.frames,
                      all_pairs=False)
    rpe.process_data((reference_trajectory, estimate_trajectory))
    return float(rpe.get_statistic(metrics.StatisticsType.rmse))
