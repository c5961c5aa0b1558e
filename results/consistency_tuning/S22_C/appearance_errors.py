"""How far apart (4x4-pooled mean squared error) real Memory Maze views of the same place are, against the other views
of a wider pose window: the range the anchor_appearance thresholds of S22_C were drawn from.

    python results/consistency_tuning/S22_C/appearance_errors.py

Tuning episodes 160000-160002; for each real frame 400-431, every memorized frame 0-399 within 1 cell and 45 degrees
of its pose, split into "tight" (within 0.35 cell and 15 degrees, the shipped re-anchoring tolerance) and the rest.
"""

import math

import numpy as np
import torch

from come_rl.data_sources import SeededEpisodePool


def main() -> None:
    dataset = SeededEpisodePool("memory_maze", episodes=3, seed=160000).dataset
    errors, tight = [], []
    for episode in range(3):
        frames = torch.as_tensor(np.asarray(dataset.frames[episode])).float()
        if frames.shape[-1] == 3:
            frames = frames.permute(0, 3, 1, 2)
        frames = frames / 127.5 - 1
        poses = torch.as_tensor(np.asarray(dataset.poses[episode])).float()
        thumbs = torch.nn.functional.avg_pool2d(frames, 4).flatten(1)
        for t in range(400, 432):
            distance = torch.linalg.vector_norm(poses[:400, :2] - poses[t, :2], dim=-1)
            turn = torch.abs(torch.remainder(poses[:400, 2] - poses[t, 2] + math.pi, 2 * math.pi) - math.pi)
            window = (distance <= 1.0) & (turn <= math.radians(45))
            close = (distance <= 0.35) & (turn <= math.radians(15))
            error = ((thumbs[:400] - thumbs[t]) ** 2).mean(-1)
            errors += error[window].tolist()
            tight += close[window].tolist()
    errors, tight = np.array(errors), np.array(tight)
    print(f"pairs {len(errors)}, tight {tight.sum()}")
    for q in (0.1, 0.25, 0.5, 0.75):
        print(f"quantile {q}: tight {np.quantile(errors[tight], q):.4f}, rest {np.quantile(errors[~tight], q):.4f}")
    for threshold in (0.005, 0.01, 0.02):
        chosen = errors <= threshold
        print(f"error <= {threshold}: {chosen.sum()} views, {(chosen & tight).sum()} of them tight")


if __name__ == "__main__":
    main()
