"""python -m come_rl.experiments.steps_curve: one set of held-out clips scored at several step counts and samplers."""

import csv

import pytest
import torch

from come_rl.checkpoint import expert_spec
from come_rl.collect import collect, parse_arguments
from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experiments.steps_curve import StepsCurveConfig, parse_grid, run
from come_rl.experts.expert import DiffusionExpert
from come_rl.interfaces import ActionSpec
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.world_model import CompositionConfig, WorldModel

TINY = dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[8, 16], cond_dim=16, pose_dim=0)


def test_the_curve_scores_every_method_and_step_count_on_the_same_clips(tmp_path):
    torch.manual_seed(0)
    base = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), target="full", prediction="x0").eval()
    torch.nn.init.normal_(base.backbone.out_conv.weight, std=0.05)
    base.spec = expert_spec(base, "unet", TINY, extra={"action_spec": {"kind": "discrete", "dim": 6}, "frame_size": 64})
    WorldModel(base, ActionSpec.discrete(6), 64, composition=CompositionConfig(experts=["base"]),
               sampler=SamplerConfig(steps=2)).save(tmp_path / "ckpt")
    collect(parse_arguments([f"out={tmp_path / 'maze'}", "env=memory_maze", "episodes=1", "steps=24", "seed=40000"]))
    config = StepsCurveConfig(checkpoint=str(tmp_path / "ckpt"), data=str(tmp_path / "maze"), seed=40000, clips=6,
                              methods="ddim,euler", steps="1,3", out_dir=str(tmp_path / "out"), name="tiny")
    rows = [row for row in run(config) if row["kind"] == "all"]
    assert [(r["method"], r["steps"]) for r in rows] == [("ddim", 1), ("ddim", 3), ("euler", 1), ("euler", 3)]
    assert len({r["lpips_copy_last"] for r in rows}) == 1  # the same clips for every sampler
    assert len({round(r["mse_model"], 8) for r in rows}) >= 3  # the samplers and step counts differ
    # DDIM and Euler take the same single step from pure noise to the x0 estimate at the largest level
    assert rows[0]["mse_model"] == pytest.approx(rows[2]["mse_model"], rel=1e-3)
    with open(tmp_path / "out" / "tiny_steps.csv") as handle:
        assert len(list(csv.DictReader(handle))) >= 4
    assert (tmp_path / "out" / "tiny_steps.png").stat().st_size > 0


def test_bad_grids_are_refused_with_the_fix():
    for methods, steps, match in (("ddim,rk4", "1", "unknown"), ("ddim", "0,2", ">= 1"), ("ddim", "a,b", "integers"),
                                  ("", "1", "empty")):
        with pytest.raises(ValueError, match=match):
            parse_grid(StepsCurveConfig(methods=methods, steps=steps))


def test_episodes_reach_the_clips_and_are_refused_for_a_data_folder(tmp_path):
    """``episodes=`` is ``come_rl.evaluate``'s: it counts online episodes, so a data folder refuses it, naming why."""
    with pytest.raises(ValueError, match="episodes=2 with data="):
        run(StepsCurveConfig(data=str(tmp_path / "maze"), episodes=2, clips=4, methods="ddim", steps="1",
                             out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
