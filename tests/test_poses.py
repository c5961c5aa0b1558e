"""Pose conversions: hand-computed relative motions and exact round trips."""

import numpy as np
import pytest

from come_rl.conventions import (
    absolute_to_relative,
    from_local_frame,
    relative_to_absolute,
    to_local_frame,
    wrap_angle,
    yaw_from_direction,
)


def test_wrap_angle_maps_into_half_open_interval():
    angles = np.array([0.0, np.pi, -np.pi, 3 * np.pi / 2, -3 * np.pi / 2, 7.0])
    expected = np.array([0.0, -np.pi, -np.pi, -np.pi / 2, np.pi / 2, 7.0 - 2 * np.pi])
    np.testing.assert_allclose(wrap_angle(angles), expected, atol=1e-12)


def test_relative_motion_of_hand_made_path():
    # Start at (1, 2) facing +y (yaw pi/2); step 1 world (0, 1) = 1 forward; then turn left to face -x;
    # step 3 world (-2, 0) = 2 forward; step 4 world (0, 1) = to the agent's right (facing -x, +y is right).
    poses = np.array([
        [1.0, 2.0, np.pi / 2],
        [1.0, 3.0, np.pi / 2],
        [1.0, 3.0, np.pi],
        [-1.0, 3.0, np.pi],
        [-1.0, 4.0, np.pi],
    ])
    expected = np.array([
        [1.0, 0.0, 0.0],
        [0.0, 0.0, np.pi / 2],
        [2.0, 0.0, 0.0],
        [0.0, -1.0, 0.0],
    ])
    relative = absolute_to_relative(poses)
    np.testing.assert_allclose(relative[:, :2], expected[:, :2], atol=1e-12)
    np.testing.assert_allclose(np.cos(relative[:, 2]), np.cos(expected[:, 2]), atol=1e-12)
    np.testing.assert_allclose(np.sin(relative[:, 2]), np.sin(expected[:, 2]), atol=1e-12)


def test_integration_reproduces_absolute_poses_of_a_random_walk():
    rng = np.random.default_rng(0)
    steps = 500
    relative = np.stack([rng.uniform(-0.2, 0.5, steps), rng.uniform(-0.1, 0.1, steps),
                         rng.uniform(-0.6, 0.6, steps)], axis=1)
    start = np.array([3.0, -2.0, 2.5])
    poses = relative_to_absolute(relative, start)
    assert poses.shape == (steps + 1, 3)
    np.testing.assert_allclose(absolute_to_relative(poses), relative, atol=1e-9)
    back = relative_to_absolute(absolute_to_relative(poses), poses[0])
    np.testing.assert_allclose(back[:, :2], poses[:, :2], atol=1e-5)
    np.testing.assert_allclose(wrap_angle(back[:, 2] - poses[:, 2]), 0.0, atol=1e-5)


def test_float32_poses_round_trip_to_1e5():
    rng = np.random.default_rng(1)
    poses = np.cumsum(rng.normal(0, 0.2, (1000, 3)), axis=0).astype(np.float32)
    poses[:, 2] = wrap_angle(poses[:, 2])
    back = relative_to_absolute(absolute_to_relative(poses), poses[0])
    np.testing.assert_allclose(back[:, :2], poses[:, :2], atol=1e-5)
    np.testing.assert_allclose(wrap_angle(back[:, 2] - poses[:, 2]), 0.0, atol=1e-5)


def test_local_frame_hand_computed_and_inverse():
    reference = np.array([1.0, 1.0, np.pi / 2])  # facing +y
    world = np.array([[1.0, 3.0, np.pi / 2], [0.0, 1.0, 0.0]])
    local = to_local_frame(world, reference)
    # 2 ahead; 1 to the right... (0,1) is -x from the reference, i.e. to the agent's left (+y local).
    np.testing.assert_allclose(local, [[2.0, 0.0, 0.0], [0.0, 1.0, -np.pi / 2]], atol=1e-12)
    np.testing.assert_allclose(from_local_frame(local, reference), world, atol=1e-12)


def test_yaw_from_direction_and_bad_shapes():
    np.testing.assert_allclose(yaw_from_direction(np.array([[0.0, 1.0], [-1.0, 0.0]])), [np.pi / 2, -np.pi], atol=1e-12)
    with pytest.raises(ValueError, match="size 3"):
        absolute_to_relative(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="initial_pose"):
        relative_to_absolute(np.zeros((4, 3)), np.zeros(2))
