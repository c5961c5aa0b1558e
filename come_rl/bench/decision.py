"""``python -m come_rl.bench decision``: one CEM decision of the default run split into imagination, LPIPS and the
planner, in fp32, bf16 autocast and torch.compile, and against an older checkout (before/after in one run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.find_object import AGENT_EXPERTS, FindConfig, MemoryCardsFindEnv, build_agent
from come_rl import devices
from come_rl.bench.common import default_decision_model
from come_rl.checkpoint import resolve_checkpoint
from come_rl.diffusion import SamplerConfig
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table
from come_rl.targets import load_planner
from planners.objectives import LPIPSGoalObjective


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
if hasattr(model, "precision"):
    model.precision = "fp32"  # timed in fp32, whatever the checkpoint's precision=auto means on this CPU
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
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return tree.name
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _time_decisions_in(tree: Path, directory: Path, config: DecisionBenchConfig, decisions: int) -> list[float]:
    """Seconds per fp32 decision of the checkout at ``tree``, in a fresh single-purpose process."""
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
    model, goal = default_decision_model(directory, config.steps)
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
            planner = load_planner("cem", seed=round_, population=config.population, elites=config.elites,
                                   iterations=config.iterations)
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


@dataclass
class DecisionStepsBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    steps: str = "1,2,4,10"
    """denoising steps per imagined frame, comma-separated; 4 is the default run's (model/memory_maze.yaml)."""
    population: int = 24
    elites: int = 4
    iterations: int = 1
    horizon: int = 4
    decisions: int = 5
    """timed decisions per step count (rounds alternate the step counts, after one warm-up round)."""
    threads: int = 1
    share_prefixes: str = "false"
    """comma-separated false / true, alternated in the same rounds: candidates that begin alike share one imagined
    sample (``planners.objectives.imagine_candidates``); each decision here starts cold (uniform action probabilities:
    the least sharing; a warm-started run shares more)."""
    out_dir: str = "results/bench"


def _share_settings(text: str) -> list[bool]:
    """``share_prefixes=false,true`` -> [False, True]."""
    names = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    if not names or any(n not in ("false", "true") for n in names) or len(set(names)) != len(names):
        raise ValueError(f"share_prefixes={text!r}: list false and/or true once each, e.g. share_prefixes=false,true")
    return [n == "true" for n in names]


def _step_counts(steps: str, decisions: int) -> list[int]:
    """``steps=1,2,4,10`` -> [1, 2, 4, 10], refusing what no sampler runs (and decisions < 1)."""
    try:
        counts = [int(s) for s in str(steps).split(",") if s.strip()]
    except ValueError as error:
        raise ValueError(f"steps={steps!r}: give comma-separated integers >= 1, e.g. steps=1,2,4,10") from error
    if not counts or min(counts) < 1 or decisions < 1:
        raise ValueError(f"steps={steps!r} must be integers >= 1 and decisions >= 1, got {decisions}")
    return counts


def bench_decision_steps(config: DecisionStepsBenchConfig) -> list[dict]:
    """The default run's CEM decision (fp32, base + LTM after memorization) at each denoising step count, alternated
    in one run: seconds per decision and their ratio to the default's 4 steps (the step count's quality is measured
    apart: ``come_rl.experiments.steps_curve``, ``come_rl.experiments.consistency``)."""
    counts = _step_counts(config.steps, config.decisions)
    shares = _share_settings(config.share_prefixes)
    torch.set_num_threads(int(config.threads))
    directory = resolve_checkpoint(config.checkpoint)
    model, goal = default_decision_model(directory, counts[0])
    lpips = get_lpips(device="cpu")
    cells = [(k, share) for k in counts for share in shares]
    times: dict[tuple, list[float]] = {cell: [] for cell in cells}
    rows_imagined: dict[tuple, list[int]] = {cell: [] for cell in cells}
    calls = count_network_rows(model)
    for round_ in tqdm(range(config.decisions + 1), desc="decision by denoising steps, rounds"):
        for k, share in cells:
            model.sampler = SamplerConfig(**{**model.sampler.__dict__, "steps": k})
            planner = load_planner("cem", seed=round_, population=config.population, elites=config.elites,
                                   iterations=config.iterations)
            objective = LPIPSGoalObjective(model, goal, lpips=lpips, generator=torch.Generator().manual_seed(round_),
                                           share_prefixes=share)
            calls.clear()
            start = time.perf_counter()
            planner.plan(objective, model.action_spec, config.horizon)
            if round_:
                times[k, share].append(time.perf_counter() - start)
                rows_imagined[k, share].append(sum(calls))
    reference = (4 if 4 in counts else counts[0], shares[0])
    rows = [{"denoising_steps": k, "share_prefixes": share, "decisions": config.decisions,
             "population": config.population, "horizon": config.horizon, "threads": config.threads,
             "network_rows": float(np.mean(rows_imagined[k, share])),
             "median_decision_s": float(np.median(times[k, share])),
             f"decision_x_{reference[0]}_steps": float(np.median(times[k, share]) / np.median(times[reference]))}
            for k, share in cells]
    out = Path(config.out_dir)
    write_table(out / "decision_steps.csv", rows, md_path=out / "decision_steps.md",
                title=f"One CEM decision of the default run by denoising steps ({directory.name}, base + LTM after "
                      f"memorization, fp32, population {config.population} x horizon {config.horizon}, "
                      f"{config.threads} thread(s); medians of {config.decisions} decisions, step counts alternated in "
                      f"one run; network_rows: frames run through an expert network per decision; `python -m "
                      f"come_rl.bench decision_steps steps={config.steps} share_prefixes={config.share_prefixes}`)")
    return rows


