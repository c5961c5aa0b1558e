"""Progressive distillation (come_rl.distill, come_rl.train distill_from=): the two-step target against the closed
form of N(0, I) data, a tiny student that gets closer to its teacher, and the errors of a half-asked distillation."""

import json

import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig, sample
from come_rl.distill import distillation_target, grid_levels
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.train import parse_overrides, train

TINY = '{"widths": [16, 32, 32], "cond_dim": 32}'
COMMON = ["model=unet_cards", "threads=1", "batch_size=8", "online_episodes=16", f"backbone_overrides={TINY}",
          "log_every=5"]


def _gaussian_teacher() -> DiffusionExpert:
    """A v-prediction expert with a zero output: eps = sigma_t x_t, the exact denoiser of N(0, I) data."""
    net = VideoUNet(UNetConfig(frame_size=16, unshuffle=2, action_dim=2, context_frames=1, widths=[8, 8], cond_dim=8))
    torch.nn.init.zeros_(net.out_conv.weight)
    torch.nn.init.zeros_(net.out_conv.bias)
    return DiffusionExpert(net, CosineSchedule(), target="full", prediction="v").eval()


def test_grid_levels_are_the_samplers_steps():
    t = torch.tensor([0.0, 0.24, 0.25, 0.7, 0.999, 1.0])
    assert torch.allclose(grid_levels(t, 4), torch.tensor([1.0, 1.0, 0.75, 0.5, 0.25, 0.25]))
    with pytest.raises(ValueError, match=">= 1 steps"):
        grid_levels(t, 0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_land_closed_form(steps):
    """For N(0, I) data the exact teacher's DDIM step from t to s maps z to (alpha_s alpha_t + sigma_s sigma_t) z (x0 =
    alpha_t z, eps = sigma_t z). One DDIM step from z_t with the distillation target as the clean estimate must land on
    the product of two such factors, at every grid level, and at the last step on the teacher's clean estimate."""
    teacher, schedule = _gaussian_teacher(), CosineSchedule()
    g = torch.Generator().manual_seed(0)
    b = 2 * steps
    frames = torch.rand(b, 2, 3, 16, 16, generator=g) * 0.6 - 0.3
    eps = torch.rand(b, 3, 16, 16, generator=g) * 0.6 - 0.3  # |z_t| < 1: no x0 clipping in play
    t = grid_levels(torch.arange(b) / b, steps)
    target = distillation_target(teacher, frames, torch.zeros(b, 2, 2), None, t, eps, None, steps)
    a_t, s_t = schedule.alpha_sigma(t)
    z_t = a_t[:, None, None, None] * frames[:, -1] + s_t[:, None, None, None] * eps
    mid, end = t - 0.5 / steps, (t - 1.0 / steps).clamp_min(0)
    a_m, s_m = schedule.alpha_sigma(mid)
    a_e, s_e = schedule.alpha_sigma(end)
    last = end <= 0
    two_steps = torch.where(last, a_m * (a_m * a_t + s_m * s_t), (a_m * a_t + s_m * s_t) * (a_e * a_m + s_e * s_m))
    # the student's one DDIM step with x0 = target (eps re-derived from it), as the sampler takes it
    student_eps = (z_t - a_t[:, None, None, None] * target) / s_t[:, None, None, None]
    landed = torch.where(last[:, None, None, None], target,
                         a_e[:, None, None, None] * target + s_e[:, None, None, None] * student_eps)
    assert torch.allclose(landed, two_steps[:, None, None, None] * z_t, atol=1e-5)
    assert not torch.allclose(target, frames[:, -1], atol=1e-3)  # not the clip's own frame


def _samples(expert, frames, actions, steps, seed=0):
    prepared = expert.prepare(frames[:, :-1], actions)
    with torch.no_grad():
        return sample(lambda x, t: expert.predict_eps(prepared, x, t), (frames.shape[0], *frames.shape[2:]),
                      expert.schedule, SamplerConfig(steps=steps), torch.Generator().manual_seed(seed))


def test_a_tiny_student_gets_closer_to_its_teacher_and_records_it(tmp_path):
    """Distilled to 1 step from a 2-step teacher (come_rl.train distill_from=), the student's one-step samples are
    nearer the teacher's two-step samples than the teacher's own one-step samples were."""
    from come_rl.checkpoint import load_expert
    from come_rl.data_sources import clips_to_tensors, open_data_source

    train(parse_overrides([*COMMON, f"out={tmp_path / 'teacher'}", "steps=20", "lr=2e-3"]))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'student'}", f"distill_from={tmp_path / 'teacher'}",
                           "distill_steps=1", "steps=100", "lr=2e-3", "warmup_steps=0", "ema_decay=0"]))
    teacher, _ = load_expert(tmp_path / "teacher")
    student, spec = load_expert(tmp_path / "student")
    assert spec["distillation"]["teacher_steps"] == 2 and spec["distillation"]["student_steps"] == 1
    source = open_data_source("online:memory_cards", seed=123, online_episodes=8)
    import numpy as np

    frames, actions, _ = clips_to_tensors(source.sample_clips(16, teacher.context_frames + 2, np.random.default_rng(5)))
    goal = _samples(teacher, frames, actions, 2)
    before = (_samples(teacher, frames, actions, 1) - goal).pow(2).mean().item()
    after = (_samples(student, frames, actions, 1) - goal).pow(2).mean().item()
    assert after < 0.7 * before, (before, after)


