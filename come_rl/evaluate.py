"""Held-out one-step evaluation of a trained base model against the copy-last-frame baseline.

Usage:
    python -m come_rl.evaluate checkpoint=come_rl/checkpoints/memory_cards data=online:memory_cards clips=256
    python -m come_rl.evaluate checkpoint=... data=/path/to/held_out_dataset

Clips come from episodes the model never trained on (online: a different seed; a data set: its own held-out folder).
Every clip is scored by the model's sampled next frame and by copying the last context frame, per kind of
transition: frames where the view changes (Memory Cards: cursor moves; Memory Maze: moves and turns), frames where a
tile is uncovered (Memory Cards), and all frames. Results go to ``results/world_model/<name>.csv`` and ``.md``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from come_rl import devices
from come_rl.cli_args import parse_cli
from come_rl.conventions import tensor_to_frames
from come_rl.data_sources import clips_to_tensors, open_data_source
from come_rl.diffusion import sample
from come_rl.experts.retrieval import RetrievalClips
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table
from come_rl.visualize import rollout_comparison, save_rollout_gif
from come_rl.world_model import WorldModel
from envs.registry import ENVS, env_name_of_data


@dataclass
class EvaluateConfig:
    checkpoint: str = "come_rl/checkpoints/memory_cards"
    """world model checkpoint directory."""
    expert: str = "base"
    """which trained expert of the checkpoint to score on its own: base, stm or sltm."""
    data: str = "online:memory_cards"
    """held-out data: online:memory_cards (seed below) or a held-out data set directory."""
    clips: int = 256
    episodes: int = 0
    """online data: how many episodes the clips are drawn from (0: the env's default, 4 for online:memory_maze);
    more episodes make the clips less alike (a maze episode is 1000 steps; generating one takes ~50 s)."""
    batch_size: int = 64
    sampler_steps: int = 10
    seed: int = 12345
    threads: int = 2
    name: str = ""
    """results file stem (default: the checkpoint folder name)."""
    out_dir: str = "results/world_model"
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N (come_rl.devices)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""


def data_env_name(source, data: str) -> str:
    """The registered env a data source holds (envs.registry): from ``online:<env>`` or a collected data set's
    manifest ("" if unknown)."""
    dataset = getattr(source, "dataset", None)
    return env_name_of_data(data, getattr(dataset, "meta", None))


def transition_kinds(clips: dict, env_name: str) -> dict[str, np.ndarray]:
    """Boolean masks over clips by the kind of the predicted transition (``env_name``: a name of envs.registry, or ""
    for an unknown env). Memory Cards: moves, uncovers, covers. Memory Maze: turns (turn left/right in place), moves
    (forward, with or without a turn) and frames whose view changed at all. Unknown: view changed, static."""
    last_action = clips["actions"][:, -1].argmax(-1)
    changed = np.any(clips["frames"][:, -1] != clips["frames"][:, -2], axis=(1, 2, 3))
    kinds = {"all": np.ones(len(last_action), bool)}
    entry = ENVS.get(env_name)
    if entry is not None and entry.kinds is not None:
        kinds.update(entry.kinds(clips, last_action, changed))
    else:
        kinds["view_change"] = changed
        kinds["static"] = ~changed
    return kinds


def load_model_and_clips(config: EvaluateConfig) -> tuple[WorldModel, object, object, dict, tuple]:
    """The world model, the expert scored, the data source, the held-out clips and their tensors (frames, actions,
    poses): the same clips for the same ``seed`` and ``clips``, whatever is scored on them."""
    torch.set_num_threads(config.threads)
    if config.expert not in ("base", "stm", "sltm"):
        raise ValueError(f"expert must be base, stm or sltm, got {config.expert!r}")
    wm = WorldModel.load(config.checkpoint, experts=sorted({"base", config.expert}), sampler={"steps": config.sampler_steps},
                         device=config.device, precision=config.precision)
    expert = getattr(wm, config.expert)
    if config.episodes < 0 or (config.episodes and not config.data.startswith("online:")):
        raise ValueError(f"episodes={config.episodes} with data={config.data}: episodes= counts the online episodes the "
                         "clips are drawn from (data=online:<env>), 0 for the env's default; a data set's clips come "
                         "from all its held-out episodes")
    source = open_data_source(config.data, seed=config.seed, online_episodes=config.episodes)
    if expert.retrieval:  # its first context slot is the frame retrieved by pose (come_rl.experts.retrieval)
        source = RetrievalClips(source, blind=getattr(expert.backbone.config, "retrieval_blind", False))
    rng = np.random.default_rng(config.seed)
    clips = source.sample_clips(config.clips, expert.context_frames + 2, rng)
    return wm, expert, source, clips, clips_to_tensors(clips, pose_features=expert.uses_poses)


def predict_next_frames(wm: WorldModel, expert, tensors: tuple, sampler, seed: int, batch_size: int) -> torch.Tensor:
    """The expert's sampled next frame (clips, C, H, W) in [-1, 1] after each clip's context, with ``sampler``."""

    frames, actions, poses = tensors
    k = expert.context_frames
    predictions = []
    generator = torch.Generator().manual_seed(seed)
    expert.step_size = expert.told_step(sampler)  # a shortcut (step-conditioned) expert is told its step size
    for start in range(0, len(frames), batch_size):
        sl = slice(start, start + batch_size)
        with torch.no_grad(), devices.autocast(wm.device, wm.precision):
            state = expert.prepare(frames[sl, :k], actions[sl], None if poses is None else poses[sl])
            predicted = sample(lambda x, t, state=state: expert.predict_eps(state, x, t),
                               (frames[sl].shape[0], *wm.frame_shape), expert.schedule, sampler, generator,
                               device=wm.device)
        predictions.append(predicted.clamp(-1, 1).cpu())
    return torch.cat(predictions)


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap interval over clips of ``mean(numerator) / mean(denominator)`` (clips resampled
    together, a fixed seed: the same clips give the same interval; nan for fewer than 2 clips). Clips of one episode
    are not independent, so the interval is a lower bound on the spread between clip sets of other seeds."""
    if len(numerator) < 2:
        return float("nan"), float("nan")
    picks = np.random.default_rng(0).integers(0, len(numerator), size=(resamples, len(numerator)))
    ratios = numerator[picks].mean(1) / np.maximum(denominator[picks].mean(1), 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def score_by_kind(predicted: torch.Tensor, tensors: tuple, k: int, kinds: dict[str, np.ndarray], lpips) -> list[dict]:
    """MSE (on [0, 1] images, the paper's scale) and LPIPS of ``predicted`` and of copy-last-frame per transition
    kind (``transition_kinds``); the MSE ratio copy-last / model with its 95 % bootstrap interval over clips."""
    frames = tensors[0]
    target, last = frames[:, k], frames[:, k - 1]
    mse_model = ((predicted - target) / 2).pow(2).flatten(1).mean(1).numpy()
    mse_copy = ((last - target) / 2).pow(2).flatten(1).mean(1).numpy()
    lp_model = lpips(predicted, target).numpy()
    lp_copy = lpips(last, target).numpy()
    rows = []
    for kind, mask in kinds.items():
        if mask.sum() == 0:
            continue
        rows.append({
            "kind": kind, "clips": int(mask.sum()),
            "mse_model": float(mse_model[mask].mean()), "mse_copy_last": float(mse_copy[mask].mean()),
            "mse_ratio_copy_over_model": float(mse_copy[mask].mean() / max(mse_model[mask].mean(), 1e-12)),
            **dict(zip(("mse_ratio_low", "mse_ratio_high"), ratio_interval(mse_copy[mask], mse_model[mask]))),
            "lpips_model": float(lp_model[mask].mean()), "lpips_copy_last": float(lp_copy[mask].mean()),
        })
    return rows


def evaluate(config: EvaluateConfig) -> list[dict]:
    wm, expert, source, clips, tensors = load_model_and_clips(config)
    k = expert.context_frames
    predicted = predict_next_frames(wm, expert, tensors, wm.sampler, config.seed, config.batch_size)
    kinds = transition_kinds(clips, data_env_name(source, config.data))
    # a memorizing SLTM (sltm_memorizes) is a wrapper around the trained expert: its recipe is the source's
    spec = wm.base_spec if config.expert == "base" else getattr(expert, "source", expert).spec
    rows = [{"checkpoint": Path(config.checkpoint).name, "expert": config.expert, **row,
             "parameters_M": round(spec.get("parameters", 0) / 1e6, 2), "train_minutes": round(spec.get("minutes", 0), 1),
             "train_steps": spec.get("step", 0), "resolution": spec.get("frame_size"), "sampler_steps": config.sampler_steps}
            for row in score_by_kind(predicted, tensors, k, kinds, get_lpips(device=wm.device))]
    name = config.name or Path(config.checkpoint).name + ("" if config.expert == "base" else f"_{config.expert}")
    out = Path(config.out_dir)
    csv = out / f"{name}_one_step.csv"
    write_table(csv, rows, md_path=out / f"{name}_one_step.md",
                         title=f"One-step prediction on held-out clips: {name} vs copy-last-frame "
                               f"(MSE on [0,1] images, LPIPS AlexNet; `python -m come_rl.evaluate checkpoint="
                               f"{config.checkpoint} expert={config.expert} data={config.data} clips={config.clips} "
                               f"seed={config.seed} sampler_steps={config.sampler_steps}"
                               f"{f' episodes={config.episodes}' if config.episodes else ''}`; "
                               f"{k} context frames)")
    frames = tensors[0]
    _save_examples(predicted[:8], frames[:8, k], frames[:8, k - 1], out / f"{name}_one_step_examples.png")
    if config.expert == "base":
        _save_rollout(wm, source, config, out / f"{name}_rollout.gif")
    return rows


def _save_rollout(wm: WorldModel, source, config: EvaluateConfig, path: Path) -> None:
    """A held-out episode: real | imagined (open loop from the recorded actions, 16 steps after 3 context frames)."""

    clip = source.sample_clips(1, 3 + 16, np.random.default_rng(config.seed + 1))
    real, imagined = rollout_comparison(wm, clip["frames"][0], clip["actions"][0], context=3, seed=config.seed)
    save_rollout_gif(path, [real, imagined])


def _save_examples(predicted, target, last, path: Path) -> None:
    import imageio.v3 as iio


    rows = [np.concatenate(list(tensor_to_frames(x)), axis=1) for x in (last, target, predicted)]
    grid = np.concatenate(rows, axis=0)
    grid = np.kron(grid, np.ones((2, 2, 1), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, grid)


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, EvaluateConfig)
    for row in evaluate(config):
        print(row)


if __name__ == "__main__":
    main()
