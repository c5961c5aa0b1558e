"""Tests of the SLTM's pose features and pose encoder (absolute poses from relative motion)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from come_rl.nets.pose_encoder import (
    PoseEncoder,
    PoseEncoderConfig,
    integrate_relative_motion,
    pose_features,
    pose_loss,
)
from come_rl.conventions import absolute_to_relative, relative_to_absolute

torch.set_num_threads(1)

# Memory Maze's discrete actions: noop, forward, left, right, forward+left, forward+right.
FORWARD = np.array([0, 1, 0, 0, 1, 1], dtype=np.float64)
TURN = np.array([0, 0, 1, -1, 1, -1], dtype=np.float64)


def maze_trajectories(count: int, steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random-action walks with Memory Maze's action set: ``poses (count, steps+1, 3)``, true
    relative motion ``(count, steps, 3)``. About 0.25 cells forward and 0.35 rad per turn a step,
    with jitter and a little sideways slip as a physics engine gives."""
    actions = rng.choice(6, size=(count, steps), p=[0.05, 0.4, 0.1, 0.1, 0.175, 0.175])
    motion = np.stack([
        FORWARD[actions] * rng.uniform(0.2, 0.3, size=(count, steps)),
        rng.normal(0.0, 0.01, size=(count, steps)),
        TURN[actions] * rng.uniform(0.3, 0.4, size=(count, steps)),
    ], axis=-1)
    starts = np.stack([rng.uniform(1, 8, count), rng.uniform(1, 8, count), rng.uniform(-np.pi, np.pi, count)], -1)
    poses = np.stack([relative_to_absolute(motion[i], starts[i]) for i in range(count)])
    return poses, absolute_to_relative(poses)


def render_views(poses: np.ndarray, size: int = 16) -> np.ndarray:
    """Cheap egocentric views ``(..., 3, size, size)`` in [-1, 1] of a textured cylinder around the maze:
    the columns sweep a 90 degree field of view, so turning shifts the texture sideways."""
    columns = np.linspace(-np.pi / 4, np.pi / 4, size)
    angle = poses[..., 2, None] + columns  # (..., size) viewing direction of each column
    rows = np.linspace(-1, 1, size)[:, None]
    red = np.sin(3 * angle)[..., None, :] * np.ones_like(rows)
    green = np.cos(5 * angle + poses[..., 0, None])[..., None, :] * (1 - rows**2)
    blue = np.tanh(poses[..., 1, None, None] - 4.5) * rows + 0 * angle[..., None, :]
    return np.stack([red, green, blue], axis=-3).astype(np.float32)


def test_pose_features_hand_computed_values():
    poses = torch.tensor([[1.0, 1.0, math.pi / 2], [1.0, 2.0, math.pi / 2], [0.0, 1.0, math.pi]])
    features = pose_features(poses)
    # Origin heading +y: one step in +y is 1 forward; a step to -x is 1 to the left, facing left.
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(features, expected, atol=1e-6)
    # An explicit origin (the episode's first pose) for a later window of the episode.
    later = pose_features(poses[1:], origin=poses[0])
    assert torch.allclose(later, expected[1:], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 3\)"):
        pose_features(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        pose_features(torch.tensor([[0.0, 0.0, 0.0], [math.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="origin must have shape"):
        pose_features(torch.zeros(2, 5, 3), origin=torch.zeros(3))


def test_integration_matches_envs_poses_and_untrained_encoder_is_exact_on_clean_odometry():
    rng = np.random.default_rng(0)
    poses, motion = maze_trajectories(4, 20, rng)
    integrated = integrate_relative_motion(torch.from_numpy(motion))
    assert torch.allclose(pose_features(integrated), pose_features(torch.from_numpy(poses)), atol=1e-9)
    encoder = PoseEncoder(PoseEncoderConfig(conv_channels=(4,), hidden_size=8))
    frames = torch.from_numpy(render_views(poses))
    with torch.no_grad():
        features = encoder(frames, torch.from_numpy(motion).float())
    assert features.shape == (4, 21, 4)
    assert torch.allclose(features, pose_features(torch.from_numpy(poses)).float(), atol=1e-4)
    with pytest.raises(ValueError, match="one more than motions"):
        encoder(frames[:, :-1], torch.from_numpy(motion).float())
    with pytest.raises(ValueError, match=r"\(batch, steps, 3\)"):
        encoder(frames, torch.from_numpy(motion[..., :2]).float())


def _errors(features: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(position RMSE in maze cells, mean absolute heading error in radians)."""
    position_rmse = ((features[..., :2] - target[..., :2]) ** 2).sum(-1).mean().sqrt().item()
    heading = torch.atan2(features[..., 2], features[..., 3]) - torch.atan2(target[..., 2], target[..., 3])
    heading = torch.remainder(heading + math.pi, 2 * math.pi) - math.pi
    return position_rmse, heading.abs().mean().item()


def test_encoder_learns_absolute_poses_from_miscalibrated_odometry():
    """Odometry that under-reports distance by 20%, over-reports turns by 15% with a 0.02 rad bias
    and has noise (0.005) drifts far off; a short training on absolute poses recovers them.

    Tolerance on held-out 24-step Memory Maze walks (about 4 cells of travel): position RMSE below
    0.1 cells and mean heading error below 0.04 rad (2.3 degrees)."""
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    steps = 24

    def batch(count: int):
        poses, motion = maze_trajectories(count, steps, rng)
        reported = motion.copy()
        reported[..., 0] *= 0.8
        reported[..., 2] = 1.15 * reported[..., 2] + 0.02
        reported += rng.normal(0.0, 0.005, size=reported.shape)
        return (torch.from_numpy(render_views(poses)), torch.from_numpy(reported).float(),
                pose_features(torch.from_numpy(poses)).float())

    encoder = PoseEncoder(PoseEncoderConfig(conv_channels=(8, 16), hidden_size=32))
    test_frames, test_motion, test_target = batch(64)
    with torch.no_grad():
        dead_reckoning = _errors(encoder(test_frames, test_motion), test_target)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    for _ in range(200):
        frames, motion, target = batch(16)
        loss = pose_loss(encoder(frames, motion), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        position_rmse, heading_error = _errors(encoder(test_frames, test_motion), test_target)
    assert dead_reckoning[0] > 0.5 and dead_reckoning[1] > 0.15, dead_reckoning  # the task is not trivial
    assert position_rmse < 0.1, (position_rmse, dead_reckoning)
    assert heading_error < 0.04, (heading_error, dead_reckoning)