def test_half_asked_or_mismatched_distillation_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="needs both distill_from"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", "distill_steps=2", "steps=1"]))
    with pytest.raises(ValueError, match="needs both distill_from"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path}", "steps=1"]))
    with pytest.raises(FileNotFoundError, match="distill_from"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path / 'none' / 'x'}",
                               "distill_steps=1", "steps=1"]))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'a'}", "steps=1"]))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'b'}", "steps=1", "seed=1"]))
    with pytest.raises(ValueError, match="pass role=base"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path / 'a' / 'base'}",
                               "role=stm", "distill_steps=1", "steps=1"]))
    # a distillation resumed with another teacher
    train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path / 'a'}", "distill_steps=1",
                           "steps=1"]))
    with pytest.raises(ValueError, match="another teacher or step count"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path / 'b'}", "distill_steps=1",
                               "steps=2"]))
    with pytest.raises(ValueError, match="another teacher or step count"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 's'}", f"distill_from={tmp_path / 'a'}", "distill_steps=2",
                               "steps=2"]))
    # a teacher of another frame size or action space
    recipe = tmp_path / "b" / "base.json"
    spec = json.loads(recipe.read_text())
    recipe.write_text(json.dumps(dict(spec, frame_size=64)))
    with pytest.raises(ValueError, match="64x64 model but"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 't'}", f"distill_from={tmp_path / 'b'}", "distill_steps=1",
                               "steps=1"]))
    recipe.write_text(json.dumps(dict(spec, action_spec={"kind": "discrete", "dim": 6})))
    with pytest.raises(ValueError, match="actions of dimension 6"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 't'}", f"distill_from={tmp_path / 'b'}", "distill_steps=1",
                               "steps=1"]))


def test_a_student_is_assembled_into_a_checkpoint_that_samples_with_its_steps(tmp_path):
    """python -m come_rl.distill: the teacher's checkpoint with the student's base and the student's step count; a
    student of another network, frame size or action space, or one never distilled, is refused and nothing written."""
    from come_rl.distill import assemble_student, main
    from come_rl.world_model import WorldModel

    train(parse_overrides([*COMMON, f"out={tmp_path / 'teacher'}", "steps=1"]))
    (tmp_path / "teacher" / "world_model.json").write_text(json.dumps({"sampler": {"steps": 10}}))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'student'}", f"distill_from={tmp_path / 'teacher'}",
                           "distill_steps=2", "steps=1"]))
    main([f"teacher={tmp_path / 'teacher'}", f"student={tmp_path / 'student'}", f"out={tmp_path / 'ckpt'}"])
    settings = json.loads((tmp_path / "ckpt" / "world_model.json").read_text())
    assert settings["sampler"]["steps"] == 2 and settings["distillation"]["teacher_steps"] == 4
    assert (tmp_path / "ckpt" / "base.safetensors").read_bytes() == (tmp_path / "student" / "base.safetensors").read_bytes()
    assert WorldModel.load(tmp_path / "ckpt").sampler.steps == 2
    # refused: a student never distilled; a student of another frame size or action space
    train(parse_overrides([*COMMON, f"out={tmp_path / 'plain'}", "steps=1"]))
    with pytest.raises(ValueError, match="records no distillation"):
        assemble_student(tmp_path / "teacher", tmp_path / "plain", tmp_path / "bad")
    recipe = tmp_path / "student" / "base.json"
    spec = json.loads(recipe.read_text())
    recipe.write_text(json.dumps(dict(spec, frame_size=64)))
    with pytest.raises(ValueError, match="frame size 64"):
        assemble_student(tmp_path / "teacher", tmp_path / "student", tmp_path / "bad")
    recipe.write_text(json.dumps(dict(spec, action_spec={"kind": "discrete", "dim": 6})))
    with pytest.raises(ValueError, match="action space"):
        assemble_student(tmp_path / "teacher", tmp_path / "student", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match="give teacher="):
        main([f"teacher={tmp_path / 'teacher'}"])
