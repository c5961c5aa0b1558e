"""The spatial expert's pose encoder: absolute pose features from relative motion and frames.

The SLTM conditions on absolute poses ``(x, y, sin yaw, cos yaw)`` relative to the episode's first
frame (paper 3.3 and E.1). Where an environment reports only relative motion (odometry), the
encoder infers them: 3D convolutions over the (clean-estimate) frames give per-frame features, a
small network turns each step's reported motion plus the features of the two frames it joins into a
corrected motion, and a differentiable dead-reckoning layer integrates the corrected motions into
absolute poses. The integration is exact geometry (the same composition as
``come_rl.conventions.relative_to_absolute``), so with perfect odometry the untrained encoder is already
exact, and training (supervised by absolute poses) only has to learn the odometry's errors:
miscalibrated scales, biases, and what the frames reveal about the true motion.

Conventions (``come_rl.interfaces`` / ``come_rl.conventions``): a pose is ``(x, y, yaw)``; the relative motion
of step ``t`` is ``(dx, dy, dyaw)`` from pose ``t`` to pose ``t + 1`` in the agent's frame at ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PoseEncoder", "PoseEncoderConfig", "integrate_relative_motion", "pose_features", "pose_loss"]


def _as_tensor(poses, name: str) -> torch.Tensor:
    if isinstance(poses, np.ndarray):
        poses = torch.from_numpy(poses)
    if not isinstance(poses, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(poses).__name__}")
    if not torch.is_floating_point(poses):
        poses = poses.float()
    return poses


def pose_features(poses: torch.Tensor | np.ndarray, origin: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Absolute poses -> the SLTM's pose features relative to the episode's first frame.

    Args:
        poses: ``(..., T, 3)`` ``(x, y, yaw)`` of consecutive frames of one episode (time on axis -2).
        origin: ``(..., 3)`` the pose the features are relative to; default ``poses[..., 0, :]`` (the
            first frame given). Pass the episode's first pose when ``poses`` is a later window.

    Returns:
        ``(..., T, 4)``: ``(x, y, sin yaw, cos yaw)`` of each pose expressed in the origin's frame (x
        forward, y left of the origin's heading), so the origin itself maps to ``(0, 0, 0, 1)``.
    """
    poses = _as_tensor(poses, "poses")
    if poses.ndim < 2 or poses.shape[-1] != 3:
        raise ValueError(f"poses must have shape (..., T, 3) = (x, y, yaw) per frame, got {tuple(poses.shape)}")
    if not torch.isfinite(poses).all():
        raise ValueError("poses contain NaN or Inf; pass finite (x, y, yaw) poses")
    if origin is None:
        origin = poses[..., 0, :]
    else:
        origin = _as_tensor(origin, "origin").to(poses)
        if tuple(origin.shape) != tuple(poses.shape[:-2]) + (3,):
            raise ValueError(f"origin must have shape {tuple(poses.shape[:-2]) + (3,)}, got {tuple(origin.shape)}")
    origin = origin[..., None, :]
    delta = poses[..., :2] - origin[..., :2]
    cos_origin, sin_origin = torch.cos(origin[..., 2]), torch.sin(origin[..., 2])
    # R(-yaw_origin) @ delta: the displacement as seen from the origin's heading.
    local_x = cos_origin * delta[..., 0] + sin_origin * delta[..., 1]
    local_y = -sin_origin * delta[..., 0] + cos_origin * delta[..., 1]
    yaw = poses[..., 2] - origin[..., 2]
    return torch.stack([local_x, local_y, torch.sin(yaw), torch.cos(yaw)], dim=-1)


def integrate_relative_motion(relative_motion: torch.Tensor) -> torch.Tensor:
    """Differentiable dead reckoning from the origin pose ``(0, 0, 0)``.

    Args:
        relative_motion: ``(..., T, 3)`` ``(dx, dy, dyaw)`` per step in the agent's frame.

    Returns:
        ``(..., T + 1, 3)`` poses ``(x, y, yaw)`` (yaw unwrapped), the first one the origin.
    """
    turns = relative_motion[..., 2]
    zeros = torch.zeros_like(turns[..., :1])
    headings = torch.cat([zeros, torch.cumsum(turns, dim=-1)], dim=-1)  # heading before/after each step
    before = headings[..., :-1]
    world_dx = torch.cos(before) * relative_motion[..., 0] - torch.sin(before) * relative_motion[..., 1]
    world_dy = torch.sin(before) * relative_motion[..., 0] + torch.cos(before) * relative_motion[..., 1]
    x = torch.cat([zeros, torch.cumsum(world_dx, dim=-1)], dim=-1)
    y = torch.cat([zeros, torch.cumsum(world_dy, dim=-1)], dim=-1)
    return torch.stack([x, y, headings], dim=-1)


