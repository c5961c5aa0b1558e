"""``python -m come_rl.bench world_model``: imagined frames per second per composition against the base, the naive
reference (every context prepared anew, one network call per expert and condition), GFLOP/s against a matmul peak
measured in the same run, and memorization time per gradient step against a sampling step."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from come_rl import devices
from come_rl.bench.common import checkpoint_expert, filled_cards_model
from come_rl.devices import matmul_peak_gflops, synchronize
from come_rl.diffusion import CosineSchedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.registry import MODEL_PRESETS, build_backbone
from come_rl.results import write_table
from come_rl.world_model import WorldModel


@dataclass
class WorldModelBenchConfig:
    checkpoint: str = "come_rl/checkpoints/memory_cards"
    batch: int = 32
    horizon: int = 2
    steps: int = 10
    """denoising steps per imagined frame."""
    repeats: int = 2
    threads: int = 2
    memorize_steps: int = 5
    out_dir: str = "results/bench"
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""
    compile: bool = False
    """torch.compile the denoising networks (the warm-up call pays the compilation)."""


def _transformer_expert(preset: str, role: str, frame_size: int, action_dim: int, uses_poses: bool) -> DiffusionExpert:
    """An untrained expert of a training preset (come_rl.nets.registry.MODEL_PRESETS): the cost of what the project
    trains."""
    name, kwargs = MODEL_PRESETS[preset]
    backbone = build_backbone(name, **dict(kwargs, frame_size=frame_size, action_dim=action_dim))
    return DiffusionExpert(backbone, CosineSchedule(), name=role, uses_poses=uses_poses).eval()


def _filled_model(config: WorldModelBenchConfig, experts: list[str], stm=None, sltm=None) -> WorldModel:
    return filled_cards_model(config.checkpoint, config.steps, experts, stm, sltm, config.device, config.precision,
                              config.compile)


def _time_imagine(model: WorldModel, actions: torch.Tensor, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """(fastest seconds of ``repeats`` imagine calls after a warm-up, the frames of the seed-0 call)."""
    model.imagine(actions[:, :1], seed=0)  # warm-up
    times, outputs = [], []
    for r in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        outputs.append(model.imagine(actions, seed=r))  # returns on the CPU: the copy waits for the GPU
        times.append(time.perf_counter() - start)
    return min(times), outputs[0]


def bench_world_model(config: WorldModelBenchConfig) -> list[dict]:
    torch.set_num_threads(config.threads)
    device = devices.resolve_device(config.device)
    precision = devices.resolve_precision(config.precision, device)
    peak = matmul_peak_gflops(device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    probe = WorldModel.load(config.checkpoint, experts=["base"], device=device)
    size, action_dim = probe.frame_shape[-1], probe.action_spec.dim
    # The checkpoint's trained STM / SLTM when it ships them (their cost is the point here, not their quality);
    # otherwise untrained experts of the training presets (stm_cards, sltm_cards).
    stm, sltm = checkpoint_expert(config.checkpoint, "stm"), checkpoint_expert(config.checkpoint, "sltm")
    stm = stm or _transformer_expert("stm_cards", "stm", size, action_dim, uses_poses=False)
    sltm = sltm or _transformer_expert("sltm_cards", "sltm", size, action_dim, uses_poses=True)
    compositions = {
        "base": (["base"], None, None),
        "base+ltm": (["base", "ltm"], None, None),
        "base+stm": (["base", "stm"], stm, None),
    }
    # CoME (base + LTM + STM + SLTM) with the STM and SLTM contrastive (alpha 2: a conditional and an unconditional row
    # each) and as plain factors (alpha 1: no unconditional rows); "(shipped)" marks the checkpoint's own alphas
    shipped = {role: probe.composition.alphas.get(role) for role in ("stm", "sltm")}
    split = probe.composition.active_below
    for alpha in (2.0, 1.0):
        mark = " (shipped)" if shipped == {"stm": alpha, "sltm": alpha} and not split else ""
        compositions[f"CoME, STM/SLTM alpha {alpha:g}{mark}"] = (["base", "ltm", "stm", "sltm"], stm, sltm,
                                                                 {"alphas": {"stm": alpha, "sltm": alpha},
                                                                  "active_below": {}})
    # Split gates: the LTM's pair at its own gate and above, the STM and SLTM (alpha 1) below it: two rows per step.
    gate = probe.composition.active_from.get("ltm")
    if gate:
        mark = " (shipped)" if split == {"stm": gate, "sltm": gate} and shipped == {"stm": 1.0, "sltm": 1.0} else ""
        compositions[f"CoME split: LTM t>={gate:g}, STM/SLTM alpha 1 below{mark}"] = (
            ["base", "ltm", "stm", "sltm"], stm, sltm,
            {"alphas": {"stm": 1.0, "sltm": 1.0}, "active_below": {"stm": gate, "sltm": gate}})
    actions = torch.nn.functional.one_hot(torch.randint(0, action_dim, (config.batch, config.horizon), device="cpu"),
                                          action_dim).float()
    rows = []
    base_seconds = None
    for name, (experts, stm_expert, sltm_expert, *changes) in compositions.items():
        model = _filled_model(config, experts, stm_expert, sltm_expert)
        if changes:
            alphas = {**model.composition.alphas, **changes[0]["alphas"]}
            model.use_composition(dataclasses.replace(model.composition, alphas=alphas,
                                                      active_below=changes[0]["active_below"]))
        if model.ltm is not None:
            model.memorize(steps=2)  # non-zero adapters, as after memorization
        seconds, frames = _time_imagine(model, actions, config.repeats, device)
        calls_per_step = model.last_network_calls / (config.horizon * config.steps)
        model.use_composition(model.composition, reference=True)  # the same rule, every pass run anew
        naive_seconds, naive_frames = _time_imagine(model, actions, config.repeats, device)
        naive_calls_per_step = model.last_network_calls / (config.horizon * config.steps)
        model.use_composition(model.composition)
        with FlopCounterMode(display=False) as counter:
            model.imagine(actions[:, :1], seed=0)
        flops_per_frame = counter.get_total_flops() / config.batch
        frames_per_second = config.batch * config.horizon / seconds
        base_seconds = base_seconds or seconds
        params = {role: sum(p.numel() for p in model.experts[role].parameters()) for role in experts}
        rows.append({
            "composition": name, "imagined_frames_per_s": frames_per_second,
            "ms_per_frame": 1000 / frames_per_second, "cost_ratio_to_base": seconds / base_seconds,
            "network_calls_per_denoising_step": calls_per_step,
            "naive_ms_per_frame": 1000 * naive_seconds / (config.batch * config.horizon),
            "naive_over_this": naive_seconds / seconds, "naive_network_calls_per_step": naive_calls_per_step,
            "max_abs_diff_to_naive": float((frames - naive_frames).abs().max()),
            "gflop_per_frame": flops_per_frame / 1e9,
            "achieved_gflops": flops_per_frame * frames_per_second / 1e9, "matmul_peak_gflops": peak,
            "parameters_M": sum(params.values()) / 1e6, "batch": config.batch, "denoising_steps": config.steps,
            "threads": config.threads, "resolution": size, "device": str(device), "precision": precision,
            "compile": config.compile,
        })
    # Memorization cost per gradient step against one sampling (denoising) step of base + LTM.
    model = _filled_model(config, ["base", "ltm"])
    model.imagine(actions[:, :1], seed=0)  # warm-up (and compilation, with compile=true)
    synchronize(device)
    start = time.perf_counter()
    model.imagine(actions[:, :1], seed=0)
    sampling_step = (time.perf_counter() - start) / config.steps
    for rank in (8, 16, 32, 64):
        model = _filled_model(config, ["base", "ltm"])
        from come_rl.experts.long_term import LongTermMemoryExpert, MemorizeConfig

        model.ltm = LongTermMemoryExpert(model.base, MemorizeConfig(rank=rank, lora_alpha=rank))
        model.memorize(steps=1)  # warm-up (optimizer creation)
        stats = model.memorize(steps=config.memorize_steps)
        per_step = stats["seconds"] / config.memorize_steps
        rows.append({
            "composition": f"memorize LoRA r={rank} (batch {model.ltm.config.batch_size})",
            "ms_per_frame": float("nan"), "memorize_ms_per_step": 1000 * per_step,
            f"sampling_step_ms (batch {config.batch}, base+ltm)": 1000 * sampling_step,
            "memorize_step_over_sampling_step": per_step / sampling_step,
            "lora_parameters_M": sum(p.numel() for p in model.ltm.adapter_parameters) / 1e6,
            "threads": config.threads, "device": str(device), "precision": precision,
        })
    # The shipped recipe (the checkpoint's MemorizeConfig) against a sampling step of base + LTM at its own batch.
    model = _filled_model(config, ["base", "ltm"])
    recipe = model.memorize_config
    model.memorize(steps=1)  # warm-up (optimizer creation)
    per_step = model.memorize(steps=config.memorize_steps)["seconds"] / config.memorize_steps
    same_batch = torch.nn.functional.one_hot(torch.randint(0, action_dim, (recipe.batch_size, 1), device="cpu"),
                                             action_dim).float()
    model.imagine(same_batch, seed=0)  # warm-up at this batch
    synchronize(device)
    start = time.perf_counter()
    model.imagine(same_batch, seed=1)
    same_batch_step = (time.perf_counter() - start) / config.steps
    rows.append({
        "composition": f"memorize, shipped recipe ({recipe.method}, batch {recipe.batch_size})",
        "ms_per_frame": float("nan"), "memorize_ms_per_step": 1000 * per_step,
        "sampling_step_ms (same batch, base+ltm)": 1000 * same_batch_step,
        "memorize_step_over_sampling_step": per_step / same_batch_step,
        "threads": config.threads, "device": str(device), "precision": precision,
    })
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for row in rows:
        row["peak_rss_MB"] = round(peak_rss_mb, 1)
        if device.type == "cuda":
            row["peak_gpu_MB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out = Path(config.out_dir)
    csv = out / "world_model.csv"
    write_table(csv, rows, md_path=out / "world_model.md",
                         title=f"World-model benchmark ({Path(config.checkpoint).name}, {size}x{size}, batch "
                               f"{config.batch}, {config.steps} DDIM steps, {config.threads} threads, {device} "
                               f"{precision}{' compiled' if config.compile else ''}; "
                               f"`python -m come_rl.bench world_model`)")
    return rows
