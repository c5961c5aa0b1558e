"""How far the Memory Maze view shifts sideways per degree of turn (the ``anchor_turn`` of the re-anchoring rule), and
whether frames and poses are aligned in collected episodes.

    python -m come_rl.collect env=memory_maze episodes=4 steps=1000 seed=30000 out=data/maze_val
    python results/consistency_tuning/turn_pixels.py data/maze_val

For consecutive steps that turn in place (heading change > 10 degrees, position change < 0.02 cell), the horizontal
shift (whole pixels, -24..24) that best aligns frame t with frame t + 1 (least mean squared error over the overlap),
against the heading change between poses t and t + 1; the same with the frames one step earlier and later (if frames
and poses were misaligned by a step, an offset pair would fit better). Prints, per frame offset, the pairs, the median
|shift|, the correlation of shift with heading change and the median shift per degree.
"""

import sys

import numpy as np

from come_rl.data import EpisodeDataset


def best_shift(a: np.ndarray, b: np.ndarray, most: int = 24) -> int:
    """The shift s minimising the error of a[:, s:] against b[:, :W - s] (s < 0: a[:, :W + s] against b[:, -s:])."""
    width = a.shape[1]
    errors = {}
    for s in range(-most, most + 1):
        overlap = (a[:, s:], b[:, :width - s]) if s >= 0 else (a[:, :width + s], b[:, -s:])
        errors[s] = float(((overlap[0] - overlap[1]) ** 2).mean())
    return min(errors, key=errors.get)


def main() -> None:
    dataset = EpisodeDataset(sys.argv[1] if len(sys.argv) > 1 else "data/maze_val")
    pairs = {offset: [] for offset in (-1, 0, 1)}
    for episode in range(len(dataset.frames)):
        frames = dataset.frames[episode].astype(np.float32) / 255.0
        poses = dataset.poses[episode]
        for t in range(1, len(poses) - 2):
            turn = (poses[t + 1, 2] - poses[t, 2] + np.pi) % (2 * np.pi) - np.pi
            moved = np.hypot(*(poses[t + 1, :2] - poses[t, :2]))
            if abs(np.degrees(turn)) > 10 and moved < 0.02:
                for offset in pairs:
                    pairs[offset].append((best_shift(frames[t + offset], frames[t + 1 + offset]), np.degrees(turn)))
    for offset, values in pairs.items():
        values = np.array(values)
        print(f"frames offset {offset:+d} from poses: {len(values)} turns in place, median |shift| "
              f"{np.median(np.abs(values[:, 0])):.1f} px, corr(shift, turn) {np.corrcoef(values[:, 0], values[:, 1])[0, 1]:.2f}, "
              f"median shift per degree {np.median(values[:, 0] / values[:, 1]):.3f} px")


if __name__ == "__main__":
    main()
