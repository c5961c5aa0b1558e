"""WorldModel: shapes, reproducibility, input validation, LTM memorization and reset, save/load, overfitting."""

import numpy as np
import pytest
import torch

from come_rl.checkpoint import expert_spec, load_expert, save_expert
from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experts.expert import DiffusionExpert
from come_rl.experts.long_term import LongTermMemoryExpert, MemorizeConfig
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.world_model import CompositionConfig, WorldModel
from envs.memory_cards import MemoryCardsEnv

TINY = dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[16, 32, 32], cond_dim=32)


def tiny_expert(seed: int = 0) -> DiffusionExpert:
    torch.manual_seed(seed)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule())
    expert.spec = expert_spec(expert, "unet", TINY, extra={"action_spec": {"kind": "discrete", "dim": 5},
                                                           "frame_size": 48})
    # Break the zero-init of the output layer so predictions depend on the input (an untrained but generic net).
    torch.nn.init.normal_(expert.backbone.out_conv.weight, std=0.02)
    return expert.eval()


def episode(steps: int = 40, seed: int = 0):
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    frames, actions = [frame], [None]
    for _ in range(steps):
        action = env.random_policy_action(rng)
        frame, *_ = env.step(action)
        frames.append(frame)
        actions.append(env.action_spec.encode(action))
    return env, frames, actions


def tiny_stm_and_sltm() -> tuple[DiffusionExpert, DiffusionExpert]:
    """Untrained small transformer STM (8 context frames, sliding window) and pose-conditioned SLTM, seeded."""
    from come_rl.nets.registry import build_backbone

    torch.manual_seed(0)
    small = dict(frame_size=48, action_dim=5, predicted_frames=1, patch_size=8, hidden_size=32, num_heads=2)
    stm = DiffusionExpert(build_backbone("stm_cpu", **small, context_frames=8, depth=2, full_attention_layers=(1,)),
                          CosineSchedule(), name="stm").eval()
    sltm = DiffusionExpert(build_backbone("sltm_cpu", **small, depth=2), CosineSchedule(), name="sltm",
                           uses_poses=True).eval()
    return stm, sltm


def observe_random_walk(wm: WorldModel, steps: int, seed: int = 0) -> WorldModel:
    """Reset ``wm`` and let it observe a seeded random-policy Memory Cards walk, frames with actions and poses."""
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=seed)
    wm.reset()
    wm.observe(frame, None, info["pose"])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        action = env.random_policy_action(rng)
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action), info["pose"])
    return wm


def filled_world_model(experts=("base", "ltm"), steps: int = 40) -> WorldModel:
    env, frames, actions = episode(steps)
    wm = WorldModel(tiny_expert(), env.action_spec, 48, composition=CompositionConfig(experts=list(experts)),
                    sampler=SamplerConfig(steps=3), memorize_config=MemorizeConfig(steps=5, batch_size=4))
    wm.reset()
    for frame, action in zip(frames, actions):
        wm.observe(frame, action)
    return wm


def one_hot_actions(batch: int, horizon: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.randint(0, 5, (batch, horizon), generator=torch.Generator().manual_seed(seed)), 5).float()


def test_imagine_shapes_reproducibility_and_no_side_effects():
    wm = filled_world_model()
    before = len(wm.memory)
    lora_before = [p.clone() for p in wm.ltm.adapter_parameters]
    actions = one_hot_actions(3, 4)
    a = wm.imagine(actions, seed=7)
    b = wm.imagine(actions, seed=7)
    c = wm.imagine(actions, seed=8)
    assert a.shape == (3, 4, 3, 48, 48)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(wm.memory) == before
    assert all(torch.equal(p, q) for p, q in zip(lora_before, wm.ltm.adapter_parameters))
    # base + LTM with alpha_LTM = 2: the base pass cancels (eq. 4), one call per step; alpha = 3 needs both.
    assert wm.last_network_calls == 1 * 4 * 3
    wm.composition.alphas["ltm"] = 3.0
    wm.imagine(actions, seed=7)
    assert wm.last_network_calls == 2 * 4 * 3


