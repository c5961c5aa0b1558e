"""Does the maze STM use the older frames of its 16-frame window? One-step predictions on held-out clips, with its
context as seen and with the 13 older frames blinded (each replaced by the oldest of the last three: the same input
the STM gets when nothing older than three frames is known), both from the same noise.

    python results/stm_context/probe.py [seed] [clips] [sampler_steps] [out_dir] [checkpoint]

Defaults: seed 55000 (4 held-out episodes of 1000 steps generated from their seeds, ``online:memory_maze``), 512 clips,
1 DDIM step (the conditional mean: the paired difference is the network's, not the sampler's), out_dir
results/stm_context. Writes ``probe.csv`` (one row per subset -- all clips, turns, moves -- and context) and
``probe.md``. The title also counts the "window revisits": clips whose target pose lies within 0.5 cell and 45 degrees
of an older context frame's pose (frames 1-13 of 16) but of none of the last three (where only the older frames
would show the next view).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from come_rl.diffusion import SamplerConfig
from come_rl.evaluate import EvaluateConfig, load_model_and_clips, predict_next_frames, transition_kinds
from come_rl.experiments.consistency import revisit_mask
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table

RECENT = 3


def window_revisits(poses: np.ndarray, k: int, distance: float = 0.5, degrees: float = 45.0) -> np.ndarray:
    """(clips,) bool: the target (last pose) revisits an older context frame's view and none of the last RECENT,
    within ``distance`` cells and ``degrees`` (the revisit rule's 0.5 / 45 matches the last frame after nearly any
    step; 0.15 / 10, SAME_VIEW, asks for nearly the same view: window_length.py)."""
    context, target = poses[:, 1:k + 1], poses[:, -1]
    older = np.array([revisit_mask(c[:k - RECENT], t[None], distance, degrees)[0] for c, t in zip(context, target)])
    recent = np.array([revisit_mask(c[k - RECENT:], t[None], distance, degrees)[0] for c, t in zip(context, target)])
    return older & ~recent


SAME_VIEW = (0.15, 10.0)


def pose_distance_rows(context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(clips, n) distances of n context poses (clips, n, 3) to each clip's target pose (clips, 3): cells + the wrapped
    heading difference in radians / (pi / 4), the retrieval's nearness (come_rl.experts.retrieval)."""
    from come_rl.experts.retrieval import paired_pose_distance

    return paired_pose_distance(np.asarray(context, np.float64), np.asarray(target, np.float64)[:, None])


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95 % t half-width (normal approximation for n > 30)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def main(argv: list[str]) -> None:
    seed = int(argv[0]) if argv else 55000
    clips = int(argv[1]) if len(argv) > 1 else 512
    steps = int(argv[2]) if len(argv) > 2 else 1
    out = Path(argv[3]) if len(argv) > 3 else Path(__file__).parent
    checkpoint = argv[4] if len(argv) > 4 else "come_rl/checkpoints/memory_maze"
    config = EvaluateConfig(checkpoint=checkpoint, expert="stm", data="online:memory_maze",
                            clips=clips, sampler_steps=steps, seed=seed, threads=1, device="cpu", precision="fp32")
    wm, expert, _, raw, tensors = load_model_and_clips(config)
    k = expert.context_frames
    frames, actions, poses = tensors
    blinded = frames.clone()
    blinded[:, :k - RECENT] = frames[:, k - RECENT:k - RECENT + 1]
    sampler = SamplerConfig(steps=steps)
    seen = predict_next_frames(wm, expert, tensors, sampler, seed, config.batch_size)
    blind = predict_next_frames(wm, expert, (blinded, actions, poses), sampler, seed, config.batch_size)
    target, last = frames[:, k], frames[:, k - 1]
    # the older context frame (1-13) whose pose is nearest the target's: what a perfect window memory could copy
    distances = pose_distance_rows(raw["poses"][:, 1:k - RECENT + 1], raw["poses"][:, -1])
    nearest = frames[torch.arange(len(frames)), torch.from_numpy(distances.argmin(1))]
    recall = getattr(expert.backbone, "recall", None)  # a window-recall STM: its attention on that frame
    on_nearest = None
    if recall is not None:
        with torch.no_grad():
            attention = recall.weights(actions.to(next(recall.parameters()).dtype)).numpy()
        on_nearest = attention[np.arange(len(frames)), distances.argmin(1)]
    lpips = get_lpips(device="cpu")
    scores = {
        "seen": (((seen - target) / 2).pow(2).flatten(1).mean(1).numpy(), lpips(seen, target).numpy()),
        "older frames blinded": (((blind - target) / 2).pow(2).flatten(1).mean(1).numpy(), lpips(blind, target).numpy()),
        "copy-last-frame": (((last - target) / 2).pow(2).flatten(1).mean(1).numpy(), lpips(last, target).numpy()),
        "copy the older frame nearest in pose": (((nearest - target) / 2).pow(2).flatten(1).mean(1).numpy(),
                                                 lpips(nearest, target).numpy()),
    }
    kinds = transition_kinds(raw, "memory_maze")
    same_view = window_revisits(raw["poses"], k, *SAME_VIEW)
    masks = {"all": np.ones(len(frames), bool), "turns": kinds["turn"], "moves": kinds["move"],
             "same view only in frames 1-13": same_view}
    revisits = int(window_revisits(raw["poses"], k).sum())
    rows = []
    for subset, mask in masks.items():
        for name, (mse, lp) in scores.items():
            row = {"subset": subset, "clips": int(mask.sum()), "context": name,
                   "mse": float(mse[mask].mean()), "lpips": float(lp[mask].mean())}
            if name == "seen":
                d_mse, h_mse = interval(scores["older frames blinded"][0][mask] - mse[mask])
                d_lp, h_lp = interval(scores["older frames blinded"][1][mask] - lp[mask])
                row.update({"blinded_minus_seen_mse": d_mse, "mse_95": h_mse,
                            "blinded_minus_seen_lpips": d_lp, "lpips_95": h_lp,
                            "mean_abs_frame_change_by_blinding": float((blind - seen)[mask].abs().mean())})
                if on_nearest is not None:
                    row["recall_attention_on_nearest_older"] = float(on_nearest[mask].mean())
            rows.append(row)
    norms = []  # a U-Net's input convolution per context slot (a transformer STM has no such slots)
    if hasattr(expert.backbone, "in_context"):
        weights = expert.backbone.in_context.weight.detach()
        inputs = weights.shape[1] // (k + (1 if getattr(expert.backbone, "warp", None) is not None else 0))
        norms = weights.reshape(weights.shape[0], -1, inputs, *weights.shape[2:]).pow(2).sum(dim=(0, 2, 3, 4)).sqrt()
    write_table(out / "probe.csv", rows, md_path=out / "probe.md",
                title=f"The maze STM of {checkpoint} ({k} context frames) with its context as seen and with frames 1-{k - RECENT} "
                      f"blinded; {clips} held-out clips (online:memory_maze seed={seed}), {steps} DDIM step(s), fp32; "
                      f"norm of the input convolution's weights per context slot, oldest first (the last: the "
                      f"warped frame): {[round(float(n), 3) for n in norms]}; window revisits among the clips: "
                      f"{revisits} at 0.5 cell / 45 deg, {int(same_view.sum())} at {SAME_VIEW[0]} cell / {SAME_VIEW[1]:g} deg; "
                      f"`python results/stm_context/probe.py {seed} {clips} {steps}`")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
