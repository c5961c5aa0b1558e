"""Cost of one denoising call of the video DiT, with and without the context KV cache.

Usage:
    OMP_NUM_THREADS=1 python -m come_rl.nets.dit_benchmark --names dit_cpu stm_cpu --batch-sizes 1 32 \
        [--threads 1] [--repeats 3] [--output results/bench/dit_backbone.csv] [--device auto]

"cached" is ``denoise(state, ...)`` with the state prepared once per planning call; "recomputed"
is ``prepare + denoise`` in every call, what a model without the cache (the authors' code, NWM)
pays per denoising step. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, and
attention through a formula for the CPU kernel it does not know; elementwise work is not counted;
masked attention counts the full score matrix, which the dense kernel computes).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from come_rl.nets.registry import build_backbone


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
    from come_rl.devices import resolve_device

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


def matmul_peak_gflops(size: int = 1024, repeats: int = 10, device: torch.device | None = None) -> float:
    """fp32 matmul rate of this machine now (the yardstick for the achieved GFLOP/s above)."""
    a = torch.randn(size, size, device=device)
    seconds = _seconds(lambda: [a @ a for _ in range(repeats)], 2, device)
    return 2 * size**3 * repeats / seconds / 1e9


def _write_csv(rows: list[dict], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(handle, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["dit_cpu", "stm_cpu"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frame-size", type=int, default=None, help="override the configs' frame size")
    parser.add_argument("--output", default=None, help="CSV path (written atomically)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = parser.parse_args()
    from come_rl.devices import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    overrides = {} if args.frame_size is None else {"frame_size": args.frame_size}
    rows = []
    print(f"fp32 matmul peak now: {matmul_peak_gflops(device=device):.1f} GFLOP/s on {device} "
          f"({args.threads} thread(s))", flush=True)
    for name in args.names:
        for batch_size in args.batch_sizes:
            rows.append(measure(name, batch_size, args.repeats, device=device, **overrides))
            print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    if args.output:
        _write_csv(rows, args.output)


if __name__ == "__main__":
    main()
