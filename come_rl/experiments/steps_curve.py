"""Quality against denoising steps: held-out one-step prediction of a shipped expert at 1, 2, 3, 4, 6 and 10 steps.

Usage:
    python -m come_rl.experiments.steps_curve checkpoint=come_rl/checkpoints/memory_maze data=online:memory_maze \\
        seed=50000 clips=256 methods=ddim,euler steps=1,2,3,4,6,10 out_dir=results/steps_curve

One set of held-out clips (``come_rl.evaluate``'s: the same clips for the same ``seed`` and ``clips``) is scored once per
(sampler method, step count): MSE on [0, 1] images and LPIPS of the sampled next frame against the real one, beside
copy-last-frame's, per kind of transition, with the seconds per frame on this machine (``threads`` torch threads). The
samplers are ``come_rl.diffusion.SamplerConfig``'s: ``ddim`` (eta 0, steps evenly spaced in t) and ``euler`` /
``heun`` (the probability-flow ODE on Karras-spaced levels). Outputs in ``out_dir``: ``<name>_steps.csv`` / ``.md``
(one row per method, steps and kind) and ``<name>_steps.png`` (LPIPS and MSE ratio against steps, all clips).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from come_rl.cli_args import parse_cli
from come_rl.diffusion.sampler import SAMPLER_METHODS
from come_rl.evaluate import (
    EvaluateConfig,
    data_env_name,
    load_model_and_clips,
    predict_next_frames,
    score_by_kind,
    transition_kinds,
)
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table


@dataclass
class StepsCurveConfig:
    checkpoint: str = "come_rl/checkpoints/memory_maze"
    expert: str = "base"
    data: str = "online:memory_maze"
    seed: int = 50000
    clips: int = 256
    episodes: int = 0
    """online data: how many episodes the clips are drawn from (``come_rl.evaluate``'s ``episodes=``; 0: the env's
    default)."""
    methods: str = "ddim,euler"
    """comma-separated sampler methods (ddim, euler, heun)."""
    steps: str = "1,2,3,4,6,10"
    """comma-separated denoising step counts."""
    batch_size: int = 64
    threads: int = 1
    device: str = "auto"
    precision: str = "auto"
    name: str = ""
    """file stem (default: the checkpoint folder's name)."""
    out_dir: str = "results/steps_curve"


def parse_grid(config: StepsCurveConfig) -> tuple[list[str], list[int]]:
    methods = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in SAMPLER_METHODS]
    if not methods or unknown:
        raise ValueError(f"methods={config.methods!r}: unknown {unknown or 'empty list'}; choose from {SAMPLER_METHODS}")
    try:
        steps = [int(s) for s in str(config.steps).split(",") if s.strip()]
    except ValueError as error:
        raise ValueError(f"steps={config.steps!r} must be comma-separated integers >= 1, e.g. steps=1,2,4,10") from error
    if not steps or min(steps) < 1:
        raise ValueError(f"steps={config.steps!r} must be comma-separated integers >= 1, e.g. steps=1,2,4,10")
    return methods, steps


def run(config: StepsCurveConfig) -> list[dict]:
    methods, step_counts = parse_grid(config)
    evaluate_config = EvaluateConfig(checkpoint=config.checkpoint, expert=config.expert, data=config.data,
                                     clips=config.clips, episodes=config.episodes, batch_size=config.batch_size,
                                     seed=config.seed,
                                     threads=config.threads, device=config.device, precision=config.precision)
    wm, expert, source, clips, tensors = load_model_and_clips(evaluate_config)
    kinds = transition_kinds(clips, data_env_name(source, config.data))
    lpips = get_lpips(device=wm.device)
    rows = []
    for method in methods:
        for steps in step_counts:
            sampler = dataclasses.replace(wm.sampler, method=method, steps=steps,
                                          **({"eta": 0.0, "langevin_steps": 0} if method != "ddim" else {}))
            start = time.perf_counter()
            predicted = predict_next_frames(wm, expert, tensors, sampler, config.seed, config.batch_size)
            seconds = (time.perf_counter() - start) / len(predicted)
            for row in score_by_kind(predicted, tensors, expert.context_frames, kinds, lpips):
                rows.append({"method": method, "steps": steps, **row, "seconds_per_frame": round(seconds, 4)})
    name = config.name or Path(config.checkpoint).name + ("" if config.expert == "base" else f"_{config.expert}")
    out = Path(config.out_dir)
    command = "python -m come_rl.experiments.steps_curve " + " ".join(
        f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config) if f.name not in ("threads", "name"))
    write_table(out / f"{name}_steps.csv", rows, md_path=out / f"{name}_steps.md",
                title=f"One-step prediction against denoising steps: {name} ({config.expert}, "
                      f"{config.clips} held-out clips, seed {config.seed}; MSE on [0, 1] images, LPIPS AlexNet; "
                      f"seconds per frame with {config.threads} thread(s)). `{command}`")
    _plot(rows, methods, out / f"{name}_steps.png", name)
    return rows


def _plot(rows: list[dict], methods: list[str], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    everything = [row for row in rows if row["kind"] == "all"]
    for method in methods:
        mine = [row for row in everything if row["method"] == method]
        axes[0].plot([r["steps"] for r in mine], [r["lpips_model"] for r in mine], marker="o", label=method)
        axes[1].plot([r["steps"] for r in mine], [r["mse_ratio_copy_over_model"] for r in mine], marker="o",
                     label=method)
    if everything:
        axes[0].axhline(everything[0]["lpips_copy_last"], color="grey", ls="--", label="copy-last")
        axes[1].axhline(1.0, color="grey", ls="--", label="copy-last")
    axes[0].set(xlabel="denoising steps", ylabel="LPIPS (lower is better)", title=f"{name}: LPIPS")
    axes[1].set(xlabel="denoising steps", ylabel="MSE of copy-last / MSE of model", title="MSE below copy-last")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, StepsCurveConfig)
    for row in run(config):
        if row["kind"] == "all":
            print(row)


if __name__ == "__main__":
    main()
