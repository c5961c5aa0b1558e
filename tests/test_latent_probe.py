"""The latent maze base probe (come_rl.experiments.latent_probe) end to end on a tiny recorded data set: both stages
train, checkpoint and resume without retraining; the held-out table scores the same clips as come_rl.evaluate, with
copy-last-frame computed here independently; bad input fails before any work."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from come_rl.collect import main as collect
from come_rl.data_sources import open_data_source
from come_rl.experiments.latent_probe import FrameAutoencoder, LatentProbeConfig, run


@pytest.fixture(scope="module")
def tiny_maze(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "maze"
    assert collect([f"out={out}", "env=memory_maze", "episodes=2", "steps=14", "seed=3", "episodes_per_shard=2"]) == 0
    return out


def test_autoencoder_shapes_and_bounds() -> None:
    torch.manual_seed(0)
    ae = FrameAutoencoder(latent_channels=4)
    latents = ae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 4, 16, 16) and latents.abs().max() <= 1
    assert ae.decode(latents).shape == (2, 3, 64, 64)
    assert ae.encode_clips(torch.zeros(2, 5, 3, 64, 64)).shape == (2, 5, 4, 16, 16)


def test_probe_trains_resumes_and_scores_the_held_out_clips(tiny_maze, tmp_path) -> None:
    config = LatentProbeConfig(data=str(tiny_maze), run_dir=str(tmp_path / "run"), out_dir=str(tmp_path / "out"),
                               latent_channels=4, ae_minutes=0.01, minutes=0.01, clips=4, sampler_steps=2,
                               eval_data=str(tiny_maze), eval_seed=1, checkpoint_seconds=0.2)
    rows = run(config)
    by = {(r["model"], r["kind"]): r for r in rows}
    assert by[("latent base", "all")]["clips"] == 4 and by[("autoencoder floor", "all")]["clips"] == 4
    # copy-last-frame, computed here from the same clips (come_rl.evaluate's: 3 context frames + 2)
    clips = open_data_source(str(tiny_maze), seed=1).sample_clips(4, 5, np.random.default_rng(1))
    frames = clips["frames"][:, 1:].astype(np.float64) / 255.0
    copy_last = float(((frames[:, -1] - frames[:, -2]) ** 2).mean())
    assert by[("latent base", "all")]["mse_copy_last"] == pytest.approx(copy_last, rel=1e-4)
    for row in rows:
        assert np.isfinite(row["mse_model"]) and 0 <= row["lpips_model"] <= 1.5
    for name in ("latent_probe.csv", "latent_probe.md", "latent_probe_examples.png", "train_log.csv",
                 "latent_probe_training.png"):
        assert (tmp_path / "out" / name).is_file(), name
    states = {name: torch.load(tmp_path / "run" / name, weights_only=False) for name in ("autoencoder.pt", "diffusion.pt")}
    assert all(state["done"] and state["step"] >= 1 for state in states.values())
    # the same command again: nothing retrained, the same numbers
    again = run(config)
    assert torch.load(tmp_path / "run" / "diffusion.pt", weights_only=False)["step"] == states["diffusion.pt"]["step"]
    assert [r["mse_model"] for r in again] == [r["mse_model"] for r in rows]
    with open(tmp_path / "out" / "latent_probe.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_probe_bad_input(tiny_maze, tmp_path) -> None:
    with pytest.raises(ValueError, match="recorded Memory Maze data set"):
        run(LatentProbeConfig(data="online:memory_maze"))
    with pytest.raises(ValueError, match="recorded Memory Maze data set"):
        run(LatentProbeConfig(data=""))
    with pytest.raises(ValueError, match="latent_channels"):
        LatentProbeConfig(data=str(tiny_maze), latent_channels=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "autoencoder.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete it to retrain"):
        run(LatentProbeConfig(data=str(tiny_maze), run_dir=str(tmp_path / "run"), out_dir=str(tmp_path / "out")))
