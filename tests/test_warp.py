"""The U-Net's motion prior (warp_anchor): identity at start, exact shifts, its loss trains it, residual experts use it."""

import math

import pytest
import torch

from come_rl.diffusion import CosineSchedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.unet import FlowWarp, UNetConfig, VideoUNet

CFG = dict(frame_size=32, unshuffle=4, action_dim=6, context_frames=3, widths=[16, 32], cond_dim=16, warp_anchor=True,
           warp_width=16)


def frames_and_actions(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, 4, 3, 32, 32, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 6, (b, 4), generator=g), 6).float()
    return frames, actions


def test_an_untrained_warp_copies_the_last_frame_and_a_constant_flow_shifts_it():
    warp = FlowWarp(3, 4, 6, width=8)
    frames, actions = frames_and_actions()
    context = frames[:, :3]
    torch.testing.assert_close(warp(context, actions[:, :4]), context[:, -1], atol=1e-5, rtol=0)
    with torch.no_grad():  # a flow of +4 pixels along x everywhere: the frame sampled 4 pixels to the right
        warp.net[-1].bias.copy_(torch.tensor([FlowWarp.max_shift * math.atanh(4 / FlowWarp.max_shift), 0.0]))
    shifted = warp(context, actions[:, :4])
    torch.testing.assert_close(shifted[..., :-4], context[:, -1, ..., 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(shifted[..., -4:], context[:, -1, ..., -1:].expand(-1, -1, -1, 4), atol=1e-4, rtol=0)


def test_the_motion_loss_learns_a_shift_and_the_residual_is_taken_to_the_warped_frame():
    torch.manual_seed(0)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**CFG)), CosineSchedule(), target="residual", prediction="x0")
    g = torch.Generator().manual_seed(1)
    base = torch.rand(8, 3, 32, 48, generator=g) * 2 - 1
    base = torch.nn.functional.avg_pool2d(base, 3, stride=1, padding=1)  # smooth images: a shift is learnable
    # Every clip pans 3 pixels per frame to the left (the view turns): frame i is base shifted by 3 i.
    frames = torch.stack([base[..., 3 * i:3 * i + 32] for i in range(4)], dim=1)
    actions = torch.zeros(8, 4, 6)
    actions[..., 2] = 1
    t = torch.full((8,), 0.5)

    def motion_error():
        with torch.no_grad():
            return float((expert.backbone.anchor_frame(frames[:, :3], actions) - frames[:, 3]).pow(2).mean())

    before = motion_error()
    optimizer = torch.optim.Adam(expert.backbone.parameters(), lr=3e-3)
    for _ in range(60):
        loss = expert.loss(frames, actions, t=t, generator=torch.Generator().manual_seed(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = motion_error()
    copy_last = float((frames[:, 2] - frames[:, 3]).pow(2).mean())
    assert before == pytest.approx(copy_last, rel=1e-3)  # starts as copy-last
    assert after < 0.3 * before
    # Sampling subtracts the same anchor the loss used: prepare's anchor is the warped frame, not the last one.
    with torch.no_grad():
        prepared = expert.prepare(frames[:, :3], actions)
        torch.testing.assert_close(prepared.anchor, expert.backbone.anchor_frame(frames[:, :3], actions))
        assert (prepared.anchor - frames[:, 2]).abs().max() > 1e-2


def test_a_warp_expert_warm_started_from_a_plain_one_begins_as_it(tmp_path):
    from come_rl.checkpoint import expert_spec, save_expert
    from come_rl.train import TrainConfig, build_expert, warm_start

    plain_cfg = {k: v for k, v in CFG.items() if k not in ("warp_anchor", "warp_width")}
    torch.manual_seed(0)
    donor = DiffusionExpert(VideoUNet(UNetConfig(**plain_cfg)), CosineSchedule(), target="residual", prediction="x0")
    for p in donor.backbone.parameters():  # a "trained" network: every weight non-zero
        torch.nn.init.normal_(p, std=0.05)
    save_expert(tmp_path, donor, expert_spec(donor, "unet", plain_cfg, extra={"frame_size": 32}))
    config = TrainConfig(model="unet", target="residual", prediction="x0",
                         backbone_overrides=dict(CFG, frame_size=32, action_dim=6))
    expert, _, _ = build_expert(config, 6, 32)
    message = warm_start(expert, tmp_path)
    assert "in_context.weight" in message and "motion-prior / recall tensors initialised" in message
    frames, actions = frames_and_actions(seed=3)
    x_t, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.full((2,), 0.6)
    with torch.no_grad():
        want = donor.predict_eps(donor.prepare(frames[:, :3], actions), x_t, t)
        got = expert.predict_eps(expert.prepare(frames[:, :3], actions), x_t, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any(p.abs().sum() > 0 for n, p in expert.backbone.named_parameters() if n.startswith("warp.net.0"))


def test_a_longer_context_warp_expert_warm_started_from_a_warp_base_begins_as_it(tmp_path):
    """The maze STM: a motion-prior expert over 8 context frames, warm-started from a 3-frame motion-prior base,
    predicts exactly what the base predicts from the newest 3 frames (the source's warped-frame input stays last)."""
    from come_rl.checkpoint import expert_spec, save_expert
    from come_rl.train import TrainConfig, build_expert, warm_start

    torch.manual_seed(0)
    donor = DiffusionExpert(VideoUNet(UNetConfig(**CFG)), CosineSchedule(), target="residual", prediction="x0")
    for p in donor.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_expert(tmp_path, donor, expert_spec(donor, "unet", CFG, extra={"frame_size": 32}))
    config = TrainConfig(model="unet", role="stm", target="residual", prediction="x0",
                         backbone_overrides=dict(CFG, frame_size=32, action_dim=6, context_frames=8))
    expert, _, _ = build_expert(config, 6, 32)
    assert "widened to 8 context frames (in_context.weight)" in warm_start(expert, tmp_path)
    g = torch.Generator().manual_seed(5)
    frames = torch.rand(2, 9, 3, 32, 32, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 9), generator=g), 6).float()
    x_t, t = torch.randn(2, 3, 32, 32, generator=g), torch.full((2,), 0.6)
    with torch.no_grad():
        want = donor.predict_eps(donor.prepare(frames[:, 5:8], actions[:, 5:]), x_t, t)
        got = expert.predict_eps(expert.prepare(frames[:, :8], actions), x_t, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().mean() > 0.05


def test_context_noise_augmentation_starts_as_its_source_and_learns_the_level(tmp_path):
    """context_noise: a U-Net warm-started from one without it predicts exactly what the source predicts; a training
    step with noisy contexts moves the level embedding off zero; the noise drawn for a batch is the one the loss would
    draw from the same generator (resumable, rank-shardable); a backbone without it refuses the key."""
    from come_rl.checkpoint import expert_spec, save_expert
    from come_rl.train import DistributedContext, TrainConfig, build_expert, draw_training_noise, training_step, warm_start

    torch.manual_seed(0)
    donor = DiffusionExpert(VideoUNet(UNetConfig(**CFG)), CosineSchedule(), target="residual", prediction="x0")
    for p in donor.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_expert(tmp_path, donor, expert_spec(donor, "unet", CFG, extra={"frame_size": 32}))
    config = TrainConfig(model="unet", target="residual", prediction="x0", context_noise=0.3,
                         backbone_overrides=dict(CFG, frame_size=32, action_dim=6), batch_size=2)
    expert, _, _ = build_expert(config, 6, 32)
    assert "context_level_embed.weight" in warm_start(expert, tmp_path)
    frames, actions = frames_and_actions(seed=7)
    x_t, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)), torch.full((2,), 0.5)
    with torch.no_grad():
        want = donor.predict_eps(donor.prepare(frames[:, :3], actions), x_t, t)
        got = expert.predict_eps(expert.prepare(frames[:, :3], actions), x_t, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the batch's noise, drawn ahead, equals what the loss draws itself from the same generator
    drawn = draw_training_noise(2, (3, 32, 32), 0.0, torch.Generator().manual_seed(1), 0.3, 3)
    assert len(drawn) == 5 and drawn[3].shape == (2,) and drawn[4].shape == (2, 3, 3, 32, 32)
    assert 0 <= float(drawn[3].min()) and float(drawn[3].max()) <= 0.3
    with torch.no_grad():
        given = expert.loss(frames, actions, t=drawn[0], eps=drawn[1], context_level=drawn[3], context_eps=drawn[4])
        own = expert.loss(frames, actions, context_noise=0.3, generator=torch.Generator().manual_seed(1))
        clean = expert.loss(frames, actions, t=drawn[0], eps=drawn[1])
    assert float(given) == pytest.approx(float(own), rel=1e-6) and float(given) != pytest.approx(float(clean))
    optimizer = torch.optim.AdamW(expert.backbone.parameters(), lr=1e-3)
    training_step(expert, expert.backbone, optimizer, (frames, actions, None), drawn, config, DistributedContext(), 2,
                  torch.device("cpu"), "fp32", step=0)
    assert expert.backbone.context_level_embed.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="built with context_noise"):
        donor.loss(frames, actions, context_noise=0.3)
