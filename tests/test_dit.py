"""Tests of the video DiT backbone: contract shapes, exact KV cache, the window mask, the
unconditional mode, bad input, the registry and a real overfitting run."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from come_rl.nets.dit import VideoDiT, VideoDiTConfig
from come_rl.nets.registry import BACKBONES, DIT_CONFIGS, build_backbone, register_backbone
from dit_reference import denoise_uncached

torch.set_num_threads(1)

SMALL = {"frame_size": 16, "patch_size": 4, "hidden_size": 32, "num_heads": 2, "action_dim": 5}


def randomized(model: VideoDiT, scale: float = 0.05, seed: int = 0) -> VideoDiT:
    """adaLN-Zero starts every block as the identity and the output at zero; perturb all weights so
    that masks and caches are exercised by a network whose every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def make_inputs(model: VideoDiT, batch: int, num_context: int, num_targets: int, seed: int = 1,
                dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    c, s = model.config.channels, model.config.frame_size
    context = torch.rand(batch, num_context, c, s, s, generator=generator, dtype=dtype) * 2 - 1
    actions = torch.randn(batch, num_context + num_targets, model.action_dim, generator=generator, dtype=dtype)
    noisy = torch.randn(batch, num_targets, c, s, s, generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator, dtype=dtype)
    poses = None
    if model.pose_dim:
        poses = torch.randn(batch, num_context + num_targets, model.pose_dim, generator=generator, dtype=dtype)
    return context, actions, noisy, t, poses


# ----------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", ["dit_cpu", "stm_cpu", "sltm_cpu", "full_attention_cpu", "sliding_window_cpu",
                                  "ssm_cpu"])
def test_cpu_configs_follow_the_backbone_contract(name):
    model = randomized(build_backbone(name, frame_size=32, action_dim=6))
    config = model.config
    for num_context in (1, config.context_frames):  # fewer context frames than the maximum are allowed
        context, actions, noisy, t, poses = make_inputs(model, 2, num_context, config.predicted_frames)
        state = model.prepare(context, actions, poses, torch.tensor([False, True]))
        out = model.denoise(state, noisy, t)
        assert out.shape == noisy.shape == (2, config.predicted_frames, 3, 32, 32)
        assert torch.isfinite(out).all()
    # the one-shot forward of the base class is prepare + denoise
    assert torch.allclose(model(noisy, t, context, actions, poses), model.denoise(model.prepare(
        context, actions, poses), noisy, t), atol=1e-6)


@pytest.mark.parametrize("name", ["dit_s", "dit_b", "stm_paper"])
def test_paper_sizes_run_one_step(name):
    config = DIT_CONFIGS[name]
    model = build_backbone(name, frame_size=16)  # the paper's width/depth/heads on tiny frames
    assert (model.config.hidden_size, model.config.depth) == (config.hidden_size, config.depth)
    parameters = sum(p.numel() for p in model.parameters())
    # DiT-S has ~33M and DiT-B ~130M parameters in Peebles & Xie; ours differ only by embeddings.
    expected = {"dit_s": 33e6, "dit_b": 130e6, "stm_paper": 33e6}[name]
    assert 0.9 * expected < parameters < 1.1 * expected, parameters
    context, actions, noisy, t, poses = make_inputs(model, 1, 3, 2)
    with torch.no_grad():
        out = model.denoise(model.prepare(context, actions, poses), noisy, t)
    assert out.shape == (1, 2, 3, 16, 16)


def test_module_names_let_peft_put_lora_on_attention_and_mlp():
    from peft import LoraConfig, inject_adapter_in_model

    model = VideoDiT(VideoDiTConfig(**SMALL, depth=2, context_frames=2, predicted_frames=1))
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["qkv", "proj", "fc1", "fc2"])
    model = inject_adapter_in_model(lora, model)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    context, actions, noisy, t, _ = make_inputs(model, 1, 2, 1)
    assert model.denoise(model.prepare(context, actions), noisy, t).shape == noisy.shape


