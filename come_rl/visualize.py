"""Pictures a person wants: imagined vs real rollouts as GIFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from come_rl.conventions import frames_to_tensor, tensor_to_frames


def rollout_comparison(world_model, frames: np.ndarray, actions: np.ndarray, context: int, seed: int = 0,
                       memorize_steps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Observe ``frames[:context]``, optionally memorize, then imagine the rest open loop from the recorded actions.

    frames: (T, H, W, 3) uint8 of one episode; actions: (T - 1, A), actions[t] leads from frames[t] to frames[t + 1].
    Returns (real (H, height, width, 3), imagined (H, height, width, 3)) uint8 with H = T - context.
    """
    world_model.reset()
    world_model.observe(frames[0])
    for t in range(1, context):
        world_model.observe(frames[t], actions[t - 1])
    if memorize_steps:
        world_model.memorize(steps=memorize_steps)
    future = torch.from_numpy(np.asarray(actions[context - 1:], dtype=np.float32))[None]
    imagined = tensor_to_frames(world_model.imagine(future, seed=seed)[0])
    return frames[context:context + len(imagined)], imagined


def save_rollout_gif(path: str | Path, rows: list[np.ndarray], scale: int = 3, fps: int = 4) -> Path:
    """rows: equally long (T, H, W, 3) uint8 sequences stacked side by side (e.g. real | imagined) into a GIF."""
    import imageio.v2 as imageio

    length = min(len(r) for r in rows)
    separator = np.full((rows[0].shape[1], 2, 3), 255, np.uint8)
    frames = []
    for t in range(length):
        tiles = []
        for r in rows:
            tiles += [r[t], separator]
        frame = np.concatenate(tiles[:-1], axis=1)
        frames.append(np.kron(frame, np.ones((scale, scale, 1), np.uint8)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.gif")
    imageio.mimsave(tmp, frames, duration=1000 / fps, loop=0)
    tmp.replace(path)
    return path


def mse_per_step(real: np.ndarray, imagined: np.ndarray) -> np.ndarray:
    """(T,) MSE on [0, 1] images between two uint8 sequences."""
    return ((frames_to_tensor(real) - frames_to_tensor(imagined)) / 2).pow(2).flatten(1).mean(1).numpy()
