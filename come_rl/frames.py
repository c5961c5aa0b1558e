"""The frame convention, in one place: envs and agents speak uint8 (..., H, W, 3); the models speak float
(..., 3, H, W) in [-1, 1]. Every conversion in the toolkit goes through these two functions."""

from __future__ import annotations

import numpy as np
import torch


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
