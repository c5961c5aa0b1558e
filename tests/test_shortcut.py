"""Shortcut models (come_rl.shortcut, come_rl.train shortcut_fraction=): a step-conditioned U-Net begins as the plain
one, the batch split and the self-consistency target, a tiny model whose one told step lands nearer its own two-step
path, the world model telling the step size, and the errors of a shortcut asked wrongly."""

import json

import numpy as np
import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig, sample
from come_rl.distill import distillation_target, grid_levels
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.shortcut import draw_step_counts, shortcut_batch
from come_rl.train import parse_overrides, train

TINY = '{"widths": [16, 32, 32], "cond_dim": 32}'
COMMON = ["model=unet_cards", "threads=1", "batch_size=8", "online_episodes=16", f"backbone_overrides={TINY}",
          "log_every=5"]


def _net(step_conditioned: bool, seed: int = 0) -> VideoUNet:
    torch.manual_seed(seed)
    net = VideoUNet(UNetConfig(frame_size=16, unshuffle=2, action_dim=2, context_frames=1, widths=[8, 8], cond_dim=8,
                               step_conditioned=step_conditioned))
    with torch.no_grad():  # every weight non-zero (zero-initialised convolutions would hide the conditioning)
        for parameter in net.parameters():
            parameter.normal_(std=0.1)
        if step_conditioned:
            net.step_embed.weight.zero_()
            net.step_embed.bias.zero_()
    return net


def _inputs(b: int = 4):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(b, 1, 3, 16, 16, generator=g) * 2 - 1, torch.rand(b, 1, 3, 16, 16, generator=g) * 2 - 1,
            torch.rand(b, 2, 2, generator=g), torch.rand(b, generator=g))


def test_a_step_conditioned_unet_starts_as_the_plain_one_and_then_hears_the_step():
    plain, shortcut = _net(False), _net(True)
    shortcut.load_state_dict(plain.state_dict(), strict=False)  # step_embed stays zero-initialised
    noisy, context, actions, t = _inputs()
    steps = torch.tensor([0.0, 0.25, 0.5, 1.0])
    reference = plain(noisy, t, context, actions)
    assert torch.allclose(shortcut(noisy, t, context, actions, step=steps), reference, atol=1e-6)
    torch.nn.init.normal_(shortcut.step_embed.weight)
    told = shortcut(noisy, t, context, actions, step=steps)
    assert not torch.allclose(told[1:], reference[1:], atol=1e-4)
    assert torch.allclose(shortcut(noisy, t, context, actions, step=torch.zeros(4)), shortcut(noisy, t, context, actions))
    with pytest.raises(ValueError, match="without step_conditioned"):
        plain(noisy, t, context, actions, step=steps)
    assert torch.equal(plain(noisy, t, context, actions, step=torch.zeros(4)), reference)  # 0 is the plain denoiser


def test_step_counts_are_a_fraction_of_powers_of_two_and_reproducible():
    counts = draw_step_counts(64, 0.5, 4, torch.Generator().manual_seed(3))
    assert (counts > 0).sum() == 32 and set(counts.tolist()) == {0, 1, 2, 4}
    assert torch.equal(counts, draw_step_counts(64, 0.5, 4, torch.Generator().manual_seed(3)))
    assert (draw_step_counts(64, 0.0, 4, torch.Generator()) == 0).all()
    for bad in (0, 3, 6, True):
        with pytest.raises(ValueError, match="power of two"):
            draw_step_counts(8, 0.5, bad, torch.Generator())


