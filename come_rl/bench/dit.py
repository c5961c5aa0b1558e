"""Cost of one denoising call of the video DiT, with and without the context KV cache.

Usage (one benchmark CLI, ``come_rl.bench``):
    python -m come_rl.bench dit ['names=["dit_cpu", "stm_cpu"]' 'batch_sizes=[1, 32]' threads=1 repeats=3 device=auto]

"cached" is ``denoise(state, ...)`` with the state prepared once per planning call; "recomputed"
is ``prepare + denoise`` in every call, what a model without the cache (the authors' code, NWM)
pays per denoising step. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, and
attention through a formula for the CPU kernel it does not know; elementwise work is not counted;
masked attention counts the full score matrix, which the dense kernel computes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from come_rl.devices import matmul_peak_gflops, resolve_device
from come_rl.nets.registry import build_backbone
from come_rl.results import write_table


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's flop counter knows the CUDA attention kernels but not the CPU one: QK^T plus PV."""
    leading = math.prod(query_shape[:-2])
    return 2 * leading * query_shape[-2] * key_shape[-2] * (query_shape[-1] + value_shape[-1])


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def _flops(function) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        function()
    return counter.get_total_flops()


def _seconds(function, repeats: int, device: torch.device | None = None) -> float:
    def synchronize() -> None:  # a GPU call returns before its kernels finish
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    function()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, batch_size: int, repeats: int = 3, device: str | torch.device = "cpu", **overrides) -> dict:
    """Time and count one denoising call of backbone ``name`` at ``batch_size`` (full context and targets)."""
    device = resolve_device(device)
    torch.manual_seed(0)
    model = build_backbone(name, **overrides).eval().to(device)
    config = model.config
    size, frames_in, frames_out = config.frame_size, config.context_frames, config.predicted_frames
    context = torch.rand(batch_size, frames_in, config.channels, size, size, device=device) * 2 - 1
    actions = torch.zeros(batch_size, frames_in + frames_out, config.action_dim, device=device)
    poses = torch.zeros(batch_size, frames_in + frames_out, config.pose_dim, device=device) if config.pose_dim else None
    noisy = torch.randn(batch_size, frames_out, config.channels, size, size, device=device)
    t = torch.full((batch_size,), 0.5, device=device)
    with torch.no_grad():
        state = model.prepare(context, actions, poses)

        def cached():
            return model.denoise(state, noisy, t)

        def recomputed():
            return model.denoise(model.prepare(context, actions, poses), noisy, t)

        row = {
            "backbone": name,
            "batch": batch_size,
            "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "tokens_per_frame": config.tokens_per_frame,
            "frames": f"{frames_in}->{frames_out}",
            "device": str(device),
            "cached_ms": 1e3 * _seconds(cached, repeats, device),
            "recomputed_ms": 1e3 * _seconds(recomputed, repeats, device),
            "cached_GFLOP": _flops(cached) / 1e9,
            "recomputed_GFLOP": _flops(recomputed) / 1e9,
        }
    row["time_ratio"] = row["recomputed_ms"] / row["cached_ms"]
    row["flop_ratio"] = row["recomputed_GFLOP"] / row["cached_GFLOP"]
    row["cached_GFLOP_per_s"] = row["cached_GFLOP"] / (row["cached_ms"] / 1e3)
    return row


@dataclass
class DitBenchConfig:
    names: list = field(default_factory=lambda: ["dit_cpu", "stm_cpu"])
    """transformer registry names (come_rl.nets.registry)."""
    batch_sizes: list = field(default_factory=lambda: [1, 32])
    threads: int = 1
    repeats: int = 3
    frame_size: int = 0
    """override the configs' frame size (0: keep it)."""
    out: str = "results/bench/dit_backbone.csv"
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""


def bench_dit(config: DitBenchConfig) -> list[dict]:
    """Cached vs recomputed denoising cost per backbone and batch size; writes ``config.out`` (+ .md)."""
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    overrides = {"frame_size": config.frame_size} if config.frame_size else {}
    peak = matmul_peak_gflops(device=device)
    rows = []
    for name in config.names:
        for batch_size in config.batch_sizes:
            rows.append(dict(measure(name, int(batch_size), config.repeats, device=device, **overrides),
                             matmul_peak_GFLOP_per_s=peak, threads=config.threads))
    write_table(Path(config.out), rows, md_path=Path(config.out).with_suffix(".md"),
                title=f"Video DiT denoising call, cached context vs recomputed ({device}, {config.threads} thread(s); "
                      f"`python -m come_rl.bench dit`)")
    return rows
