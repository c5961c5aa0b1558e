"""ATE / RPE (evo, NWM convention) against closed-form and hand-computed values."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from come_rl.metrics.trajectory import absolute_trajectory_error, planar_poses_to_se3, relative_pose_error


def straight_reference(length: int = 8) -> np.ndarray:
    """(length, 3) poses moving +1 in x per frame, heading 0."""
    poses = np.zeros((length, 3))
    poses[:, 0] = np.arange(length)
    return poses


def curved_reference(length: int = 12) -> np.ndarray:
    t = np.arange(length, dtype=np.float64)
    return np.stack([np.cos(0.3 * t) * (2 + 0.2 * t), np.sin(0.3 * t) * (2 + 0.2 * t), 0.3 * t + 0.5], axis=1)


def test_identical_paths_give_zero() -> None:
    reference = curved_reference()
    assert absolute_trajectory_error(reference, reference.copy()) == pytest.approx(0.0, abs=1e-12)
    assert relative_pose_error(reference, reference.copy()) == pytest.approx(0.0, abs=1e-12)


def test_constant_offset_gives_its_length_as_ate_and_zero_rpe() -> None:
    reference = curved_reference()
    estimate = reference.copy()
    estimate[:, :2] += [0.3, -0.4]
    assert absolute_trajectory_error(estimate, reference) == pytest.approx(0.5, abs=1e-12)  # |(0.3, -0.4)|
    assert relative_pose_error(estimate, reference) == pytest.approx(0.0, abs=1e-12)


def test_hand_made_eight_step_case() -> None:
    reference = straight_reference(8)
    # Position errors e_t = estimate - reference; headings stay 0 in both paths.
    errors = np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.1], [0.2, 0.3],
                       [0.0, 0.4], [-0.2, 0.4], [-0.3, 0.2], [-0.3, 0.0]])
    estimate = reference.copy()
    estimate[:, :2] += errors
    # ATE: |e_t|^2 = 0, .01, .05, .13, .16, .20, .13, .09; sum .77; mean .77 / 8 = .09625.
    assert absolute_trajectory_error(estimate, reference) == pytest.approx(math.sqrt(0.09625), abs=1e-12)
    # RPE (delta 1): with heading 0 everywhere, the error of pair (i, i+1) is |e_{i+1} - e_i|:
    # steps (.1,0) (.1,.1) (0,.2) (-.2,.1) (-.2,0) (-.1,-.2) (0,-.2); squares .01 .02 .04 .05 .04 .05 .04;
    # sum .25 over 7 pairs.
    assert relative_pose_error(estimate, reference) == pytest.approx(math.sqrt(0.25 / 7), abs=1e-12)
    # delta 2: evo's consecutive pairs do not overlap: (0,2) (2,4) (4,6), errors |e_{i+2} - e_i| =
    # |(.2,.1)| |(-.2,.3)| |(-.3,-.2)|; squares .05 .13 .13; sum .31 over 3 pairs.
    assert relative_pose_error(estimate, reference, delta=2) == pytest.approx(math.sqrt(0.31 / 3), abs=1e-12)


def test_rpe_sees_heading_errors_that_ate_ignores() -> None:
    reference = straight_reference(5)
    estimate = reference.copy()
    estimate[:, 2] = math.pi / 2  # same positions, facing +y
    # ATE uses positions only.
    assert absolute_trajectory_error(estimate, reference) == pytest.approx(0.0, abs=1e-12)
    # In the estimate's own frame each step (+1 in world x) is (0, -1); the reference's is (1, 0).
    assert relative_pose_error(estimate, reference) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_se3_input_matches_planar_input() -> None:
    reference = curved_reference()
    estimate = reference + np.random.default_rng(0).normal(0, 0.1, reference.shape)
    assert absolute_trajectory_error(planar_poses_to_se3(estimate), planar_poses_to_se3(reference)) == \
        pytest.approx(absolute_trajectory_error(estimate, reference), abs=1e-12)
    assert relative_pose_error(planar_poses_to_se3(estimate), planar_poses_to_se3(reference)) == \
        pytest.approx(relative_pose_error(estimate, reference), abs=1e-12)


def rigidly_moved(poses: np.ndarray, angle: float, shift: tuple[float, float], scale: float = 1.0) -> np.ndarray:
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = poses.copy()
    moved[:, :2] = scale * poses[:, :2] @ rotation.T + shift
    moved[:, 2] += angle
    return moved


def test_alignment_options() -> None:
    reference = curved_reference()
    rotated = rigidly_moved(reference, angle=0.7, shift=(2.0, -1.0))
    assert absolute_trajectory_error(rotated, reference) > 1.0  # NWM convention: no alignment
    assert absolute_trajectory_error(rotated, reference, align="se3") == pytest.approx(0.0, abs=1e-9)
    assert relative_pose_error(rotated, reference) == pytest.approx(0.0, abs=1e-9)  # RPE ignores rigid motion
    scaled = rigidly_moved(reference, angle=0.7, shift=(2.0, -1.0), scale=1.5)
    assert absolute_trajectory_error(scaled, reference, align="se3") > 0.1
    assert absolute_trajectory_error(scaled, reference, align="sim3") == pytest.approx(0.0, abs=1e-9)
    # 'origin' makes the first poses equal: a pure translation then vanishes.
    shifted = reference.copy()
    shifted[:, :2] += [5.0, 5.0]
    assert absolute_trajectory_error(shifted, reference, align="origin") == pytest.approx(0.0, abs=1e-9)
    # Alignment works on a copy: the caller's array is unchanged.
    before = rotated.copy()
    absolute_trajectory_error(rotated, reference, align="se3")
    np.testing.assert_array_equal(rotated, before)


@pytest.mark.parametrize(
    ("estimate", "reference", "kwargs", "message"),
    [
        (np.zeros((5, 3)), np.zeros((6, 3)), {}, "same length"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), {}, "NaN"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {}, r"\(T, 3\)"),
        (np.zeros((0, 3)), np.zeros((0, 3)), {}, "at least 1"),
        (straight_reference(4), straight_reference(4), {"align": "se3"}, "degenerate"),
        (np.zeros((5, 3)), np.zeros((5, 3)), {"align": "umeyama"}, "align must be one of"),
        (np.tile(np.eye(4) * 2, (3, 1, 1)), np.tile(np.eye(4), (3, 1, 1)), {}, "not a valid SE"),
    ],
)
def test_ate_bad_input_is_explained(estimate, reference, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        absolute_trajectory_error(estimate, reference, **kwargs)


def test_rpe_needs_delta_plus_one_poses() -> None:
    with pytest.raises(ValueError, match="at least 3 poses"):
        relative_pose_error(np.zeros((2, 3)), np.zeros((2, 3)), delta=2)
    with pytest.raises(ValueError, match="positive integer"):
        relative_pose_error(np.zeros((4, 3)), np.zeros((4, 3)), delta=0)


def test_evo_settings_never_imported() -> None:
    # evo.tools.settings writes ~/.evo on import; the metrics must not pull it in.
    assert "evo.tools.settings" not in sys.modules
