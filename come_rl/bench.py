"""Benchmarks (not tests): where the time of imagination, composition and memorization goes.

Usage:
    python -m come_rl.bench world_model [checkpoint=come_rl/checkpoints/memory_cards batch=32 horizon=2 steps=10]
    python -m come_rl.bench world_model device=cuda [precision=bf16 compile=true]
    python -m come_rl.bench planners [decisions=3 device=auto]
    python -m come_rl.bench dit ['names=["dit_cpu"]' 'batch_sizes=[1, 32]']   # the DiT's context cache
    python -m come_rl.bench threads [checkpoint=memory_maze threads=[1,2] busy=[0,1] repeats=5]
    python -m come_rl.bench long_episode [checkpoint=memory_cards steps=1000 memorize_every=50 memorize_steps=25]
    python -m come_rl.bench decision [checkpoint=memory_maze population=24 horizon=4 steps=4 reference_tree=DIR]

``world_model`` writes ``results/bench/world_model.csv`` + ``.md``: imagined frames per second for the base alone and
for every composition (base + LTM; base + LTM + STM + SLTM), the cost ratio to the base, network calls per denoising
step, achieved GFLOP/s of ``imagine`` (FLOPs counted by torch's FlopCounterMode) against the fp32 matmul peak measured
in the same run, memorization time per step for LoRA ranks 8/16/32/64 against one sampling step, and peak memory
(host RSS, and the GPU's peak allocation on CUDA). ``device`` / ``precision`` / ``compile`` are those of
``WorldModel.load`` (``come_rl.devices``); GPU timings wait for the GPU (``torch.cuda.synchronize``).
``threads`` writes ``results/bench/threads.csv`` + ``.md``: one ``imagine`` of the default CEM decision (population 24,
horizon 4, 4 DDIM steps, base + LTM after memorization) at each torch thread count, on a quiet machine and beside
``busy`` other processes that each keep one core busy with 1-thread matmuls (a busy laptop, or a second experiment),
alternating the settings in one run; it chooses ``run.threads`` (issue 14, finding 7).
``long_episode`` writes ``results/bench/long_episode.csv`` + ``.md`` + ``.png``: a random-policy Memory Cards episode of
``steps`` frames streamed through the memory wrapper (the paper's setting: memorize every 50 frames for 25 steps), with
the process's resident and peak memory and the seconds of each memorization call: memory must stay flat and a call must
not cost more as the episode grows.
``decision`` writes ``results/bench/decision.csv`` + ``.md``: one CEM decision of the default run split into imagination,
LPIPS and the planner's own work, in fp32, bf16 autocast (where the CPU has bfloat16 kernels) and fp32 through
torch.compile, with each one's frame difference and plan agreement to fp32; ``reference_tree=`` adds an older
checkout's fp32 decision, timed in fresh processes alternated with this tree's.
All ratios come from one run (these machines are noisy). The STM and SLTM are untrained transformer experts here
(their cost does not depend on their weights) unless the checkpoint holds trained ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from come_rl import devices
from come_rl.devices import matmul_peak_gflops, synchronize
from come_rl.diffusion import CosineSchedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.cli_args import parse_cli
from come_rl.composition import Composer, compose_noise_predictions
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
    from come_rl.nets.registry import MODEL_PRESETS, build_backbone

    name, kwargs = MODEL_PRESETS[preset]
    backbone = build_backbone(name, **dict(kwargs, frame_size=frame_size, action_dim=action_dim))
    return DiffusionExpert(backbone, CosineSchedule(), name=role, uses_poses=uses_poses).eval()


def _checkpoint_expert(checkpoint: str, role: str) -> DiffusionExpert | None:
    from come_rl.checkpoint import load_expert

    directory = Path(checkpoint)
    if not (directory / f"{role}.safetensors").is_file():
        return None
    return load_expert(directory, role)[0]


def _filled_model(config: WorldModelBenchConfig, experts: list[str], stm=None, sltm=None) -> WorldModel:
    from envs.memory_cards import MemoryCardsEnv, cursor_pose_model

    wm = WorldModel.load(config.checkpoint, experts=["base"], sampler={"steps": config.steps}, device=config.device)
    # the checkpoint's own composition rule (alphas, gates, pairwise) with the asked experts: its cost is the shipped one
    model = WorldModel(wm.base, wm.action_spec, wm.frame_shape[-1], stm=stm, sltm=sltm,
                       composition=dataclasses.replace(wm.composition, experts=experts), sampler=wm.sampler,
                       memorize_config=wm.memorize_config, pose_model=cursor_pose_model, device=wm.device,
                       precision=config.precision, compile=config.compile)
    env = MemoryCardsEnv(size=wm.frame_shape[-1])
    frame, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    model.reset()
    model.observe(frame, None, info["pose"])
    for _ in range(40):
        action = env.random_policy_action(rng)
        frame, *_, info = env.step(action)
        model.observe(frame, env.action_spec.encode(action), info["pose"])
    return model


class NaiveComposer(Composer):
    """The reference a plain implementation runs (as the authors' code and NWM do): at every denoising step every
    expert's context is prepared anew and every (expert, condition) pair is its own network call, the LTM's baseline
    (the base's conditional prediction) included, and no pass is skipped. Same rule, same numbers (the benchmark
    records the largest difference), more work: what the batched, cached :class:`Composer` saves."""

    def bind(self, conditions: dict):
        return functools.partial(self._naive_denoise, conditions)

    def _predict(self, conditions: dict, term, x_t: torch.Tensor, t: torch.Tensor, drop: bool) -> torch.Tensor:
        condition = conditions[term.name]
        rows = condition["context"].shape[0]
        state = term.expert.prepare(condition["context"], condition["actions"], condition.get("poses"),
                                    torch.full((rows,), drop, dtype=torch.bool, device=condition["context"].device))
        self.network_calls += 1
        return term.expert.predict_eps(state, x_t, t)

    def _naive_denoise(self, conditions: dict, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        by_name = {term.name: term for term in self.terms}
        conditional = {term.name: self._predict(conditions, term, x_t, t, False) for term in self.terms}
        baselines = []
        for term in self.terms:
            if term.alpha == 1.0:
                baselines.append(None)
            elif term.baseline == "unconditional":
                baselines.append(self._predict(conditions, term, x_t, t, True))
            else:  # the baseline expert's conditional pass, run again
                baselines.append(self._predict(conditions, by_name[term.baseline], x_t, t, False))
        weights = self._weights(float(t.max()))
        return compose_noise_predictions([conditional[term.name] for term in self.terms], baselines,
                                         [term.alpha for term in self.terms],
                                         [weights[term.name] for term in self.terms], self.normalize)


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
    from come_rl.results import write_table

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
    stm, sltm = _checkpoint_expert(config.checkpoint, "stm"), _checkpoint_expert(config.checkpoint, "sltm")
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
    for alpha in (2.0, 1.0):
        mark = " (shipped)" if shipped == {"stm": alpha, "sltm": alpha} else ""
        compositions[f"CoME, STM/SLTM alpha {alpha:g}{mark}"] = (["base", "ltm", "stm", "sltm"], stm, sltm,
                                                                 {"stm": alpha, "sltm": alpha})
    actions = torch.nn.functional.one_hot(torch.randint(0, action_dim, (config.batch, config.horizon), device="cpu"),
                                          action_dim).float()
    rows = []
    base_seconds = None
    for name, (experts, stm_expert, sltm_expert, *alphas) in compositions.items():
        model = _filled_model(config, experts, stm_expert, sltm_expert)
        if alphas:
            model.composition = dataclasses.replace(model.composition,
                                                    alphas={**model.composition.alphas, **alphas[0]})
        if model.ltm is not None:
            model.memorize(steps=2)  # non-zero adapters, as after memorization
        seconds, frames = _time_imagine(model, actions, config.repeats, device)
        calls_per_step = model.last_network_calls / (config.horizon * config.steps)
        fast_composer = model._composer
        model._composer = lambda fast=fast_composer: NaiveComposer(fast().terms, normalize=fast().normalize,
                                                                   pairwise=fast().pairwise)
        naive_seconds, naive_frames = _time_imagine(model, actions, config.repeats, device)
        naive_calls_per_step = model.last_network_calls / (config.horizon * config.steps)
        model._composer = fast_composer
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


def _default_decision_model(directory: Path, steps: int, walk: int = 16) -> tuple[WorldModel, np.ndarray]:
    """The world model of the default planning run at its first decisions: Memory Maze base + LTM on the CPU (fp32),
    after observing a seeded ``walk``-step random walk and one short memorization (adapters in place). Returns it and
    the walk's first frame (a goal ``walk`` steps back, as the run's goal-reaching tasks use)."""
    from envs.memory_maze import MemoryMazeEnv

    model = WorldModel.load(directory, experts=["base", "ltm"], sampler={"steps": steps}, device="cpu")
    env = MemoryMazeEnv(maze_size=9, image_size=model.frame_shape[-1])
    frame, info = env.reset(seed=0)
    goal = frame
    model.reset()
    model.observe(frame, None, info.get("pose"))
    rng = np.random.default_rng(0)
    for _ in range(walk):
        action = int(rng.integers(env.action_space.n))
        frame, *_, info = env.step(action)
        model.observe(frame, model.action_spec.encode(action), info.get("pose"))
    env.close()
    model.memorize(steps=2)  # adapters in place, as in the default run after its first memorization
    return model, goal


@dataclass
class ThreadsBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    batch: int = 24
    """imagined candidates per call (the default CEM population)."""
    horizon: int = 4
    steps: int = 4
    """denoising steps per imagined frame (the default run's sampler_steps)."""
    threads: list = field(default_factory=lambda: [1, 2])
    busy: list = field(default_factory=lambda: [0, 1])
    """how many other processes keep a core busy (1-thread matmul loops) while a setting is timed."""
    repeats: int = 5
    """timed imagine calls per setting (rounds alternate the settings)."""
    out_dir: str = "results/bench"


_BUSY_LOOP = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
              "while True:\n    a = torch.tanh(a @ a) \n")


