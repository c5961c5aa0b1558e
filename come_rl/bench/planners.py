"""Benchmark: planning time per decision and the share of it spent outside the world model.

    python -m come_rl.bench planners [decisions=3 horizon=8 "ms_per_frame=[15, 60]" out=results/bench/planners.csv]

Every planner runs at its default settings (``come_rl/conf/planner/*.yaml``, horizon 8) with the
LPIPS-to-goal objective on the exact point-mass world model at 64x64 frames (the Memory Maze frame
size). The point mass imagines almost for free, so what is measured is the cost *outside* a real
world model: the planner's own work plus LPIPS. The table also projects the share outside the world
model for a real model costing ``ms_per_frame`` milliseconds per imagined frame (docs/design.md: 15-60
ms/frame at batch 32 on these CPUs): share = outside / (outside + imagined frames x ms per frame).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from come_rl.devices import resolve_device
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import append_rows, write_markdown_table
from come_rl.targets import load_planner
from envs.point_mass import PointMassEnv, PointMassWorldModel
from planners.objectives import LPIPSGoalObjective


def bench(decisions: int, horizon: int, ms_per_frame: list[float], discrete: bool, device: str = "cpu") -> list[dict]:
    lpips = get_lpips(device=device)  # the point mass imagines on the CPU; LPIPS runs where asked
    env = PointMassEnv(size=64, discrete=discrete)
    world_model = PointMassWorldModel(size=64, discrete=discrete)
    rows = []
    for name in ("random_shooting", "cem", "mppi", "nwm"):
        # NWM's RECON mu/sigma are 3-D; the point mass moves in 2-D
        overrides = dict(mu=[0.0, 0.0], sigma=[0.1, 0.1]) if name == "nwm" and not discrete else {}
        planner = load_planner(name, replan_every=2, **overrides)
        totals, imagine, score, candidates = [], 0.0, 0.0, 0
        for decision in range(decisions + 1):  # decision 0 warms up (LPIPS, allocator)
            observation, info = env.reset(seed=decision)
            world_model.reset()
            world_model.observe(observation, None, info["pose"])
            goal = env.dynamics.render_uint8(np.array([0.5, -0.3], dtype=np.float32))
            objective = LPIPSGoalObjective(world_model, goal, lpips=lpips)
            planner.reset()
            start = time.perf_counter()
            planner.plan(objective, world_model.action_spec, horizon)
            elapsed = time.perf_counter() - start
            if decision > 0:
                totals.append(elapsed)
                imagine += objective.timings["imagine_s"]
                score += objective.timings["score_s"]
                candidates += objective.timings["candidates"]
        total = float(np.sum(totals))
        outside = total - imagine  # planner + LPIPS: everything but the world model
        frames_per_decision = candidates / decisions * horizon
        row = {
            "planner": name,
            "actions": "discrete" if discrete else "continuous",
            "horizon": horizon,
            "rollouts_per_decision": candidates / decisions,
            "plan_ms": 1000 * total / decisions,
            "lpips_ms": 1000 * score / decisions,
            "planner_overhead_ms": 1000 * (outside - score) / decisions,
            "point_mass_imagine_ms": 1000 * imagine / decisions,
        }
        for ms in ms_per_frame:
            model_ms = frames_per_decision * ms
            row[f"share_outside_at_{ms:g}ms_per_frame"] = (1000 * outside / decisions) / (
                1000 * outside / decisions + model_ms)
            row[f"decision_s_at_{ms:g}ms_per_frame"] = (1000 * outside / decisions + model_ms) / 1000
        rows.append(row)
    return rows


@dataclass
class PlannersBenchConfig:
    decisions: int = 3
    """timed planning calls per planner."""
    horizon: int = 8
    ms_per_frame: list = field(default_factory=lambda: [15.0, 60.0])
    threads: int = 2
    device: str = "auto"
    """where LPIPS runs: auto (CUDA when present), cpu, cuda, cuda:N."""
    out: str = "results/bench/planners.csv"


def bench_planners(config: PlannersBenchConfig) -> list[dict]:
    if config.decisions < 1 or config.horizon < 1:
        raise ValueError(f"decisions and horizon must be >= 1, got {config.decisions}, {config.horizon}")
    device = str(resolve_device(config.device))
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.unlink(missing_ok=True)
    ms = [float(v) for v in config.ms_per_frame]
    rows = bench(config.decisions, config.horizon, ms, discrete=True, device=device)
    rows += bench(config.decisions, config.horizon, ms, discrete=False, device=device)
    append_rows(out, rows)
    markdown = write_markdown_table(out, out.with_suffix(".md"), title="Planning time per decision (default settings)")
    print(markdown.read_text())
    return rows
