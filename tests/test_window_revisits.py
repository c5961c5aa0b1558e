"""Window-revisit clips for a long-context expert: which clips qualify (hand-made poses), the sampler that mixes them
in, and the training option's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from come_rl.data.episodes import Episode, EpisodeDataset
from come_rl.data_sources import WindowRevisitClips, window_revisit_starts
from come_rl.interfaces import ActionSpec
from come_rl.train import TrainConfig, train


def poses_of(xs, yaws=None) -> np.ndarray:
    xs = np.asarray(xs, np.float64)
    yaws = np.zeros_like(xs) if yaws is None else np.asarray(yaws, np.float64)
    return np.stack([xs, np.zeros_like(xs), yaws], axis=1)


def test_a_window_revisit_is_an_older_frames_view_that_the_last_three_do_not_show():
    # K = 5 context frames, clips of 7: start s is dropped, s+1..s+5 the context (s+1, s+2 older; s+3..s+5 the last
    # three), s+6 the target
    xs = [10, 0, 1, 2, 3, 4, 0, 3, 2]
    yaws = [0, 0, 0, 0, 0, 0, 0, 0, np.pi / 2]
    got = window_revisit_starts(poses_of(xs, yaws), context_frames=5)
    # s=0: target x=0 was seen by s+1 (older), not by 2, 3, 4 -> revisit; s=1: target x=3 is the last three's (s+4)
    # -> not; s=2: target x=2 was seen by s+1 (x=2) but the heading differs by 90 degrees -> not
    assert got.tolist() == [True, False, False]
    yaws[-1] = np.radians(30)  # within 45 degrees: now a revisit
    assert window_revisit_starts(poses_of(xs, yaws), context_frames=5).tolist() == [True, False, True]
    xs[-1] = 2.6  # 0.6 cell away: too far
    assert window_revisit_starts(poses_of(xs, yaws), context_frames=5).tolist() == [True, False, False]
    assert window_revisit_starts(poses_of(xs[:5]), context_frames=5).shape == (0,)  # shorter than one clip


class _Walk:
    """One hand-made episode: frame i is filled with i; the pose walks out along x (0.6 cell a step) and back
    (revisits), heading 0; ``back=False``: out only (no revisit)."""

    def __init__(self, poses: bool = True, back: bool = True):
        xs = (np.concatenate([np.arange(12), np.arange(11, -1, -1)]) if back else np.arange(24)).astype(np.float32) * 0.6
        steps = len(xs) - 1
        frames = np.broadcast_to(np.arange(steps + 1, dtype=np.uint8)[:, None, None, None], (steps + 1, 8, 8, 3))
        episode = Episode(frames=frames.copy(), actions=np.eye(6, dtype=np.float32)[np.zeros(steps, int)],
                          rewards=np.zeros(steps, np.float32), poses=poses_of(xs).astype(np.float32) if poses else None,
                          seed=0, index=0)
        self.action_spec = ActionSpec.discrete(6)
        self.dataset = EpisodeDataset.from_episodes([episode], self.action_spec)
        self.frame_size = 8

    def sample_clips(self, batch_size, length, rng):
        return self.dataset.sample_clips(batch_size, length, rng)


def test_the_sampler_mixes_in_window_revisits_at_its_fraction():
    source = _Walk()
    k = 6
    qualifying = window_revisit_starts(np.asarray(source.dataset.poses[0], np.float64), k)
    assert 0 < qualifying.sum() < len(qualifying)  # some clips qualify, not all: the mix is measurable
    every = WindowRevisitClips(source, 1.0, k)
    clips = every.sample_clips(64, k + 2, np.random.default_rng(0))
    assert all(qualifying[s] for s in clips["start"])
    # frames, actions and poses of a swapped row belong to its clip (frame i holds the value i)
    assert (clips["frames"][:, :, 0, 0, 0] == clips["start"][:, None] + np.arange(k + 2)).all()
    half = WindowRevisitClips(source, 0.5, k).sample_clips(2000, k + 2, np.random.default_rng(1))
    share = np.mean([qualifying[s] for s in half["start"]])
    base_rate = qualifying.mean()
    assert abs(share - (0.5 + 0.5 * base_rate)) < 0.05, (share, base_rate)
    again = WindowRevisitClips(source, 0.5, k).sample_clips(2000, k + 2, np.random.default_rng(1))
    assert (again["start"] == half["start"]).all()  # the same rng, the same clips


def test_window_revisit_clips_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        WindowRevisitClips(_Walk(), 0.0, 6)
    with pytest.raises(ValueError, match="older context frames than the last 3"):
        WindowRevisitClips(_Walk(), 0.5, 3)
    with pytest.raises(ValueError, match="chosen by pose"):
        WindowRevisitClips(_Walk(poses=False), 0.5, 6)
    with pytest.raises(ValueError, match="no clip of the data set is a window revisit"):
        WindowRevisitClips(_Walk(back=False), 0.5, 6)
    with pytest.raises(ValueError, match="indexed for 8 frames"):
        WindowRevisitClips(_Walk(), 0.5, 6).sample_clips(2, 5, np.random.default_rng(0))


def test_training_refuses_a_window_revisit_fraction_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="window_revisit_fraction must be in \\[0, 1\\]"):
        train(TrainConfig(window_revisit_fraction=1.5, out=str(tmp_path / "o")))
