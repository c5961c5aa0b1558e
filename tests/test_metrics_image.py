"""PSNR and SSIM against closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from come_rl.metrics import clip_psnr, clip_ssim, psnr, ssim


def smooth_image(size: int = 32, seed: int = 0) -> np.ndarray:
    """(size, size, 3) float image in [0, 1] with gradients and a square."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([xx, yy, 0.5 + 0.4 * np.sin(4 * xx) * np.cos(3 * yy)], axis=-1)
    image[8:20, 10:24] = [0.9, 0.1, 0.3]
    return image


def test_psnr_of_a_known_mse() -> None:
    target = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    prediction = target.copy()
    prediction[0] += 10  # every pixel off by 10 -> MSE 100
    prediction[1, ::2] += 20  # half the rows off by 20 -> MSE 200
    values = psnr(prediction, target)
    assert values.shape == (2,)
    assert values[0] == pytest.approx(10 * math.log10(255**2 / 100))  # 28.1308 dB
    assert values[1] == pytest.approx(10 * math.log10(255**2 / 200))
    assert clip_psnr(prediction, target) == pytest.approx(np.mean(values))


def test_psnr_float_ranges_agree_with_uint8() -> None:
    target = (smooth_image() * 255).round().astype(np.uint8)
    prediction = np.clip(target.astype(np.int16) + 7, 0, 255).astype(np.uint8)
    reference_value = psnr(prediction, target)
    unit = psnr(prediction / 255.0, target / 255.0, data_range=1.0)
    symmetric = psnr(prediction / 127.5 - 1, target / 127.5 - 1, data_range=2.0)
    assert unit == pytest.approx(reference_value) and symmetric == pytest.approx(reference_value)


def test_psnr_identical_is_infinite_and_torch_returns_torch() -> None:
    frames = torch.rand(3, 3, 16, 16)
    values = psnr(frames, frames.clone(), data_range=1.0, channel_axis=-3)
    assert isinstance(values, torch.Tensor) and values.shape == (3,)
    assert torch.isinf(values).all()


def test_ssim_identical_is_one() -> None:
    image = smooth_image()
    assert ssim(image, image.copy(), data_range=1.0) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images have zero variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 L)^2.
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)  # = 0.6004998...
    prediction = np.full((16, 16, 3), a)
    target = np.full((16, 16, 3), b)
    assert ssim(prediction, target, data_range=1.0) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_a_contrast_flip_is_negative() -> None:
    # y = 1 - x: equal means only where mean is 0.5; covariance = -variance, so the structure term is
    # (-2 var + C2) / (2 var + C2) < 0 where the image has texture.
    rng = np.random.default_rng(0)
    image = rng.uniform(0.4, 0.6, size=(24, 24, 1)) + 0.0
    assert ssim(image, 1 - image, data_range=1.0) < -0.5


def test_ssim_decreases_with_noise() -> None:
    image = smooth_image()
    rng = np.random.default_rng(1)
    values = [ssim(np.clip(image + rng.normal(0, sigma, image.shape), 0, 1), image, data_range=1.0)
              for sigma in (0.01, 0.05, 0.2)]
    assert 1 > values[0] > values[1] > values[2]


def test_clip_metrics_average_frames_and_keep_batch_dims() -> None:
    clips = np.stack([np.stack([smooth_image()] * 4)] * 2)  # (2 clips, 4 frames, H, W, 3)
    noisy = clips.copy()
    noisy[:, 1:] = np.clip(noisy[:, 1:] + 0.05, 0, 1)
    per_frame = ssim(noisy, clips, data_range=1.0)
    assert per_frame.shape == (2, 4)
    per_clip = clip_ssim(noisy, clips, data_range=1.0)
    assert per_clip.shape == (2,)
    assert per_clip == pytest.approx(per_frame.mean(axis=-1))
    assert per_frame[0, 0] == pytest.approx(1.0) and per_frame[0, 1] < 1
    with pytest.raises(ValueError, match="frame axis"):
        clip_psnr(clips[0, 0], noisy[0, 0], data_range=1.0)


def test_torch_channel_first_matches_numpy_channel_last() -> None:
    image = smooth_image()
    other = np.clip(image + 0.03 * np.sin(np.arange(image.size)).reshape(image.shape), 0, 1)
    numpy_value = ssim(other, image, data_range=1.0)
    torch_value = ssim(torch.from_numpy(other).permute(2, 0, 1), torch.from_numpy(image).permute(2, 0, 1),
                       data_range=1.0, channel_axis=-3)
    assert torch_value.item() == pytest.approx(float(numpy_value), rel=1e-12)


@pytest.mark.parametrize(
    ("prediction", "target", "kwargs", "message"),
    [
        (np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), {}, "data_range is required"),
        (np.zeros((8, 8, 3)), np.zeros((8, 9, 3)), {"data_range": 1.0}, "same shape"),
        (np.zeros((8, 8, 3)), np.full((8, 8, 3), 200.0), {"data_range": 1.0}, "wider than data_range"),
        (np.full((8, 8, 3), np.nan), np.zeros((8, 8, 3)), {"data_range": 1.0}, "NaN"),
        (np.zeros((3, 8, 8)), np.zeros((3, 8, 8)), {"data_range": 1.0}, "channel_axis=-3"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3)), {"data_range": 1.0}, "same dtype"),
        (np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), {"data_range": -1.0}, "positive"),
        (np.zeros((8, 3)), np.zeros((8, 3)), {"data_range": 1.0}, "expected images"),
    ],
)
def test_bad_input_is_explained(prediction, target, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        psnr(prediction, target, **kwargs)


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), data_range=1.0)