# ---------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("attention", [
    {},
    {"window_frames": 2, "full_attention_layers": (1,)},
    {"window_frames": 3},
    {"window_frames": 2, "ssm_layers": (0, 2)},
    {"pose_dim": 4},
])
def test_kv_cache_equals_recomputing_the_full_sequence(attention):
    model = randomized(VideoDiT(VideoDiTConfig(**SMALL, depth=4, context_frames=7, predicted_frames=3, **attention)))
    context, actions, noisy, t, poses = make_inputs(model, 3, 6, 3)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        for drop_context in (None, drop):
            state = model.prepare(context, actions, poses, drop_context)
            cached = model.denoise(state, noisy, t)
            # the same state serves a second step at another noise level
            cached_again = model.denoise(state, noisy * 0.5, t * 0.3)
            reference = denoise_uncached(model, context, actions, noisy, t, poses, drop_context)
            reference_again = denoise_uncached(model, context, actions, noisy * 0.5, t * 0.3, poses, drop_context)
            assert cached.abs().mean() > 0.05  # a real signal, not zeros
            assert (cached - reference).abs().max() < 1e-5
            assert (cached_again - reference_again).abs().max() < 1e-5


def test_expand_state_matches_preparing_repeated_rows():
    model = randomized(VideoDiT(VideoDiTConfig(**SMALL, depth=2, context_frames=4, predicted_frames=2,
                                               window_frames=2, ssm_layers=(1,))))
    context, actions, *_ = make_inputs(model, 2, 4, 2)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        expanded = model.expand_state(model.prepare(context, actions, None, drop), 3)
        repeated = model.prepare(context.repeat_interleave(3, 0), actions.repeat_interleave(3, 0), None,
                                 drop.repeat_interleave(3, 0))
        candidates = torch.randn(6, 2, 3, 16, 16)
        levels = torch.rand(6)
        assert torch.allclose(model.denoise(expanded, candidates, levels),
                              model.denoise(repeated, candidates, levels), atol=1e-6)


# ------------------------------------------------------------------------------------ window mask
def _window_model(full_attention_layers=()):
    config = VideoDiTConfig(**SMALL, depth=3, context_frames=8, predicted_frames=2, window_frames=2,
                            full_attention_layers=full_attention_layers)
    return randomized(VideoDiT(config), scale=0.3, seed=3)


def test_sliding_window_mask_hides_frames_outside_every_window_and_full_layer_reveals_them():
    windowed = _window_model()
    # 3 window layers of W=2 reach back 3 frames from the first target (position 8): frames 5..9.
    assert windowed.receptive_field_start(8) == 5
    context, actions, noisy, t, _ = make_inputs(windowed, 2, 8, 2)

    def outputs(model, frames):
        with torch.no_grad():
            return model.denoise(model.prepare(frames, actions), noisy, t), \
                denoise_uncached(model, frames, actions, noisy, t)

    base_cached, base_reference = outputs(windowed, context)
    for outside in range(5):  # every frame outside the stacked windows
        perturbed = context.clone()
        perturbed[:, outside] = -perturbed[:, outside] + 0.5 * torch.randn_like(perturbed[:, outside])
        cached, reference = outputs(windowed, perturbed)
        assert torch.equal(cached, base_cached), f"frame {outside} leaked through the window (cached path)"
        assert (reference - base_reference).abs().max() < 1e-6, f"frame {outside} leaked (dense mask)"
    # positive control: the earliest frame inside the receptive field does change the output
    perturbed = context.clone()
    perturbed[:, 5] = -perturbed[:, 5]
    assert (outputs(windowed, perturbed)[0] - base_cached).abs().max() > 1e-3

    # The same weights with block 1 switched to full attention: frame 0 now reaches the targets.
    with_full_layer = _window_model(full_attention_layers=(1,))
    with_full_layer.load_state_dict(windowed.state_dict())
    base_full, _ = outputs(with_full_layer, context)
    perturbed = context.clone()
    perturbed[:, 0] = -perturbed[:, 0]
    changed_cached, changed_reference = outputs(with_full_layer, perturbed)
    assert (changed_cached - base_full).abs().max() > 1e-3
    assert (changed_reference - base_full).abs().max() > 1e-3