def bench_threads(config: ThreadsBenchConfig) -> list[dict]:
    """Seconds per ``imagine`` of one CEM decision at each thread count, quiet and beside busy processes."""
    import os
    import subprocess

    from come_rl.checkpoint import resolve_checkpoint
    from come_rl.results import write_table

    if not config.threads or any(int(t) < 1 for t in config.threads):
        raise ValueError(f"threads must list thread counts >= 1, got {config.threads}")
    if not config.busy or any(int(b) < 0 for b in config.busy) or config.repeats < 1:
        raise ValueError(f"busy must list counts >= 0 and repeats be >= 1, got {config.busy}, {config.repeats}")
    directory = resolve_checkpoint(config.checkpoint)
    torch.set_num_threads(1)
    model, _ = _default_decision_model(directory, config.steps)
    dim = model.action_spec.dim
    actions = torch.nn.functional.one_hot(torch.randint(0, dim, (config.batch, config.horizon),
                                                        generator=torch.Generator().manual_seed(0)), dim).float()
    settings = [(int(b), int(t)) for b in config.busy for t in config.threads]
    times: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
    cores = os.cpu_count() or 1
    for round_ in tqdm(range(config.repeats), desc="threads benchmark rounds"):
        for busy, threads in settings:
            loops = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for _ in range(busy)]
            try:
                if busy:
                    time.sleep(1.0)  # the loops are running
                torch.set_num_threads(threads)
                model.imagine(actions[:, :1], seed=0)  # warm-up at this thread count
                start = time.perf_counter()
                model.imagine(actions, seed=round_)
                times[(busy, threads)].append(time.perf_counter() - start)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
    rows = []
    for busy, threads in settings:
        values = np.array(times[(busy, threads)])
        reference = np.median(times[(busy, int(config.threads[0]))])
        rows.append({"other_busy_processes": busy, "torch_threads": threads, "cores": cores,
                     "median_s_per_decision_imagine": float(np.median(values)), "min_s": float(values.min()),
                     "max_s": float(values.max()), f"median_over_{config.threads[0]}_thread": float(np.median(values) / reference),
                     "calls": len(values), "batch": config.batch, "horizon": config.horizon,
                     "denoising_steps": config.steps})
    out = Path(config.out_dir)
    write_table(out / "threads.csv", rows, md_path=out / "threads.md",
                title=f"imagine() of one CEM decision by torch thread count ({directory.name}, base + LTM, batch "
                      f"{config.batch} x horizon {config.horizon}, {config.steps} DDIM steps, {cores} cores; busy "
                      f"processes each run a 1-thread matmul loop; `python -m come_rl.bench threads`)")
    return rows


