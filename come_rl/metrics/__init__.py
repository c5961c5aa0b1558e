"""Evaluation metrics: LPIPS (offline, ImageNet AlexNet/VGG trunk), PSNR, SSIM, ATE/RPE (evo).

`lpips` and `evo` are imported lazily, so `import come_rl.metrics` stays cheap for callers that only
need PSNR/SSIM.
"""

from __future__ import annotations

from typing import Any

from come_rl.metrics.image import clip_psnr, clip_ssim, psnr, ssim

_LAZY_ATTRIBUTES = {
    "LPIPSMetric": "come_rl.metrics.lpips_metric",
    "get_lpips": "come_rl.metrics.lpips_metric",
    "to_lpips_tensor": "come_rl.metrics.lpips_metric",
    "absolute_trajectory_error": "come_rl.metrics.trajectory",
    "relative_pose_error": "come_rl.metrics.trajectory",
    "planar_poses_to_se3": "come_rl.metrics.trajectory",
}

__all__ = [
    "LPIPSMetric",
    "absolute_trajectory_error",
    "clip_psnr",
    "clip_ssim",
    "get_lpips",
    "planar_poses_to_se3",
    "psnr",
    "relative_pose_error",
    "ssim",
    "to_lpips_tensor",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        import importlib

        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'come_rl.metrics' has no attribute {name!r}")