def test_dropped_rows_do_not_depend_on_context_or_poses():
    model = randomized(VideoDiT(VideoDiTConfig(**SMALL, depth=3, context_frames=4, predicted_frames=2,
                                               pose_dim=4, window_frames=2, full_attention_layers=(2,),
                                               ssm_layers=(0,))))
    context, actions, noisy, t, poses = make_inputs(model, 4, 4, 2)
    other_context, _, _, _, other_poses = make_inputs(model, 4, 4, 2, seed=7)
    # the actions of the context frames are part of the context too; the targets' actions stay
    other_actions = actions.clone()
    other_actions[:, :4] = torch.randn_like(other_actions[:, :4])
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        first = model.denoise(model.prepare(context, actions, poses, drop), noisy, t)
        second = model.denoise(model.prepare(other_context, other_actions, other_poses, drop), noisy, t)
        no_poses = model.denoise(model.prepare(other_context, other_actions, None, drop), noisy, t)
    assert (first[drop] - second[drop]).abs().max() < 1e-6
    assert (first[drop] - no_poses[drop]).abs().max() < 1e-6  # dropped poses = the learned "no pose" embedding
    assert (first[~drop] - second[~drop]).abs().max() > 1e-3  # kept rows do see their context


# -------------------------------------------------------------------------------------- bad input
def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="larger than the context"):
        VideoDiTConfig(**SMALL, depth=4, context_frames=4, window_frames=5)
    with pytest.raises(ValueError, match="outside the model's blocks"):
        VideoDiTConfig(**SMALL, depth=4, context_frames=8, window_frames=4, full_attention_layers=(4,))
    with pytest.raises(ValueError, match="outside the model's blocks"):
        VideoDiTConfig(**SMALL, depth=4, context_frames=8, window_frames=4, ssm_layers=(-1,))
    with pytest.raises(ValueError, match="window_frames is None"):
        VideoDiTConfig(**SMALL, depth=4, full_attention_layers=(1,))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VideoDiTConfig(**dict(SMALL, frame_size=18))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("dit_tiny")
    with pytest.raises(ValueError, match="unknown VideoDiT option"):
        build_backbone("dit_cpu", hidden=64)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("dit_cpu", BACKBONES["dit_cpu"])


