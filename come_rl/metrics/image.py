"""PSNR and SSIM per frame and per clip, for numpy arrays or torch tensors.

Images are `(..., H, W, C)` (channel last, the default) or `(..., C, H, W)` with `channel_axis=-3`;
the leading dimensions are frames (and clips). The value range is explicit: `data_range` is the
width of the range the pixels live in (255 for uint8, 1.0 for floats in [0, 1], 2.0 for floats in
[-1, 1]). uint8 inputs default to 255; float inputs must say which range they use, because
guessing it wrong changes PSNR by 6 dB (a factor 2 in range) without any error.

Per frame returns one value per image (shape `...`); per clip averages the frames of each clip
(the last leading axis), which is how video-prediction papers report clip PSNR/SSIM.
Results come back as the input's kind: numpy float64 for numpy input, torch float64 for torch input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

# SSIM constants from Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW_SIZE = 11
SSIM_GAUSSIAN_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float64_tensor(images: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(images, np.ndarray):
        if images.dtype == object or not (np.issubdtype(images.dtype, np.floating)
                                          or np.issubdtype(images.dtype, np.integer)):
            raise ValueError(f"{name}: expected numeric images, got dtype {images.dtype}")
        return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float64), False
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.bool or images.is_complex():
            raise ValueError(f"{name}: expected real numeric images, got dtype {images.dtype}")
        return images.detach().to(torch.float64), True
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(images).__name__}")


def _is_uint8(images: ArrayLike) -> bool:
    return (isinstance(images, np.ndarray) and images.dtype == np.uint8) or \
        (isinstance(images, torch.Tensor) and images.dtype == torch.uint8)


def _prepare_pair(prediction: ArrayLike, target: ArrayLike, data_range: float | None,
                  channel_axis: int) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """Validate a pair of image stacks; return them as float64 (..., C, H, W) tensors and the range."""
    if channel_axis not in (-1, -3):
        raise ValueError(f"channel_axis must be -1 (..., H, W, C) or -3 (..., C, H, W), got {channel_axis}")
    if type(prediction) is not type(target):
        raise TypeError(f"prediction and target must be the same kind, got {type(prediction).__name__} and "
                        f"{type(target).__name__}")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the "
                         "same shape")
    if prediction.dtype != target.dtype:
        raise ValueError(f"prediction ({prediction.dtype}) and target ({target.dtype}) must have the same dtype; "
                         "convert both to one range first")
    if len(prediction.shape) < 3:
        raise ValueError(f"expected images of shape (..., H, W, C) or (..., C, H, W), got {tuple(prediction.shape)}")
    channels = prediction.shape[channel_axis]
    if channels not in (1, 3, 4):
        hint = " (channel-first images need channel_axis=-3)" if channel_axis == -1 else \
            " (channel-last images need channel_axis=-1)"
        raise ValueError(f"expected 1, 3 or 4 channels on axis {channel_axis}, got shape "
                         f"{tuple(prediction.shape)}{hint}")
    if data_range is None:
        if _is_uint8(prediction):
            data_range = 255.0
        else:
            raise ValueError(f"data_range is required for dtype {prediction.dtype}: pass 1.0 for images in [0, 1], "
                             "2.0 for [-1, 1], 255.0 for 0..255 floats")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    data_range = float(data_range)
    prediction_tensor, is_torch = _as_float64_tensor(prediction, "prediction")
    target_tensor, _ = _as_float64_tensor(target, "target")
    for name, tensor in (("prediction", prediction_tensor), ("target", target_tensor)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or inf")
    # A span wider than data_range means the range was misdeclared (e.g. 0..255 pixels with 1.0).
    low = min(prediction_tensor.min().item(), target_tensor.min().item())
    high = max(prediction_tensor.max().item(), target_tensor.max().item())
    if high - low > data_range * (1 + 1e-3):
        raise ValueError(f"pixel values span [{low:.4g}, {high:.4g}], wider than data_range={data_range}; "
                         "pass the range your images use (1.0 for [0, 1], 2.0 for [-1, 1], 255.0 for 0..255)")
    if channel_axis == -1:
        prediction_tensor = prediction_tensor.movedim(-1, -3)
        target_tensor = target_tensor.movedim(-1, -3)
    return prediction_tensor, target_tensor, data_range, is_torch


def _return_as_input_kind(values: torch.Tensor, is_torch: bool, device: torch.device) -> ArrayLike:
    return values.to(device) if is_torch else values.cpu().numpy()


def psnr(prediction: ArrayLike, target: ArrayLike, data_range: float | None = None,
         channel_axis: int = -1) -> ArrayLike:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range^2 / MSE).

    Args:
        prediction, target: (..., H, W, C) images (or (..., C, H, W) with channel_axis=-3).
        data_range: width of the pixel range (255 for uint8 -- the default for uint8 --, 1.0 for [0, 1],
            2.0 for [-1, 1]); required for float inputs.
    Returns:
        (...) float64 values; identical images give +inf.
    """
    device = prediction.device if isinstance(prediction, torch.Tensor) else torch.device("cpu")
    prediction_t, target_t, data_range, is_torch = _prepare_pair(prediction, target, data_range, channel_axis)
    mean_squared_error = (prediction_t - target_t).pow(2).mean(dim=(-3, -2, -1))
    values = 10.0 * torch.log10(data_range**2 / mean_squared_error)  # MSE 0 -> +inf, not an error
    return _return_as_input_kind(values, is_torch, device)