@dataclass
class LongEpisodeBenchConfig:
    checkpoint: str = "memory_cards"
    steps: int = 1000
    memorize_every: int = 50
    memorize_steps: int = 25
    threads: int = 2
    seed: int = 0
    out_dir: str = "results/bench"


def _rss_mb() -> float:
    """The process's resident memory now (Linux /proc; elsewhere its peak)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_long_episode(config: LongEpisodeBenchConfig) -> list[dict]:
    """Stream one long episode through ``WorldModelMemoryWrapper``; a row per memorization call."""
    from come_rl.checkpoint import resolve_checkpoint
    from come_rl.results import write_table
    from envs.memory_cards import MemoryCardsEnv, cursor_pose_model
    from envs.memory_wrapper import WorldModelMemoryWrapper

    if config.steps < config.memorize_every or config.memorize_every < 1 or config.memorize_steps < 1:
        raise ValueError(f"need steps >= memorize_every >= 1 and memorize_steps >= 1, got {config.steps}, "
                         f"{config.memorize_every}, {config.memorize_steps}")
    torch.set_num_threads(config.threads)
    directory = resolve_checkpoint(config.checkpoint)
    model = WorldModel.load(directory, experts=["base", "ltm"], device="cpu", pose_model=cursor_pose_model)
    env = WorldModelMemoryWrapper(MemoryCardsEnv(max_steps=config.steps + 1), model,
                                  memorize_every=config.memorize_every, memorize_steps=config.memorize_steps)
    env.set_memorize_seed(config.seed)
    env.reset(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    rows = []
    for step in tqdm(range(1, config.steps + 1), desc="long episode", unit="step"):
        *_, info = env.step(env.unwrapped.random_policy_action(rng))
        if info.get("memory/memorized"):
            rows.append({"env_step": step, "frames_in_memory": len(model.memory),
                         "memorize_seconds": float(info["memory/seconds"]), "rss_MB": _rss_mb(),
                         "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "loss": float(info.get("memory/loss_last", float("nan")))})
    first, last = rows[0], rows[-1]
    for row in rows:
        row["peak_growth_since_first"] = row["peak_rss_MB"] / first["peak_rss_MB"] - 1
        row["seconds_over_first_call"] = row["memorize_seconds"] / first["memorize_seconds"]
    out = Path(config.out_dir)
    title = (f"A {config.steps}-step Memory Cards episode streamed through the memory wrapper ({directory.name}, "
             f"base + LTM, {model.memorize_config.method} memorization of batch {model.memorize_config.batch_size}, "
             f"{config.memorize_steps} steps every {config.memorize_every} frames, {config.threads} threads): peak RSS "
             f"{first['peak_rss_MB']:.0f} MB after the first call, {last['peak_rss_MB']:.0f} MB after the last "
             f"({100 * last['peak_growth_since_first']:+.1f} %); `python -m come_rl.bench long_episode`")
    write_table(out / "long_episode.csv", rows, md_path=out / "long_episode.md", title=title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [row["env_step"] for row in rows]
    left.plot(steps, [row["rss_MB"] for row in rows], "-o", markersize=3, label="resident")
    left.plot(steps, [row["peak_rss_MB"] for row in rows], "--", label="peak")
    left.set_xlabel("env step")
    left.set_ylabel("MB")
    left.set_ylim(bottom=0)
    left.legend()
    left.set_title("process memory")
    right.plot(steps, [row["memorize_seconds"] for row in rows], "-o", markersize=3)
    right.set_xlabel("env step")
    right.set_ylabel("seconds per memorization call")
    right.set_ylim(bottom=0)
    right.set_title(f"{config.memorize_steps} steps every {config.memorize_every} frames")
    figure.tight_layout()
    figure.savefig(out / "long_episode.png", dpi=100)
    plt.close(figure)
    return rows


@dataclass
class DecisionBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    population: int = 24
    elites: int = 4
    iterations: int = 1
    horizon: int = 4
    steps: int = 4
    """the default run's settings (conf/planner/cem.yaml, conf/agent/cem.yaml, the Memory Maze model's sampler)."""
    variants: list = field(default_factory=lambda: ["fp32", "bf16", "compile"])
    """fp32 is the default; bf16 (autocast) is timed where this CPU has bfloat16 kernels; compile = fp32 through
    torch.compile (inductor; the warm-up decision pays the compilation)."""
    decisions: int = 5
    """timed decisions per variant (rounds alternate the variants)."""
    threads: int = 1
    reference_tree: str = ""
    """another checkout of come_rl (e.g. ``git worktree add /tmp/before <rev>``): its fp32 decision is timed too, in
    fresh processes alternated with this tree's, through the API both share (before/after from one run)."""
    out_dir: str = "results/bench"


