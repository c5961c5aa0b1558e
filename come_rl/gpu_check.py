"""One command for anyone with a GPU: ``python -m come_rl.gpu_check`` runs what this project's CPU machines cannot.

    python -m come_rl.gpu_check                       # all steps on cuda:0, results/gpu/<device name>/
    python -m come_rl.gpu_check train_minutes=1       # a shorter training run
    python -m come_rl.gpu_check dry_run=true          # no GPU needed: writes the plan (the commands) only

Steps, each a subprocess of this interpreter with its own time limit, run in order whatever the previous one gave:

1. ``cuda_tests``: the CUDA tests of the suite (``tests/test_devices.py -k cuda``: imagine and memorize on the GPU match
   the CPU in fp32; a checkpoint trained on the GPU loads on the CPU).
2. ``bench_fp32`` / ``bench_bf16``: ``python -m come_rl.bench world_model`` with ``device=cuda`` in fp32 and in bf16
   autocast (imagined frames per second of every composition, network calls per step, peak memory).
3. ``torchrun_train``: a short training run under ``torchrun`` on one GPU (``unet_cards`` on ``online:memory_cards``,
   bf16, ``train_minutes``), which writes a checkpoint, its held-out evaluation and a rollout GIF.

4. ``distill``: a progressive-distillation round (``come_rl.distill``) of the shipped Memory Cards base, an 8-step
   teacher to a 4-step student, for half of ``train_minutes``, in bf16.
5. ``shortcut``: shortcut training (``come_rl.shortcut``) of the shipped Memory Cards base, warm-started and made
   step-conditioned, for half of ``train_minutes``, in bf16.

The report, ``gpu_check.md`` and
``gpu_check.json`` in ``out_dir/<device name>/``, holds the device (name, capability, memory, torch and CUDA
versions), and per step its command, exit code, seconds and the tail of its output; every step's own files are in
the same folder. The default limits add up to under 10 minutes on one recent GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from come_rl.cli_args import parse_cli
from come_rl.io_utils import atomic_write_text

__all__ = ["GPUCheckConfig", "plan", "run_check"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GPUCheckConfig:
    """Every field is a ``key=value`` argument of ``python -m come_rl.gpu_check``."""

    out_dir: str = "results/gpu"
    device: str = "cuda"
    """cuda or cuda:N: the GPU every step uses."""
    train_minutes: float = 2.0
    """the torchrun training run's budget."""
    step_timeout_s: float = 240.0
    """the longest a step may take before it is stopped and reported as timed out."""
    dry_run: bool = False
    """write the plan (device "dry-run", every step's command, nothing run); needs no GPU."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be cuda or cuda:N (the GPU to check), got {self.device!r}")
        if not float(self.train_minutes) > 0:
            raise ValueError(f"train_minutes must be > 0, got {self.train_minutes}")
        if not float(self.step_timeout_s) >= 10:
            raise ValueError(f"step_timeout_s must be >= 10 seconds, got {self.step_timeout_s}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "gpu"


def plan(config: GPUCheckConfig, folder: Path) -> list[tuple[str, list[str]]]:
    """(step name, argv) of every step, writing into ``folder``."""
    python = sys.executable  # every step sees the chosen GPU as cuda (CUDA_VISIBLE_DEVICES, run_check)
    steps = [("cuda_tests", [python, "-m", "pytest", "-q", "tests/test_devices.py", "-k", "cuda"])]
    for precision in ("fp32", "bf16"):
        steps.append((f"bench_{precision}", [python, "-m", "come_rl.bench", "world_model", "device=cuda",
                                             f"precision={precision}", f"out_dir={folder / f'bench_{precision}'}"]))
    steps.append(("torchrun_train", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                                     "come_rl.train", "model=unet_cards", "data=online:memory_cards",
                                     f"minutes={config.train_minutes}", "device=cuda", "precision=bf16",
                                     f"out={folder / 'train'}"]))
    steps.append(("distill", [python, "-m", "come_rl.train", "data=online:memory_cards",
                              f"distill_from={ROOT / 'come_rl' / 'checkpoints' / 'memory_cards' / 'base'}",
                              "distill_steps=4", "warmup_steps=0", "lr=1e-4", "batch_size=64",
                              f"minutes={config.train_minutes / 2:g}", "device=cuda", "precision=bf16",
                              f"out={folder / 'distill'}"]))
    steps.append(("shortcut", [python, "-m", "come_rl.train", "data=online:memory_cards", "model=unet_cards",
                               f"init_from={ROOT / 'come_rl' / 'checkpoints' / 'memory_cards' / 'base'}",
                               "shortcut_fraction=0.5", "shortcut_max_steps=4", "drop_prob=0.1", "target=full",
                               "warmup_steps=0", "lr=2e-4", "batch_size=64", f"minutes={config.train_minutes / 2:g}",
                               "device=cuda", "precision=bf16", f"out={folder / 'shortcut'}"]))
    return steps


def _device_info(config: GPUCheckConfig) -> dict:
    import torch

    if config.dry_run:
        return {"name": "dry-run", "torch": torch.__version__}
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: torch.cuda.is_available() is False. Run this on a machine with an NVIDIA GPU "
                         "and a CUDA build of torch, or pass dry_run=true to write the plan only")
    index = int(config.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise SystemExit(f"device={config.device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    properties = torch.cuda.get_device_properties(index)
    return {"name": properties.name, "capability": f"{properties.major}.{properties.minor}",
            "memory_GiB": round(properties.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": bool(torch.cuda.is_bf16_supported())}


def run_check(config: GPUCheckConfig) -> dict:
    """Run (or with ``dry_run`` only plan) every step; returns the report written to ``gpu_check.json``."""
    import os

    device = _device_info(config)
    folder = Path(config.out_dir) / _slug(device["name"])
    folder.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    index = config.device.partition(":")[2]
    if index:  # every step sees the chosen GPU as cuda:0
        environment["CUDA_VISIBLE_DEVICES"] = index
    report = {"device": device, "command": "python -m come_rl.gpu_check " + " ".join(
        f"{key}={value}" for key, value in vars(config).items()), "steps": []}
    for name, argv in plan(config, folder):
        row = {"step": name, "command": " ".join(argv[1:] if argv[0] == sys.executable else argv)}
        if config.dry_run:
            row.update(returncode=None, seconds=0.0, status="planned", tail="")
        else:
            print(f"[gpu_check] {name}: {row['command']}", flush=True)
            start = time.monotonic()
            try:
                done = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True,
                                      timeout=config.step_timeout_s)
                returncode, output = done.returncode, done.stdout + done.stderr
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired as expired:
                returncode, status = None, f"timed out after {config.step_timeout_s:g} s"
                output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else \
                    str(expired.stdout or "")
            row.update(returncode=returncode, seconds=round(time.monotonic() - start, 1), status=status,
                       tail=output[-1500:])
            print(f"[gpu_check] {name}: {status} in {row['seconds']} s", flush=True)
        report["steps"].append(row)
        _write(report, folder)  # after every step: a stopped check keeps what it measured
    return report


def _write(report: dict, folder: Path) -> None:
    atomic_write_text(folder / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    device = report["device"]
    lines = [f"# GPU check: {device['name']}", "", f"`{report['command']}`", "",
             "Device: " + ", ".join(f"{key} {value}" for key, value in device.items()), "",
             "| step | status | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {row['step']} | {row['status']} | {row['seconds']} | `{row['command']}` |" for row in report["steps"]]
    for row in report["steps"]:
        if row["tail"]:
            lines += ["", f"## {row['step']} (last lines)", "", "```", row["tail"].rstrip(), "```"]
    atomic_write_text(folder / "gpu_check.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, GPUCheckConfig,
                       usage="usage: python -m come_rl.gpu_check [out_dir=results/gpu] [train_minutes=2] [dry_run=true]")
    report = run_check(config)
    failed = [row["step"] for row in report["steps"] if row["status"] not in ("passed", "planned")]
    print(f"[gpu_check] report: {Path(config.out_dir) / _slug(report['device']['name']) / 'gpu_check.md'}"
          + (f"; not passed: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