def pose_loss(predicted_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between pose features ``(..., T, 4)`` (positions and heading on one scale)."""
    return F.mse_loss(predicted_features, target_features)


@dataclass(frozen=True)
class PoseEncoderConfig:
    """Size of a :class:`PoseEncoder`."""

    channels: int = 3
    """Channels of the frames."""
    conv_channels: tuple[int, ...] = (16, 32, 32)
    """Output channels of the 3D convolutions (the paper used 12 layers; a few suffice on CPU)."""
    hidden_size: int = 64
    """Width of the motion-correction MLP."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        if self.channels < 1 or self.hidden_size < 1 or not self.conv_channels or min(self.conv_channels) < 1:
            raise ValueError(f"PoseEncoderConfig needs positive sizes, got {self}")


class PoseEncoder(nn.Module):
    """``forward(frames (B, T+1, C, H, W), relative_motion (B, T, 3)) -> pose features (B, T+1, 4)``.

    The features are relative to the first frame (``pose_features`` of the true poses is the
    training target, see :func:`pose_loss`).
    """

    def __init__(self, config: PoseEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or PoseEncoderConfig()
        layers: list[nn.Module] = []
        in_channels = config.channels
        for out_channels in config.conv_channels:
            # Kernel 3 over time sees the neighbouring frames (the motion between them); stride 2 in
            # space keeps it cheap; time keeps its length so every frame gets a feature vector.
            layers += [nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=(1, 2, 2), padding=1),
                       nn.GroupNorm(1, out_channels), nn.SiLU()]
            in_channels = out_channels
        self.frame_convs = nn.Sequential(*layers)
        feature_size = config.conv_channels[-1]
        # Linear calibration of the reported motion (identity at start) plus a frame-aware residual.
        self.motion_calibration = nn.Linear(3, 3)
        self.motion_correction = nn.Sequential(
            nn.Linear(2 * feature_size + 3, config.hidden_size), nn.SiLU(),
            nn.Linear(config.hidden_size, config.hidden_size), nn.SiLU(),
            nn.Linear(config.hidden_size, 3))
        with torch.no_grad():
            self.motion_calibration.weight.copy_(torch.eye(3))
            self.motion_calibration.bias.zero_()
            self.motion_correction[-1].weight.zero_()
            self.motion_correction[-1].bias.zero_()

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T+1, C, H, W)`` -> ``(B, T+1, conv_channels[-1])`` (spatially averaged 3D conv maps)."""
        maps = self.frame_convs(frames.transpose(1, 2))  # Conv3d wants (B, C, T, H, W)
        return maps.mean(dim=(-2, -1)).transpose(1, 2)

    def corrected_motion(self, frames: torch.Tensor, relative_motion: torch.Tensor) -> torch.Tensor:
        """The motion the encoder believes happened: ``(B, T, 3)``."""
        features = self.frame_features(frames)
        step_inputs = torch.cat([features[:, :-1], features[:, 1:], relative_motion], dim=-1)
        return self.motion_calibration(relative_motion) + self.motion_correction(step_inputs)

    def forward(self, frames: torch.Tensor, relative_motion: torch.Tensor) -> torch.Tensor:
        self._validate(frames, relative_motion)
        poses = integrate_relative_motion(self.corrected_motion(frames, relative_motion))
        return pose_features(poses)

    def _validate(self, frames: torch.Tensor, relative_motion: torch.Tensor) -> None:
        if not isinstance(relative_motion, torch.Tensor) or relative_motion.ndim != 3 or relative_motion.shape[-1] != 3:
            shape = tuple(relative_motion.shape) if isinstance(relative_motion, torch.Tensor) else None
            raise ValueError(f"relative_motion must be (batch, steps, 3) = (dx, dy, dyaw), got {shape}")
        batch, steps = relative_motion.shape[:2]
        if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[:2] != (batch, steps + 1) \
                or frames.shape[2] != self.config.channels:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else None
            raise ValueError(f"frames must be (batch={batch}, steps + 1={steps + 1}, {self.config.channels}, H, W): "
                             f"one frame per pose, one more than motions; got {shape}")
        if not torch.isfinite(relative_motion).all() or not torch.isfinite(frames).all():
            raise ValueError("frames or relative_motion contain NaN or Inf")