# One fp32 CEM decision of the default run, timed in a fresh process of a given checkout through the API every version
# of come_rl since the maze checkpoint shipped has (WorldModel.load/observe/memorize, CEMPlanner, LPIPSGoalObjective).
_DECISION_SCRIPT = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
from come_rl.world_model import WorldModel
from come_rl.metrics.lpips_metric import get_lpips
from envs.memory_maze import MemoryMazeEnv
from planners.cem import CEMPlanner
from planners.objectives import LPIPSGoalObjective
model = WorldModel.load({directory!r}, experts=["base", "ltm"], sampler={{"steps": {steps}}})
env = MemoryMazeEnv(maze_size=9, image_size=model.frame_shape[-1])
frame, info = env.reset(seed=0)
goal = frame
model.reset()
model.observe(frame, None, info.get("pose"))
rng = np.random.default_rng(0)
for _ in range(16):
    action = int(rng.integers(env.action_space.n))
    frame, *_, info = env.step(action)
    model.observe(frame, model.action_spec.encode(action), info.get("pose"))
env.close()
model.memorize(steps=2)
lpips = get_lpips(device="cpu")
times = []
for round_ in range({decisions} + 1):
    planner = CEMPlanner(population={population}, elites={elites}, iterations={iterations}, seed=round_)
    objective = LPIPSGoalObjective(model, goal, lpips=lpips, generator=torch.Generator().manual_seed(round_))
    start = time.perf_counter()
    planner.plan(objective, model.action_spec, {horizon})
    if round_:
        times.append(time.perf_counter() - start)
