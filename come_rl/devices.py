"""Where the networks run and in which precision: one small helper that every entry point uses.

    device = resolve_device("auto")              # cuda:<current> when torch sees a GPU, else cpu
    precision = resolve_precision("auto", device)  # "bf16" on CUDA (when the GPU supports it), "fp32" on CPU
    with autocast(device, precision): loss = expert.loss(...)

Settings, the same everywhere (``WorldModel.load``, ``come_rl.train``, ``come_rl.run``, the benchmarks, LPIPS):

* ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a ``torch.device``).
* ``precision``: ``auto`` | ``fp32`` | ``bf16``. bf16 is autocast (weights stay float32, matmuls and convolutions run
  in bfloat16). ``auto`` is bf16 on CUDA; on the CPU it is what the checkpoint's world_model.json declares as its
  ``cpu_precision`` where oneDNN has bfloat16 kernels (AVX512-BF16 / AMX), and fp32 otherwise (exact, reproducible
  frames). The Memory Cards checkpoint declares bf16 (its recall and find-the-object success measured equal to fp32
  held out, memorization 1.6x faster); the maze checkpoint fp32. bf16 on the CPU: measured 1.5x faster per U-Net call
  on this project's CPU at a small cost in frame accuracy (``python -m come_rl.bench decision``).
* ``compile``: ``torch.compile`` the networks' hot paths, off by default (the first calls pay the compilation).

Random numbers follow one rule (:func:`randn`, :func:`rand`): they are drawn on the generator's own device (CPU for
``torch.Generator()``) and then copied to where the model is, so a seeded run draws the same noise on every device and
the code has one path for CPU and GPU.
"""

from __future__ import annotations

import contextlib
import time
import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_BACKEND = "inductor"
"""the torch.compile backend of ``compile=true`` (tests set "eager" to check the plumbing without a C compiler)."""

_CUDA_PATTERN = re.compile(r"cuda(?::(\d+))?")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a concrete ``torch.device`` (CUDA devices always with an index).

    Raises ValueError for an unknown string, for CUDA asked on a machine without it, and for a GPU index that is not
    there; each message names the fix.
    """
    if device is None:
        device = "auto"
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)} (e.g. device=cuda:0)")
    if not torch.cuda.is_available():
        raise ValueError(f"device={text!r} but torch.cuda.is_available() is False; use device=cpu or auto")
    index = torch.cuda.current_device() if match.group(1) is None else int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={text!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}); "
                         f"pick one of them or device=cuda")
    return torch.device("cuda", index)


def resolve_precision(precision: str | None, device: torch.device, cpu_auto: str = "fp32") -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> ``"fp32"`` or ``"bf16"`` for ``device``. ``auto`` is bf16 on a CUDA GPU that
    supports it; on the CPU it is ``cpu_auto`` (a checkpoint's ``cpu_precision``: the precision its results were
    validated at on CPUs) where this CPU has bfloat16 kernels, else fp32. ``bf16`` on the CPU needs oneDNN's bfloat16
    kernels (:func:`cpu_supports_bf16`)."""
    text = "auto" if precision is None else str(precision).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if cpu_auto not in ("fp32", "bf16"):
        raise ValueError(f"a checkpoint's cpu_precision must be fp32 or bf16, got {cpu_auto!r}; fix its world_model.json")
    if text == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_auto == "bf16" and cpu_supports_bf16() else "fp32"
    if text == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise ValueError(f"precision=bf16 on the CPU needs oneDNN bfloat16 kernels (AVX512-BF16 or AMX), which this CPU "
                         f"({torch.backends.cpu.get_cpu_capability()}) lacks; use precision=fp32 or auto on it "
                         "(or device=cuda)")
    if text == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision=bf16 autocasts on the CPU or CUDA, and the device is {device}; use precision=fp32")
    return text


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matmuls natively on this CPU (AVX512-BF16 or AMX); elsewhere bf16
    autocast would be emulated and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device for ``precision="bf16"``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (unset: ``default``); anything else is refused."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text in ("1", "true", "yes", "on")
    raise ValueError(f"{name}={os.environ[name]!r} is not a boolean; set it to 1 or 0 (or unset it)")