def test_bad_inputs_raise_clear_errors():
    model = VideoDiT(VideoDiTConfig(**SMALL, depth=2, context_frames=3, predicted_frames=2, pose_dim=4))
    context, actions, noisy, t, poses = make_inputs(model, 2, 3, 2)
    with pytest.raises(ValueError, match="poses must have shape"):
        model.prepare(context, actions, poses[..., :3])
    with pytest.raises(ValueError, match="poses must have shape"):
        model.prepare(context, actions, poses[:, :4])
    bad_poses = poses.clone()
    bad_poses[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="poses contain NaN"):
        model.prepare(context, actions, bad_poses)
    with pytest.raises(ValueError, match="no pose conditioning"):
        VideoDiT(VideoDiTConfig(**SMALL, depth=1)).prepare(context[:, :1], actions[:, :2, :], poses[:, :2])
    with pytest.raises(ValueError, match="frame_size matching"):
        model.prepare(torch.zeros(2, 3, 3, 32, 32), actions, poses)
    with pytest.raises(ValueError, match="this backbone takes 1..3"):
        model.prepare(torch.zeros(2, 4, 3, 16, 16), torch.zeros(2, 5, 5), None)
    with pytest.raises(ValueError, match="predicted frames"):
        model.prepare(context, actions[:, :3], None)
    bad_context = context.clone()
    bad_context[1, 0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.prepare(bad_context, actions, poses)
    state = model.prepare(context, actions, poses)
    with pytest.raises(ValueError, match="noisy must be"):
        model.denoise(state, noisy[:, :1], t)
    with pytest.raises(ValueError, match="t must be"):
        model.denoise(state, noisy, torch.rand(3))
    with pytest.raises(ValueError, match="drop_context"):
        model.prepare(context, actions, poses, torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------- learning
def test_tiny_dit_overfits_one_clip():
    """A real training run: x0-prediction under a cosine schedule on one clip of a moving square."""
    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig(**dict(SMALL, hidden_size=64, num_heads=4), depth=2, context_frames=3,
                                    predicted_frames=1))
    frames = -torch.ones(1, 4, 3, 16, 16)
    for step in range(4):  # a bright square moving right by 3 pixels per frame
        frames[0, step, :, 5:9, 2 + 3 * step:6 + 3 * step] = 1.0
    context, target = frames[:, :3], frames[:, 3:]
    actions = torch.zeros(1, 4, 5)
    actions[:, 1:, 1] = 1.0
    batch = 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    state_inputs = (context.expand(batch, -1, -1, -1, -1), actions.expand(batch, -1, -1))

    def x0_loss(levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha = torch.cos(levels * math.pi / 2)[:, None, None, None, None]
        sigma = torch.sin(levels * math.pi / 2)[:, None, None, None, None]
        noisy = alpha * target + sigma * noise
        return ((model(noisy, levels, *state_inputs) - target) ** 2).mean()

    evaluation_levels = torch.linspace(0.05, 0.95, batch)
    evaluation_noise = torch.randn(batch, 1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        initial = x0_loss(evaluation_levels, evaluation_noise).item()
    for _ in range(250):
        loss = x0_loss(torch.rand(batch), torch.randn(batch, 1, 3, 16, 16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = x0_loss(evaluation_levels, evaluation_noise).item()
    # The zero-initialised model predicts 0 everywhere: MSE = 1 on a -1/+1 clip. Copying the last
    # context frame would score 24 changed pixels * 2^2 / 256 = 0.375; the memorised clip must be far below.
    assert abs(initial - 1.0) < 1e-6
    assert final < 0.02, f"x0 MSE {final:.4f} after training (start {initial:.3f})"


def test_noisy_skip_lets_tokens_narrower_than_a_patch_fit_the_low_noise_target():
    """patch 8 x 8 x 3 = 192 values per token of 32 channels: without the skip, v at low noise (mostly the noise
    itself) cannot pass through the tokens and the loss stalls; with it the same training fits far better."""
    from come_rl.diffusion import CosineSchedule
    from come_rl.experts.expert import DiffusionExpert

    def final_loss(noisy_skip: bool) -> float:
        torch.manual_seed(0)
        config = VideoDiTConfig(**dict(SMALL, patch_size=8), depth=1, context_frames=2, predicted_frames=1,
                                noisy_skip=noisy_skip)
        expert = DiffusionExpert(VideoDiT(config), CosineSchedule())
        generator = torch.Generator().manual_seed(1)
        frames = torch.rand(1, 3, 3, 16, 16, generator=generator).expand(8, -1, -1, -1, -1) * 2 - 1
        actions = torch.zeros(8, 3, 5)
        optimizer = torch.optim.Adam(expert.parameters(), lr=3e-3)
        losses = []
        for _ in range(150):
            t = torch.rand(8, generator=generator) * 0.3  # low noise, where v is mostly the noise
            loss = expert.loss(frames, actions, t=t, generator=generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return float(np.mean(losses[-20:]))

    with_skip, without = final_loss(True), final_loss(False)
    assert with_skip < 0.5 * without, (with_skip, without)