def test_the_batch_keeps_plain_rows_and_gives_the_rest_the_models_own_two_half_step_target():
    """Plain rows: their level, their clip's frame, d = 0. A row of n steps: a level on n's grid, d = 1 / n, and the
    progressive-distillation target of the model itself told d / 2 (0 once 2n exceeds the largest count)."""
    net = _net(True)
    torch.nn.init.normal_(net.step_embed.weight)
    expert = DiffusionExpert(net, CosineSchedule(), target="full", prediction="v")
    g = torch.Generator().manual_seed(2)
    frames, actions = torch.rand(4, 2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 2, 2, generator=g)
    t, eps = torch.tensor([0.9, 0.6, 0.3, 0.8]), torch.randn(4, 3, 16, 16, generator=g)
    counts = torch.tensor([0, 1, 2, 4])
    levels, targets, steps = shortcut_batch(expert, frames, actions, None, t, eps, None, counts, max_steps=4)
    assert torch.equal(steps, torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert levels[0] == t[0] and torch.equal(targets[0], frames[0, -1])
    assert torch.allclose(levels[1:], torch.tensor([1.0, 1.0, 0.25]))  # floor(t n) steps below 1
    for row, n, half in ((1, 1, 0.5), (2, 2, 0.25), (3, 4, 0.0)):
        by_hand = distillation_target(expert, frames[row:row + 1], actions[row:row + 1], None,
                                      grid_levels(t[row:row + 1], n), eps[row:row + 1], None, n,
                                      teacher_step=torch.tensor([half]))
        assert torch.allclose(targets[row], by_hand[0], atol=1e-5)
    # the told half step matters: the 1-step row's target is not the plain denoiser's two half steps
    plain_half = distillation_target(expert, frames[1:2], actions[1:2], None, levels[1:2], eps[1:2], None, 1,
                                     teacher_step=torch.zeros(1))
    assert not torch.allclose(targets[1], plain_half[0], atol=1e-4)
    with pytest.raises(ValueError, match="step-conditioned"):
        shortcut_batch(DiffusionExpert(_net(False), CosineSchedule()), frames, actions, None, t, eps, None, counts, 4)


def _samples(expert, frames, actions, steps, step_size, seed=0):
    expert.step_size = step_size
    prepared = expert.prepare(frames[:, :-1], actions)
    with torch.no_grad():
        return sample(lambda x, t: expert.predict_eps(prepared, x, t), (frames.shape[0], *frames.shape[2:]),
                      expert.schedule, SamplerConfig(steps=steps), torch.Generator().manual_seed(seed))


def test_a_tiny_shortcut_model_lands_in_one_told_step_nearer_its_own_two_step_path(tmp_path):
    """Warm-started from a plain expert and trained with 3/4 of each batch on self-consistency (largest count 1: one
    step of size 1 regresses two plain half steps), the model's one step told d = 1 lands nearer its own plain 2-step
    samples than its plain one step does (0.78x at this scale; a model that ignored the step would score 1x); the run
    records the recipe."""
    from come_rl.checkpoint import load_expert
    from come_rl.data_sources import clips_to_tensors, open_data_source

    train(parse_overrides([*COMMON, f"out={tmp_path / 'plain'}", "steps=20", "lr=2e-3"]))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'shortcut'}", f"init_from={tmp_path / 'plain'}",
                           "shortcut_fraction=0.75", "shortcut_max_steps=1", "steps=300", "lr=2e-3", "warmup_steps=0",
                           "ema_decay=0"]))
    expert, spec = load_expert(tmp_path / "shortcut")
    assert spec["shortcut"] == {"fraction": 0.75, "max_steps": 1} and spec["backbone_kwargs"]["step_conditioned"]
    source = open_data_source("online:memory_cards", seed=123, online_episodes=8)
    frames, actions, _ = clips_to_tensors(source.sample_clips(16, expert.context_frames + 2, np.random.default_rng(5)))
    goal = _samples(expert, frames, actions, 2, 0.0)
    plain = (_samples(expert, frames, actions, 1, 0.0) - goal).pow(2).mean().item()
    told = (_samples(expert, frames, actions, 1, 1.0) - goal).pow(2).mean().item()
    assert told < 0.9 * plain, (plain, told)


def test_a_world_model_tells_its_experts_the_samplers_step_size(tmp_path):
    from come_rl.world_model import WorldModel

    train(parse_overrides([*COMMON, f"out={tmp_path / 'ckpt'}", "shortcut_fraction=0.5", "steps=1"]))
    # trained counts 1, 2, 4 (shortcut_max_steps=4) are told 1 / steps; any other count runs the plain denoiser
    for steps, method, told in ((4, "ddim", 0.25), (1, "ddim", 1.0), (3, "ddim", 0.0), (10, "ddim", 0.0),
                                (3, "euler", 0.0)):
        wm = WorldModel.load(tmp_path / "ckpt", sampler={"steps": steps, "method": method})
        wm.reset()
        wm.observe(np.zeros((48, 48, 3), np.uint8))
        wm.imagine(np.eye(5, dtype=np.float32)[[0]][None], seed=0)
        assert wm.base.step_size == told and wm.base.step_conditioned
    assert SamplerConfig(steps=8).step_size == 0.125