CHANNELS_LAST_ON_CPU = _flag("COME_RL_CHANNELS_LAST", True)
"""keep 4-D weights (convolutions) channels-last on the CPU (:func:`prefer_channels_last`); False (environment
variable ``COME_RL_CHANNELS_LAST=0``): as built."""


def prefer_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """On the CPU, store ``module``'s 4-D parameters and buffers channels-last (NHWC), in place; elsewhere leave it.

    oneDNN then runs the convolutions in NHWC and their activations stay NHWC from layer to layer: the same arithmetic
    up to float rounding (2e-5 on a maze U-Net's noise estimate), in less time on the CPUs measured (a sampling call
    0.85x, a memorization step 0.94x, a training step 0.94-1.00x at 1 thread in fp32: ``python -m come_rl.bench
    memory_format``, results/bench/memory_format.md). CUDA is left as built (not measured). Idempotent; modules without
    4-D weights are unchanged."""
    if not CHANNELS_LAST_ON_CPU or module_device(module).type != "cpu":
        return module
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dim() == 4 and tensor.is_floating_point():
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def _draw(kind: str, shape: Sequence[int], generator: torch.Generator | None, device: torch.device | None,
          dtype: torch.dtype | None) -> torch.Tensor:
    source = generator.device if generator is not None else (device or torch.device("cpu"))
    draw = torch.randn if kind == "randn" else torch.rand
    values = draw(tuple(shape), generator=generator, device=source, dtype=dtype)
    return values if device is None else values.to(device)


def randn(shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` on the generator's device (then copied)."""
    return _draw("randn", shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform [0, 1) numbers on ``device``, drawn from ``generator`` on the generator's device (then copied)."""
    return _draw("rand", shape, generator, device, dtype)


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``tensor`` on ``device`` (None stays None); CPU tensors bound for CUDA go through pinned memory."""
    if tensor is None or tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@functools.cache
def compiled_function(function: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``torch.compile(function)``, built once per (function, backend); pass modules as arguments, not closures."""
    return torch.compile(function, backend=backend)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """Compile ``module``'s forward in place (its parameters, names and state_dict stay as they are)."""
    module.compile(backend=COMPILE_BACKEND)
    return module


def idle_cores(interval: float = 0.25) -> float:
    """How many cores were idle over the next ``interval`` seconds (Linux ``/proc/stat``; elsewhere the cores minus
    the 1-minute load average)."""
    import os
    import time

    cores = os.cpu_count() or 1

    def read() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return values[3] + (values[4] if len(values) > 4 else 0), sum(values)  # idle + iowait, total

    try:
        idle_a, total_a = read()
        time.sleep(interval)
        idle_b, total_b = read()
    except (OSError, ValueError, IndexError):
        return max(0.0, cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else float(cores)
    if total_b <= total_a:
        return float(cores)
    return cores * (idle_b - idle_a) / (total_b - total_a)


def resolve_threads(threads: int | str) -> int:
    """torch's intra-op thread count for ``threads``: a count >= 1, or ``auto`` = the cores idle right now (at least
    1). Threads beyond the idle cores oversubscribe them: measured on 2 cores (``python -m come_rl.bench threads``),
    one CEM decision's imagine took 0.53 s at 2 threads and 0.95 s at 1 on a quiet machine, but 1.76 s at 2 threads
    and 0.98 s at 1 beside one busy process. ``auto`` may resolve to another count on another run, and other thread
    counts give other numbers (README, Reproducibility): pin a count for identical reruns."""
    import os

    text = str(threads).strip().lower()
    if text == "auto":
        return max(1, min(os.cpu_count() or 1, int(idle_cores() + 0.5)))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1 or isinstance(threads, bool):
        raise ValueError(f"threads must be a count >= 1 or auto (the idle cores), got {threads!r}")
    return count


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock timing covers it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(size: int = 1024, repeats: int = 10, device: torch.device | None = None) -> float:
    """fp32 matmul rate of this machine now, in GFLOP/s: the yardstick of the benchmarks' achieved GFLOP/s."""
    device = device or torch.device("cpu")
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