print("DECISION_TIMES " + json.dumps(times))
"""


def _git_revision(tree: Path) -> str:
    """The short commit of a checkout (``+dirty`` with uncommitted changes), or its folder name outside git."""
    import subprocess

    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return tree.name
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _time_decisions_in(tree: Path, directory: Path, config: DecisionBenchConfig, decisions: int) -> list[float]:
    """Seconds per fp32 decision of the checkout at ``tree``, in a fresh single-purpose process."""
    import os
    import subprocess

    script = _DECISION_SCRIPT.format(threads=int(config.threads), directory=str(directory.resolve()), steps=config.steps,
                                     decisions=decisions, population=config.population, elites=config.elites,
                                     iterations=config.iterations, horizon=config.horizon)
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(int(config.threads))}
    result = subprocess.run([sys.executable, "-c", script], cwd=tree, env=environment, capture_output=True, text=True,
                            check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DECISION_TIMES ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"timing a decision in {tree} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def bench_decision(config: DecisionBenchConfig) -> list[dict]:
    """One CEM decision of the default run (``python -m come_rl.run agent=cem env=memory_maze``), split into the world
    model's imagination, LPIPS to the goal and the planner itself, per variant (fp32, bf16 autocast, fp32 through
    torch.compile); each variant's frames and plans are compared with fp32's from the same seeds."""
    from come_rl.checkpoint import resolve_checkpoint
    from come_rl.metrics.lpips_metric import get_lpips
    from come_rl.results import write_table
    from planners.cem import CEMPlanner
    from planners.objectives import LPIPSGoalObjective

    unknown = [v for v in config.variants if v not in ("fp32", "bf16", "compile")]
    if unknown or not config.variants or config.variants[0] != "fp32" or config.decisions < 1:
        raise ValueError(f"variants must start with fp32 (the reference) and name fp32, bf16 or compile, and decisions "
                         f"be >= 1; got {config.variants}, {config.decisions}")
    if config.reference_tree and not (Path(config.reference_tree) / "come_rl" / "world_model.py").is_file():
        raise ValueError(f"reference_tree={config.reference_tree!r} is not a come_rl checkout (no "
                         f"come_rl/world_model.py there); make one with: git worktree add /tmp/before <rev>")
    skipped = [v for v in config.variants if v == "bf16" and not devices.cpu_supports_bf16()]
    variants = [v for v in config.variants if v not in skipped]
    torch.set_num_threads(int(config.threads))
    directory = resolve_checkpoint(config.checkpoint)
    model, goal = _default_decision_model(directory, config.steps)
    lpips = get_lpips(device="cpu")
    spec = model.action_spec
    times = {v: {"decision_s": [], "imagine_s": [], "lpips_s": [], "planner_s": []} for v in variants}
    plans: dict[str, list[torch.Tensor]] = {v: [] for v in variants}

    def use(variant: str) -> None:
        model.precision = "bf16" if variant == "bf16" else "fp32"
        model.use_compile(variant == "compile")

    for round_ in tqdm(range(config.decisions + 1), desc="decision benchmark rounds"):
        for variant in variants:
            use(variant)
            planner = CEMPlanner(population=config.population, elites=config.elites, iterations=config.iterations,
                                 seed=round_)
            objective = LPIPSGoalObjective(model, goal, lpips=lpips, generator=torch.Generator().manual_seed(round_))
            start = time.perf_counter()
            plan = planner.plan(objective, spec, config.horizon)
            total = time.perf_counter() - start
            if round_ == 0:
                continue  # warm-up
            timings = objective.timings
            times[variant]["decision_s"].append(total)
            times[variant]["imagine_s"].append(timings["imagine_s"])
            times[variant]["lpips_s"].append(timings["score_s"])
            times[variant]["planner_s"].append(total - timings["imagine_s"] - timings["score_s"])
            plans[variant].append(plan.argmax(-1))
    actions = torch.nn.functional.one_hot(torch.randint(0, spec.dim, (config.population, config.horizon),
                                                        generator=torch.Generator().manual_seed(0)), spec.dim).float()
    frames = {}
    for variant in variants:
        use(variant)
        frames[variant] = model.imagine(actions, seed=0)
    use("fp32")
    reference = variants[0]
    trees: dict[str, list[float]] = {}
    if config.reference_tree:
        # before/after in one run: this tree's and the reference tree's fp32 decisions in fresh processes, alternated
        here, other = Path(__file__).resolve().parents[1], Path(config.reference_tree).resolve()
        trees = {"reference_tree": [], "this_tree": []}
        for _ in tqdm(range(config.decisions), desc="decision benchmark, fresh processes"):
            trees["reference_tree"] += _time_decisions_in(other, directory, config, 1)
            trees["this_tree"] += _time_decisions_in(here, directory, config, 1)
    rows = []
    for variant in variants:
        median = {key: float(np.median(values)) for key, values in times[variant].items()}
        same = [bool(torch.equal(a, b)) for a, b in zip(plans[variant], plans[reference])]
        rows.append({
            "variant": variant, "decisions": config.decisions, "population": config.population,
            "horizon": config.horizon, "denoising_steps": config.steps, "threads": config.threads,
            "median_decision_s": median["decision_s"], "median_imagine_s": median["imagine_s"],
            "median_lpips_s": median["lpips_s"], "median_planner_s": median["planner_s"],
            "share_outside_world_model": (median["lpips_s"] + median["planner_s"]) / median["decision_s"],
            f"decision_x_{reference}": median["decision_s"] / float(np.median(times[reference]["decision_s"])),
            f"frames_mean_abs_diff_to_{reference}": float((frames[variant] - frames[reference]).abs().mean()),
            f"plans_equal_to_{reference}": float(np.mean(same)),
        })
    for name, values in trees.items():
        tree = Path(config.reference_tree) if name == "reference_tree" else Path(__file__).resolve().parents[1]
        rows.append({"variant": f"fp32, {name} at {_git_revision(tree)} (fresh processes)",
                     "decisions": config.decisions, "population": config.population, "horizon": config.horizon,
                     "denoising_steps": config.steps, "threads": config.threads,
                     "median_decision_s": float(np.median(values)),
                     f"decision_x_{reference}": float(np.median(values) / np.median(times[reference]["decision_s"]))})
    out = Path(config.out_dir)
    write_table(out / "decision.csv", rows, md_path=out / "decision.md",
                title=f"One CEM decision of the default run ({directory.name}, base + LTM after memorization, population "
                      f"{config.population} x horizon {config.horizon}, {config.iterations} iteration, {config.steps} "
                      f"DDIM steps, LPIPS-AlexNet to the goal; {config.threads} thread(s); medians of {config.decisions} "
                      f"decisions, variants alternated in one run; frames in [-1, 1]"
                      + (f"; skipped: {skipped} (no bfloat16 kernels)" if skipped else "")
                      + "; `python -m come_rl.bench decision`)")
    return rows


SUBCOMMANDS = ("world_model", "planners", "threads", "long_episode", "dit", "decision")


def main(argv: list[str] | None = None) -> None:
    """``python -m come_rl.bench <subcommand> [key=value ...]``: the one entry point of the benchmarks."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m come_rl.bench {'|'.join(SUBCOMMANDS)} [key=value ...]"
    if argv and argv[0] in ("--help", "-h"):
        print(f"{usage}\n(python -m come_rl.bench <benchmark> --help lists its settings)")
        raise SystemExit(0)
    if not argv or argv[0] not in SUBCOMMANDS:
        raise SystemExit(usage)
    if argv[0] == "planners":
        from come_rl.bench_planners import PlannersBenchConfig, bench_planners

        run, config_cls = bench_planners, PlannersBenchConfig
    elif argv[0] == "dit":
        from come_rl.nets.dit_benchmark import DitBenchConfig, bench_dit

        run, config_cls = bench_dit, DitBenchConfig
    else:
        run, config_cls = {"world_model": (bench_world_model, WorldModelBenchConfig),
                           "threads": (bench_threads, ThreadsBenchConfig),
                           "long_episode": (bench_long_episode, LongEpisodeBenchConfig),
                           "decision": (bench_decision, DecisionBenchConfig)}[argv[0]]
    for row in run(parse_cli(argv[1:], config_cls)):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