def _gaussian_window(window_size: int, sigma: float) -> torch.Tensor:
    coordinates = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    weights = torch.exp(-(coordinates**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(prediction: ArrayLike, target: ArrayLike, data_range: float | None = None,
         channel_axis: int = -1) -> ArrayLike:
    """Structural similarity per image (Wang et al. 2004), averaged over channels and pixels.

    Local statistics use an 11x11 Gaussian window (sigma 1.5) over the valid region (no padding),
    C1 = (0.01 * data_range)^2, C2 = (0.03 * data_range)^2, population (biased) variances.

    Args: as `psnr`; H and W must be at least 11.
    Returns:
        (...) float64 values in [-1, 1]; identical images give 1.
    """
    device = prediction.device if isinstance(prediction, torch.Tensor) else torch.device("cpu")
    prediction_t, target_t, data_range, is_torch = _prepare_pair(prediction, target, data_range, channel_axis)
    *leading_shape, channels, height, width = prediction_t.shape
    if min(height, width) < SSIM_WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} pixels, got "
                         f"{height}x{width}")
    # Fold frames and channels into the batch so every channel of every frame is filtered alike.
    x = prediction_t.reshape(-1, 1, height, width)
    y = target_t.reshape(-1, 1, height, width)
    window_1d = _gaussian_window(SSIM_WINDOW_SIZE, SSIM_GAUSSIAN_SIGMA).to(x.device)
    window_rows = window_1d.view(1, 1, SSIM_WINDOW_SIZE, 1)
    window_cols = window_1d.view(1, 1, 1, SSIM_WINDOW_SIZE)

    def local_mean(images: torch.Tensor) -> torch.Tensor:
        # The Gaussian window is separable: two 1D passes equal one 11x11 pass.
        return F.conv2d(F.conv2d(images, window_rows), window_cols)

    mean_x, mean_y = local_mean(x), local_mean(y)
    variance_x = local_mean(x * x) - mean_x**2
    variance_y = local_mean(y * y) - mean_y**2
    covariance = local_mean(x * y) - mean_x * mean_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / \
        ((mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2))
    values = ssim_map.mean(dim=(-3, -2, -1)).reshape(*leading_shape, channels).mean(dim=-1)
    return _return_as_input_kind(values, is_torch, device)


def _clip_mean(per_frame: ArrayLike, name: str) -> ArrayLike:
    if per_frame.ndim < 1:
        raise ValueError(f"{name}: a clip needs a frame axis, i.e. images of shape (..., T, H, W, C); got one image")
    return per_frame.mean(axis=-1) if isinstance(per_frame, np.ndarray) else per_frame.mean(dim=-1)


def clip_psnr(prediction: ArrayLike, target: ArrayLike, data_range: float | None = None,
              channel_axis: int = -1) -> ArrayLike:
    """Mean of per-frame PSNR over the frame axis: (..., T, H, W, C) -> (...). A 0-d result for one clip."""
    return _clip_mean(psnr(prediction, target, data_range, channel_axis), "clip_psnr")


def clip_ssim(prediction: ArrayLike, target: ArrayLike, data_range: float | None = None,
              channel_axis: int = -1) -> ArrayLike:
    """Mean of per-frame SSIM over the frame axis: (..., T, H, W, C) -> (...). A 0-d result for one clip."""
    return _clip_mean(ssim(prediction, target, data_range, channel_axis), "clip_ssim")