def test_a_shortcut_asked_wrongly_is_refused_before_work(tmp_path):
    for bad, match in (("shortcut_fraction=1.0", r"in \[0, 1\)"), ("shortcut_fraction=-0.1", r"in \[0, 1\)"),
                       ("shortcut_max_steps=3", "power of two")):
        with pytest.raises(ValueError, match=match):
            train(parse_overrides([*COMMON, f"out={tmp_path / 'x'}", "shortcut_fraction=0.5", bad, "steps=1"]))
    with pytest.raises(ValueError, match="not with distill_from"):
        train(parse_overrides([*COMMON, f"out={tmp_path / 'x'}", "shortcut_fraction=0.5", "context_noise=0.1",
                               "steps=1"]))
    with pytest.raises(ValueError, match="needs a U-Net"):
        train(parse_overrides([*COMMON[:-2], "model=dit_cards", f"out={tmp_path / 'x'}", "shortcut_fraction=0.5",
                               "steps=1"]))
    assert not (tmp_path / "x" / "base.safetensors").exists()


def test_a_shortcut_student_is_assembled_with_the_steps_asked(tmp_path):
    from come_rl.distill import assemble_student
    from come_rl.world_model import WorldModel

    train(parse_overrides([*COMMON, f"out={tmp_path / 'teacher'}", "steps=1"]))
    (tmp_path / "teacher" / "world_model.json").write_text(json.dumps({"sampler": {"steps": 10}}))
    train(parse_overrides([*COMMON, f"out={tmp_path / 'student'}", f"init_from={tmp_path / 'teacher'}",
                           "shortcut_fraction=0.5", "steps=1"]))
    assemble_student(tmp_path / "teacher", tmp_path / "student", tmp_path / "ckpt", steps=1)
    settings = json.loads((tmp_path / "ckpt" / "world_model.json").read_text())
    assert settings["sampler"]["steps"] == 1 and settings["shortcut"]["fraction"] == 0.5
    wm = WorldModel.load(tmp_path / "ckpt")
    assert wm.sampler.steps == 1 and wm.base.step_conditioned
    assemble_student(tmp_path / "teacher", tmp_path / "student", tmp_path / "keep")
    assert json.loads((tmp_path / "keep" / "world_model.json").read_text())["sampler"]["steps"] == 10
    with pytest.raises(ValueError, match="integer >= 1"):
        assemble_student(tmp_path / "teacher", tmp_path / "student", tmp_path / "bad", steps=-1)
    assert not (tmp_path / "bad").exists()


def test_the_ltm_of_a_shortcut_base_memorizes_by_that_bases_own_loss_and_a_plain_base_refuses_it():
    """MemorizeConfig.shortcut_fraction: the copy's batch is split as the base's training batch is (plain rows and
    self-consistency rows whose targets the copy itself makes); it lowers the loss, reset() undoes it exactly, and a
    plain base refuses the option."""
    from come_rl.experts.long_term import MemorizeConfig
    from come_rl.world_model import CompositionConfig, WorldModel
    from envs.memory_cards import MemoryCardsEnv

    from tests.test_world_model import TINY, observe_random_walk, tiny_expert

    base = tiny_expert()
    shortcut = DiffusionExpert(VideoUNet(UNetConfig(**TINY, step_conditioned=True)), CosineSchedule()).eval()
    shortcut.backbone.load_state_dict(base.backbone.state_dict(), strict=False)
    shortcut.spec = dict(base.spec, shortcut={"fraction": 0.5, "max_steps": 2})
    for expert, refused in ((shortcut, False), (base, True)):
        wm = WorldModel(expert, MemoryCardsEnv().action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"]),
                        sampler=SamplerConfig(steps=1),
                        memorize_config=MemorizeConfig(method="full", steps=30, batch_size=8, lr=2e-3,
                                                       shortcut_fraction=0.5, shortcut_max_steps=2))
        observe_random_walk(wm, 12)
        if refused:
            with pytest.raises(ValueError, match="needs a shortcut base"):
                wm.memorize(generator=torch.Generator().manual_seed(0))
            continue
        start = {k: v.clone() for k, v in wm.ltm.backbone.state_dict().items()}
        stats = wm.memorize(generator=torch.Generator().manual_seed(0))
        assert stats["loss_last"] < stats["loss_first"]
        assert wm.ltm.step_conditioned and wm.ltm.step_size == 0.0
        wm.imagine(np.eye(5, dtype=np.float32)[[0]][None], seed=0)
        assert wm.ltm.step_size == 1.0 == wm.base.step_size  # 1 step, trained: both told 1
        wm.reset()
        assert all(torch.equal(v, start[k]) for k, v in wm.ltm.backbone.state_dict().items())
    with pytest.raises(ValueError, match="shortcut_fraction"):
        MemorizeConfig(shortcut_fraction=1.5)
    with pytest.raises(ValueError, match="power of two"):
        MemorizeConfig(shortcut_fraction=0.5, shortcut_max_steps=3)