def test_imagine_rejects_bad_input():
    wm = filled_world_model(experts=("base",))
    with pytest.raises(ValueError, match=r"\(batch, horizon, 5\)"):
        wm.imagine(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="horizon >= 1"):
        wm.imagine(torch.zeros(2, 0, 5))
    with pytest.raises(ValueError, match="NaN"):
        wm.imagine(torch.full((1, 2, 5), float("nan")))
    with pytest.raises(ValueError, match="one-hot"):
        wm.imagine(torch.full((1, 2, 5), 3.0))
    with pytest.raises(ValueError, match="uint8"):
        wm.observe(np.zeros((48, 48, 3), np.float32), np.eye(5)[0])
    with pytest.raises(ValueError, match="shape"):
        wm.observe(np.zeros((64, 64, 3), np.uint8), np.eye(5)[0])
    with pytest.raises(ValueError, match="first frame"):
        wm.observe(np.zeros((48, 48, 3), np.uint8))
    empty = WorldModel(tiny_expert(), MemoryCardsEnv().action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"]))
    with pytest.raises(RuntimeError, match="observe"):
        empty.imagine(one_hot_actions(1, 1))
    with pytest.raises(ValueError, match="empty memory"):
        empty.memorize(steps=1)
    with pytest.raises(ValueError, match="rank"):
        MemorizeConfig(rank=0)
    with pytest.raises(ValueError, match="stm"):
        WorldModel(tiny_expert(), MemoryCardsEnv().action_spec, 48, composition=CompositionConfig(experts=["base", "stm"]))


def fixed_loss(expert, frames, actions) -> float:
    """Diffusion loss on a fixed batch of clips, noise and noise levels near pure noise (where memory matters)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return expert.loss(frames, actions, t=0.95 + 0.05 * torch.rand(frames.shape[0], generator=g), generator=g).item()


def test_memorization_lowers_the_episode_loss_and_reset_restores_the_base_exactly():
    wm = filled_world_model(steps=60)
    frames, actions, _ = wm.memory.sample_clips(16, 4, generator=torch.Generator().manual_seed(5))
    x_t, t = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.4])
    base_state = wm.base.prepare(frames[:2, :3], actions[:2])

    def ltm_eps():
        with torch.no_grad():
            return wm.ltm.predict_eps(wm.ltm.prepare(frames[:2, :3], actions[:2]), x_t, t)

    with torch.no_grad():
        base_eps = wm.base.predict_eps(base_state, x_t, t)
    assert torch.equal(ltm_eps(), base_eps)  # fresh adapters: B = 0
    before = fixed_loss(wm.ltm, frames, actions)
    stats = wm.memorize(steps=40, generator=torch.Generator().manual_seed(0), lr=5e-3)
    after = fixed_loss(wm.ltm, frames, actions)
    assert stats["steps"] == 40
    assert after < 0.8 * before, (before, after)  # at least 20 % lower on the memorized episode
    assert not torch.equal(ltm_eps(), base_eps)
    wm.reset()
    assert len(wm.memory) == 0
    assert torch.equal(ltm_eps(), base_eps)  # nothing of episode A reaches episode B


def test_save_load_roundtrip_and_corrupt_checkpoints(tmp_path):
    expert = tiny_expert()
    save_expert(tmp_path, expert, expert.spec)
    loaded, spec = load_expert(tmp_path, "base")
    for (name, p), q in zip(expert.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="requested"):
        load_expert(tmp_path, "base", expect={"role": "stm"})
    with pytest.raises(FileNotFoundError, match="role"):
        load_expert(tmp_path, "stm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_expert(tmp_path / "nowhere")
    weights = tmp_path / "base.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_expert(tmp_path, "base")


def test_a_cpu_size_unet_overfits_one_clip():
    """A real learning test: 200 steps on one clip cut its diffusion loss by more than 40 %."""
    torch.manual_seed(0)
    env, frames, actions = episode(12, seed=3)
    # Pick a step that changes the frame (a move or a toggle), so copying the last frame is wrong.
    k = next(i for i in range(4, 13) if not np.array_equal(frames[i], frames[i - 1]))
    clip = torch.stack([torch.from_numpy(f).float().div(127.5).sub(1).permute(2, 0, 1) for f in frames[k - 3:k + 1]])[None]
    acts = torch.stack([torch.from_numpy(a) for a in actions[k - 3:k + 1]])[None]
    expert = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule())
    optimizer = torch.optim.Adam(expert.parameters(), lr=3e-3)
    batch, batch_actions = clip.expand(16, -1, -1, -1, -1), acts.expand(16, -1, -1)
    losses = []
    for step in range(200):
        loss = expert.loss(batch, batch_actions, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-20:])


def test_all_four_experts_compose_with_one_call_per_expert_and_step():
    """Base + LTM + STM (sliding-window DiT) + SLTM (pose-conditioned DiT): shapes, reproducibility, call count."""
    from envs.memory_cards import cursor_pose_model

    stm, sltm = tiny_stm_and_sltm()
    env, frames, actions = episode(20)
    wm = WorldModel(tiny_expert(), env.action_spec, 48, stm=stm, sltm=sltm,
                    composition=CompositionConfig(experts=["base", "ltm", "stm", "sltm"],
                                                  alphas={"base": 1.0, "ltm": 3.0, "stm": 2.0, "sltm": 2.0}),
                    sampler=SamplerConfig(steps=2), memorize_config=MemorizeConfig(steps=2, batch_size=2),
                    pose_model=cursor_pose_model)
    observe_random_walk(wm, 12)
    wm.memorize(steps=2)
    acts = one_hot_actions(2, 3)
    a, b = wm.imagine(acts, seed=1), wm.imagine(acts, seed=1)
    assert a.shape == (2, 3, 3, 48, 48)
    assert torch.equal(a, b)
    # 4 experts -> 4 network calls per denoising step (STM and SLTM run conditional + unconditional rows in one
    # call; the LTM's baseline is the base's pass): 3 frames x 2 steps x 4.
    assert wm.last_network_calls == 3 * 2 * 4
    with pytest.raises(ValueError, match="pose"):
        wm.observe(frames[-1], env.action_spec.encode(0), np.array([np.nan, 0, 0]))


def test_full_parameter_memorization_is_undone_by_reset():
    """MemorizeConfig.full_parameters trains chosen weights in full; reset() must restore them bit-exactly."""
    env, frames, actions = episode(20)
    wm = WorldModel(tiny_expert(), env.action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"]),
                    sampler=SamplerConfig(steps=2),
                    memorize_config=MemorizeConfig(steps=3, batch_size=4, full_parameters=r"pos_maps\..*"))
    wm.reset()
    for frame, action in zip(frames, actions):
        wm.observe(frame, action)
    assert any("pos_maps" in n for n, p in wm.ltm.backbone.named_parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in wm.ltm.backbone.state_dict().items() if "lora_" not in k}
    wm.memorize(steps=3, lr=1e-2)
    changed = [k for k, v in wm.ltm.backbone.state_dict().items() if "pos_maps" in k and not torch.equal(v, before[k])]
    assert changed
    wm.reset()
    after = {k: v for k, v in wm.ltm.backbone.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_full_memorization_of_chosen_weights_trains_only_them_and_is_undone_by_reset():
    """method="full" with full_parameters trains those weights of the copy only (the rest frozen, so the backward pass
    stops at the lowest of them); reset() restores them; a pattern that matches nothing is an error."""
    env, frames, actions = episode(20)
    pattern = r"(up_blocks\.2|out_norm|out_conv)\..*"
    wm = WorldModel(tiny_expert(), env.action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"]),
                    sampler=SamplerConfig(steps=2),
                    memorize_config=MemorizeConfig(method="full", steps=3, batch_size=4, full_parameters=pattern))
    wm.reset()
    for frame, action in zip(frames, actions):
        wm.observe(frame, action)
    trainable = {n for n, p in wm.ltm.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("up_blocks.2.", "out_norm.", "out_conv.")) for n in trainable)
    before = {k: v.clone() for k, v in wm.ltm.backbone.state_dict().items()}
    wm.memorize(steps=3, lr=1e-2)
    after = wm.ltm.backbone.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and changed <= trainable
    assert any(k.startswith("out_conv.") for k in changed)
    wm.reset()
    assert all(torch.equal(wm.ltm.backbone.state_dict()[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="matches no parameter"):
        LongTermMemoryExpert(wm.base, MemorizeConfig(method="full", full_parameters="decoder_typo.*"))


def test_change_weighted_memorization_clips_favour_frames_that_change():
    from come_rl.experts.episode_memory import EpisodeMemory
    from come_rl.interfaces import ActionSpec

    memory = EpisodeMemory((3, 8, 8), ActionSpec("discrete", 2))
    for i in range(40):  # a static episode except for one change, at frame 30
        frame = torch.full((3, 8, 8), 0.5 if i >= 30 else -0.5)
        memory.append(frame, torch.zeros(2), None)
    g = torch.Generator().manual_seed(0)
    uniform, *_ = memory.sample_clips(200, 4, generator=g)
    weighted, *_ = memory.sample_clips(200, 4, generator=g, change_weighting=1.0)
    changes = lambda clips: ((clips[:, -1] - clips[:, -2]).abs().sum(dim=(1, 2, 3)) > 0).float().mean().item()  # noqa: E731
    assert changes(weighted) == 1.0  # every weighted clip ends on the one change
    assert changes(uniform) < 0.15  # 1 of 37 start positions
    half, *_ = memory.sample_clips(200, 4, generator=g, change_weighting=0.5)
    assert 0.45 < changes(half) < 0.65
    with pytest.raises(ValueError, match="change_weighting"):
        memory.sample_clips(4, 4, change_weighting=1.5)


def test_the_shipped_memory_cards_model_composes_all_four_trained_experts():
    from come_rl.run import resolve_checkpoint
    from envs.memory_cards import cursor_pose_model

    directory = resolve_checkpoint("memory_cards")
    wm = WorldModel.load(directory, experts=["base", "ltm", "stm", "sltm"], sampler={"steps": 2},
                         pose_model=cursor_pose_model)
    assert wm.stm.context_frames == 8 and wm.sltm.uses_poses
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=3)
    wm.reset()
    wm.observe(frame, None, info["pose"])
    for action in [1, 3, 4, 4, 1, 3]:
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action), info["pose"])
    wm.memorize(steps=1)
    actions = torch.from_numpy(np.stack([env.action_spec.encode(a) for a in (1, 4)]))[None].repeat(2, 1, 1)
    first, second = wm.imagine(actions, seed=5), wm.imagine(actions, seed=5)
    assert first.shape == (2, 2, 3, 48, 48) and torch.equal(first, second)
    assert torch.isfinite(first).all() and first.abs().max() <= 1.0
    # The shipped CoME splits the noise range: the base and the LTM at t >= 0.8, the STM and SLTM below (where the
    # base's coefficient is 0): 2 network calls at each of the 2 steps (t = 1, 0.5) of each of the 2 frames.
    assert wm.composition.active_from == {"ltm": 0.8} and wm.composition.active_below == {"stm": 0.8, "sltm": 0.8}
    assert wm.last_network_calls == 2 * 2 * 2


def test_the_sltm_memorizes_on_request_and_reset_restores_it():
    from come_rl.run import resolve_checkpoint
    from envs.memory_cards import cursor_pose_model

    wm = WorldModel.load(resolve_checkpoint("memory_cards"), experts=["base", "ltm", "sltm"], sampler={"steps": 2},
                         composition={"sltm_memorizes": True}, pose_model=cursor_pose_model)
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=4)
    wm.reset()
    wm.observe(frame, None, info["pose"])
    for action in [1, 3, 4, 4, 1, 3, 4]:
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action), info["pose"])
    actions = torch.from_numpy(np.stack([env.action_spec.encode(a) for a in (1, 4)]))[None]
    before = wm.imagine(actions, seed=2)
    stats = wm.memorize(steps=3, lr=1e-2)
    assert stats["sltm"]["steps"] == 3 and wm.sltm.memorized_steps == 3
    assert not torch.equal(wm.imagine(actions, seed=2), before)
    wm.reset()
    wm.observe(frame, None, info["pose"])
    assert wm.sltm.memorized_steps == 0 and wm.ltm.memorized_steps == 0
    wm.memory.clear()
    frame, info = env.reset(seed=4)
    wm.observe(frame, None, info["pose"])
    for action in [1, 3, 4, 4, 1, 3, 4]:
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action), info["pose"])
    assert torch.equal(wm.imagine(actions, seed=2), before)


def test_memorizing_sltm_needs_poses_and_saves_the_trained_sltm(tmp_path):
    from come_rl.run import resolve_checkpoint
    from envs.memory_cards import cursor_pose_model

    directory = resolve_checkpoint("memory_cards")
    wm = WorldModel.load(directory, experts=["base", "ltm", "sltm"], composition={"sltm_memorizes": True},
                         pose_model=cursor_pose_model)
    assert "source" not in dict(wm.sltm.named_modules())  # the trained SLTM is not part of the adapted copy
    env = MemoryCardsEnv()
    frame, _ = env.reset(seed=0)
    wm.reset()
    wm.observe(frame)
    for action in [1, 3, 4, 2]:
        frame, *_ = env.step(action)
        wm.observe(frame, env.action_spec.encode(action))  # no poses
    with pytest.raises(ValueError, match="SLTM memorizes with poses"):
        wm.memorize(steps=1)
    assert wm.ltm.memorized_steps == 0  # the error came before any expert changed
    wm.save(tmp_path)
    saved = load_expert(tmp_path, "sltm")[0].state_dict()
    trained = load_expert(directory, "sltm")[0].state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


def test_recall_rejects_unknown_episode_starts():
    from come_rl.experiments.recall import RecallConfig, run

    with pytest.raises(ValueError, match="starts must list covered and/or uncovered"):
        run(RecallConfig(starts="covered,open"))


def test_pairwise_composition_leaves_base_plus_ltm_bit_identical_and_changes_come():
    """The shipped composition is pairwise: for base + LTM it is the normalised rule to the bit (weights 1/2 instead
    of a sum halved: exact scalings), so every base + LTM number stays; with the STM and SLTM it differs (no
    dilution)."""
    import dataclasses

    from come_rl.run import resolve_checkpoint
    from envs.memory_cards import cursor_pose_model

    directory = resolve_checkpoint("memory_cards")
    outputs = {}
    for experts in (["base", "ltm"], ["base", "ltm", "stm", "sltm"]):
        wm = WorldModel.load(directory, experts=experts, sampler={"steps": 3}, memorize={"batch_size": 4},
                             pose_model=cursor_pose_model)
        assert wm.composition.pairwise
        observe_random_walk(wm, 10, seed=4)
        wm.memorize(steps=2, generator=torch.Generator().manual_seed(0))
        actions = torch.eye(5)[[4, 1]][None].repeat(2, 1, 1)
        pairwise = wm.imagine(actions, seed=3)
        wm.use_composition(dataclasses.replace(wm.composition, pairwise=False))
        outputs[len(experts)] = (pairwise, wm.imagine(actions, seed=3))
    assert torch.equal(*outputs[2])
    assert not torch.equal(*outputs[4])