@dataclass
class PlaceDecisionBenchConfig:
    checkpoint: str = "memory_maze"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    population: int = 24
    elites: int = 4
    iterations: int = 1
    horizon: int = 4
    """the default run's CEM (conf/planner/cem.yaml, conf/agent/cem.yaml); its objective is conf/agent/cem.yaml's."""
    decisions: int = 5
    """timed decisions per variant (rounds alternate the variants, after one warm-up round)."""
    threads: int = 1
    out_dir: str = "results/bench"


def default_place_objective(model, goal, generator: torch.Generator):
    """The default run's objective (conf/agent/cem.yaml's ``objective``: PlaceObjective, its settings as shipped) for
    ``model`` and ``goal``."""
    from omegaconf import OmegaConf

    from come_rl.targets import call_target, import_target

    settings = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "agent" /
                                                     "cem.yaml"), resolve=False)["objective"]
    target = import_target(settings.pop("_target_"), "objective")
    settings.pop("_partial_", None)
    return call_target(target, {**settings, "world_model": model, "goal_frame": goal, "generator": generator})


def bench_place_decision(config: PlaceDecisionBenchConfig) -> list[dict]:
    """The default run's CEM decision with its own objective (the place objective: final imagined poses scored along
    the graph of memorized places, no LPIPS term) with the last step's frame sampled, as before, and with only its pose
    (``WorldModel.imagine(last_frame=False)``: the pose head reads the frame before it), alternated in one run; the
    plans and scores must be the same."""
    torch.set_num_threads(int(config.threads))
    directory = resolve_checkpoint(config.checkpoint)
    if not (directory / "odometry.json").is_file():  # checked before the walk: nothing is loaded for nothing
        raise ValueError(f"{directory} has no odometry head: the place objective scores imagined poses; bench a "
                         f"Memory Maze checkpoint (checkpoint=memory_maze)")
    model, goal = default_decision_model(directory, 1)  # 1 denoising step: the default run's (model/memory_maze.yaml)
    variants = {"last frame sampled": False, "last step's pose only": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows_imagined: dict[str, list[int]] = {name: [] for name in variants}
    plans: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    calls = count_network_rows(model)
    for round_ in tqdm(range(config.decisions + 1), desc="place decision, rounds"):
        for name, skips in variants.items():
            model.skips_last_frame = skips  # the instance's switch (the class says True)
            planner = load_planner("cem", seed=round_, population=config.population, elites=config.elites,
                                   iterations=config.iterations)
            objective = default_place_objective(model, goal, torch.Generator().manual_seed(round_))
            calls.clear()
            start = time.perf_counter()
            plan = planner.plan(objective, model.action_spec, config.horizon)
            if round_:
                times[name].append(time.perf_counter() - start)
                rows_imagined[name].append(sum(calls))
                plans[name].append(torch.as_tensor(plan).clone())
    del model.skips_last_frame
    reference = next(iter(variants))
    rows = [{"variant": name, "decisions": config.decisions, "population": config.population,
             "horizon": config.horizon, "threads": config.threads,
             "network_rows": float(np.mean(rows_imagined[name])),
             "median_decision_s": float(np.median(times[name])),
             "decision_x_last_frame_sampled": float(np.median(times[name]) / np.median(times[reference])),
             "plans_equal": float(np.mean([torch.equal(a, b) for a, b in zip(plans[name], plans[reference])]))}
            for name in variants]
    out = Path(config.out_dir)
    write_table(out / "place_decision.csv", rows, md_path=out / "place_decision.md",
                title=f"One CEM decision of the default run with its place objective ({directory.name}, base + LTM "
                      f"after memorization, 1 denoising step, fp32, population {config.population} x horizon "
                      f"{config.horizon}, {config.threads} thread(s); medians of {config.decisions} cold decisions, "
                      f"variants alternated in one run; network_rows: frames run through an expert network per "
                      f"decision; `python -m come_rl.bench place_decision`)")
    return rows


def count_network_rows(model) -> list[int]:
    """A list that every expert network call of ``model`` appends its batch to (the rows a decision costs)."""
    sizes: list[int] = []
    for expert in {id(e): e for e in [model.base, *model.experts.values()]}.values():
        predict = expert.predict_eps

        def counted(prepared, x_t, *args, _predict=predict, **kwargs):
            sizes.append(int(x_t.shape[0]))
            return _predict(prepared, x_t, *args, **kwargs)

        expert.predict_eps = counted
    return sizes


@dataclass
class FindDecisionStepsBenchConfig:
    checkpoint: str = "memory_cards"
    """a shipped checkpoint name or a directory (come_rl.checkpoint.resolve_checkpoint)."""
    agent: str = "come"
    """the find-the-object agent whose decision is timed (agents.find_object: base, ltm or come)."""
    steps: str = "1,2,3,10"
    """denoising steps per imagined frame, comma-separated; ratios are to 10 (the many-step path; the Memory Cards
    checkpoint samples with 2 by default)."""
    samples: int = 4
    """imagined samples per tile (the evaluation's default)."""
    decisions: int = 3
    """timed decisions per step count (rounds alternate the step counts, after one warm-up round)."""
    memorize_steps: int = 2
    """the decision's cost does not depend on how long the memory was trained; 2 steps put the adapters in place."""
    threads: int = 1
    precisions: str = "fp32"
    """comma-separated precisions, alternated in the same rounds (fp32, bf16: bf16 needs CUDA or a CPU with bfloat16
    kernels); ratios are to fp32 at 10 steps (or the first precision and step count listed)."""
    share_prefixes: str = "false"
    """comma-separated false / true, alternated in the same rounds: each distinct walk prefix imagined once per sample
    and nothing past a tile's uncovering (``agents.find_object.WorldModelFindAgent``)."""
    out_dir: str = "results/bench"


def bench_find_decision_steps(config: FindDecisionStepsBenchConfig) -> list[dict]:
    """The find-the-object decision (``python -m agents.find_object``: imagine walking to each of the 16 tiles and
    uncovering it, ``samples`` times each, in one batch) at each denoising step count and precision, alternated in
    one run: seconds per decision and their ratio to fp32 at 10 steps. Its success by step count is measured apart
    (``python -m agents.find_object sampler_steps=N``)."""
    counts = _step_counts(config.steps, config.decisions)
    precisions = [p.strip() for p in str(config.precisions).split(",") if p.strip()]
    if not precisions or len(set(precisions)) != len(precisions):
        raise ValueError(f"precisions={config.precisions!r}: list fp32 and/or bf16 once each, e.g. precisions=fp32,bf16")
    for precision in precisions:  # an unknown one fails before any work (and bf16 on a CPU without bf16 kernels)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precisions: {precision!r} is not a precision to time; list fp32 and/or bf16")
        devices.resolve_precision(precision, devices.resolve_device("auto"))
    if config.agent not in AGENT_EXPERTS:
        raise ValueError(f"agent={config.agent!r}: the decision of a world-model agent is timed; choose from "
                         f"{sorted(AGENT_EXPERTS)}")
    torch.set_num_threads(int(config.threads))
    agent = build_agent(config.agent, FindConfig(checkpoint=config.checkpoint, samples=config.samples,
                                                 memorize_steps=config.memorize_steps, sampler_steps=counts[0],
                                                 precision=precisions[0]))
    env = MemoryCardsFindEnv()
    _, info = env.reset(seed=0)
    goal = np.asarray(info["goal_image"])
    agent.watch(env, info)
    model = agent.world_model
    shares = _share_settings(config.share_prefixes)
    cells = [(precision, k, share) for precision in precisions for k in counts for share in shares]
    times: dict[tuple, list[float]] = {cell: [] for cell in cells}
    rows_imagined: dict[tuple, list[int]] = {cell: [] for cell in cells}
    calls = count_network_rows(model)
    for round_ in tqdm(range(config.decisions + 1), desc="find-the-object decision by denoising steps, rounds"):
        for precision, k, share in cells:  # the decision's cost does not depend on the precision memory trained in
            model.precision = precision
            model.sampler = SamplerConfig(**{**model.sampler.__dict__, "steps": k})
            agent.share_prefixes = share
            calls.clear()
            start = time.perf_counter()
            agent.tile_distances(env, goal)
            if round_:
                times[precision, k, share].append(time.perf_counter() - start)
                rows_imagined[precision, k, share].append(sum(calls))
    reference = ("fp32" if "fp32" in precisions else precisions[0], 10 if 10 in counts else counts[0], shares[0])
    rows = [{"agent": config.agent, "precision": precision, "denoising_steps": k, "share_prefixes": share,
             "decisions": config.decisions, "samples": config.samples, "threads": config.threads,
             "network_rows": float(np.mean(rows_imagined[precision, k, share])),
             "median_decision_s": float(np.median(times[precision, k, share])),
             f"decision_x_{reference[0]}_{reference[1]}_steps": float(np.median(times[precision, k, share])
                                                                       / np.median(times[reference]))}
            for precision, k, share in cells]
    out = Path(config.out_dir)
    write_table(out / "find_decision_steps.csv", rows, md_path=out / "find_decision_steps.md",
                title=f"One find-the-object decision by denoising steps (Memory Cards, agent {config.agent}, 16 tiles x "
                      f"{config.samples} samples imagined in one batch, after memorization; {config.threads} "
                      f"thread(s); medians of {config.decisions} decisions, step counts and precisions alternated in "
                      f"one run; network_rows: frames run through an expert network per decision; `python -m "
                      f"come_rl.bench find_decision_steps steps={config.steps} precisions={config.precisions} "
                      f"share_prefixes={config.share_prefixes}`)")
    return rows
