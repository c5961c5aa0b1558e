"""Memory that recalls: full-frame targets, memorization by the training loss (LoRA or full), bit-exact reset,
time-reversed and pose-keyed revisit clips, bad memorize input, and a tiny model that recalls a tile it saw once."""

import math

import numpy as np
import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experts.episode_memory import EpisodeMemory
from come_rl.experts.expert import DiffusionExpert
from come_rl.experts.long_term import MemorizeConfig
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.results import wilson_interval
from come_rl.world_model import CompositionConfig, WorldModel
from envs.memory_cards import DOWN, INVERSE_ACTIONS, LEFT, RIGHT, TOGGLE, UP, MemoryCardsEnv, cursor_pose_model
from tests.test_world_model import episode, tiny_expert


def expert_of(target: str, seed: int = 0) -> DiffusionExpert:
    expert = tiny_expert(seed)
    expert.target = target
    return expert


def observed_model(method: str, target: str = "full", steps: int = 40, **memorize) -> WorldModel:
    env, frames, actions = episode(steps)
    wm = WorldModel(expert_of(target), env.action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"]),
                    sampler=SamplerConfig(steps=3), memorize_config=MemorizeConfig(method=method, steps=5, batch_size=4,
                                                                                   **memorize))
    wm.reset()
    for frame, action in zip(frames, actions):
        wm.observe(frame, action)
    return wm


def state_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_full_and_residual_targets_are_what_the_loss_denoises():
    frames = torch.rand(2, 4, 3, 48, 48) * 2 - 1
    assert torch.equal(expert_of("full").clean_target(frames), frames[:, -1])
    assert torch.equal(expert_of("residual").clean_target(frames), frames[:, -1] - frames[:, -2])
    with pytest.raises(ValueError, match="unknown expert target"):
        DiffusionExpert(VideoUNet(UNetConfig(widths=[16, 32, 32], cond_dim=32)), CosineSchedule(), target="delta")


def test_a_residual_expert_speaks_frame_space_with_the_same_eps():
    """z_frame = alpha x_next + sigma eps and z_res = z_frame - alpha x_last share eps: predict_eps must agree."""
    expert = expert_of("residual")
    context, actions = torch.rand(2, 3, 3, 48, 48) * 2 - 1, torch.eye(5)[[0, 4]].repeat(1, 4).reshape(2, 4, 5)
    x_t, t = torch.randn(2, 3, 48, 48), torch.tensor([0.7, 0.2])
    alpha, _ = expert.schedule.alpha_sigma(t)
    with torch.no_grad():
        prepared = expert.prepare(context, actions)
        eps_frame_space = expert.predict_eps(prepared, x_t, t)
        expert.target = "full"  # the same network read in residual space by hand
        eps_residual_space = expert.predict_eps(expert.prepare(context, actions),
                                                x_t - alpha[:, None, None, None] * context[:, -1], t)
    torch.testing.assert_close(eps_frame_space, eps_residual_space, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_memorization_lowers_the_loss_changes_only_the_memory_and_reset_is_bit_exact(method):
    wm = observed_model(method, steps=60)
    base_before, ltm_before = state_of(wm.base.backbone), state_of(wm.ltm.backbone)
    frames, actions, _ = wm.memory.sample_clips(16, 4, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(123)
    t = 0.95 + 0.05 * torch.rand(16, generator=g)

    def loss() -> float:
        with torch.no_grad():
            return wm.ltm.loss(frames, actions, t=t, generator=torch.Generator().manual_seed(9)).item()

    before = loss()
    stats = wm.memorize(steps=30, generator=torch.Generator().manual_seed(0), lr=5e-3 if method == "lora" else 1e-3)
    assert stats["steps"] == 30 and math.isfinite(stats["loss_last"])
    assert loss() < 0.8 * before
    for k, v in state_of(wm.base.backbone).items():  # the base never changes
        assert torch.equal(v, base_before[k]), k
    assert any(not torch.equal(v, ltm_before[k]) for k, v in state_of(wm.ltm.backbone).items())
    wm.reset()
    after_reset = state_of(wm.ltm.backbone)
    for k, v in ltm_before.items():
        if "lora_A" in k:  # LoRA's A is re-drawn at random; B = 0 makes the adapter exactly zero
            continue
        assert torch.equal(after_reset[k], v), k
    x_t, tt = torch.randn(2, 3, 48, 48), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        a = wm.ltm.predict_eps(wm.ltm.prepare(frames[:2, :3], actions[:2]), x_t, tt)
        b = wm.base.predict_eps(wm.base.prepare(frames[:2, :3], actions[:2]), x_t, tt)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=-3), "steps must be an integer >= 1"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=-1e-3), "lr must be a finite number > 0"),
    (dict(window=10_000), "longer than the episode"),
    (dict(reverse_fraction=0.5), "needs inverse_actions"),
    (dict(revisit_fraction=0.5), "needs poses"),
    (dict(method="adapters"), "method must be 'lora' or 'full'"),
    (dict(optimizer="lbfgs"), "optimizer must be 'adamw' or 'sgd'"),
    (dict(optimizer="sgd", momentum=1.0), "momentum must lie in \\[0, 1\\)"),
])
def test_bad_memorize_input_is_a_clear_error_before_any_weight_changes(bad, message):
    wm = observed_model("lora")
    before = state_of(wm.ltm.backbone)
    with pytest.raises(ValueError, match=message):
        wm.memorize(**bad)
    assert wm.ltm.memorized_steps == 0
    for k, v in state_of(wm.ltm.backbone).items():
        assert torch.equal(v, before[k]), k


def test_sgd_memorizes_too_and_a_call_may_switch_the_optimizer():
    """``optimizer="sgd"`` (steps in proportion to the gradient, with momentum) lowers the memorization loss; a later
    call with AdamW gets AdamW, not the SGD state."""
    wm = observed_model("full", steps=60)
    frames, actions, _ = wm.memory.sample_clips(16, 4, generator=torch.Generator().manual_seed(5))
    t = 0.95 + 0.05 * torch.rand(16, generator=torch.Generator().manual_seed(123))

    def loss() -> float:
        with torch.no_grad():
            return wm.ltm.loss(frames, actions, t=t, generator=torch.Generator().manual_seed(9)).item()

    before = loss()
    wm.memorize(steps=30, generator=torch.Generator().manual_seed(0), optimizer="sgd", lr=0.1)
    assert isinstance(wm.ltm._optimizer, torch.optim.SGD) and wm.ltm._optimizer.param_groups[0]["momentum"] == 0.9
    assert loss() < 0.5 * before  # measured 0.28x
    wm.memorize(steps=1, generator=torch.Generator().manual_seed(1), lr=1e-4)
    assert isinstance(wm.ltm._optimizer, torch.optim.AdamW)


def test_memorize_on_an_empty_memory_is_an_error():
    wm = observed_model("full")
    wm.reset()
    with pytest.raises(ValueError, match="empty memory"):
        wm.memorize(steps=1)


def test_reversed_clips_play_the_episode_backwards_with_inverse_actions():
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=3, options={"initial_cover": "covered", "cursor": (1, 1)})
    memory = EpisodeMemory((3, 48, 48), env.action_spec)
    memory.append(torch.from_numpy(frame).float(), torch.zeros(5), None)
    for action in (RIGHT, TOGGLE, DOWN, LEFT, UP):
        frame, *_ = env.step(action)
        memory.append(torch.from_numpy(frame).float(), torch.from_numpy(env.action_spec.encode(action)), None)
    frames, actions, _ = memory.sample_reversed_clips(64, 4, INVERSE_ACTIONS, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (64, 4, 48, 48, 3) and actions.shape == (64, 4, 5)
    forward = memory.frames
    for clip, acts in zip(frames, actions):
        # every reversed clip is a backwards window of the episode ...
        match = [s for s in range(len(forward) - 3) if torch.equal(clip, forward[s:s + 4].flip(0))]
        assert match, "a reversed clip is not a backwards window of the episode"
        s = match[0]
        # ... and the action into reversed frame j undoes the forward action out of it
        forward_actions = memory.actions[s + 1:s + 5].argmax(-1).flip(0)
        assert torch.equal(acts.argmax(-1), torch.tensor([INVERSE_ACTIONS[a] for a in forward_actions]))


def test_end_padded_reversed_clips_reach_the_episodes_last_transition():
    """Without end padding a transition in the last steps is never the target of a reversed clip (in the zig-zag,
    covering the last tiles); with it the context runs past the end as the last frame repeated with zero actions, and
    the action into the target undoes the episode's last action."""
    memory = EpisodeMemory((1, 2, 2), MemoryCardsEnv().action_spec)
    episode_actions = [None, RIGHT, TOGGLE, DOWN, LEFT, TOGGLE]  # frame i is filled with i
    for i, action in enumerate(episode_actions):
        encoded = torch.zeros(5) if action is None else torch.nn.functional.one_hot(torch.tensor(action), 5).float()
        memory.append(torch.full((1, 2, 2), float(i)), encoded, None)
    last = len(episode_actions) - 1

    def targets(pad_end):
        frames, actions, _ = memory.sample_reversed_clips(256, 4, INVERSE_ACTIONS, pad_end=pad_end,
                                                          generator=torch.Generator().manual_seed(0))
        return frames, actions, {int(clip[-1, 0, 0, 0]) for clip in frames}

    _, _, plain = targets(False)
    assert max(plain) == last - 4  # the last 3 transitions are never reversed
    frames, actions, padded = targets(True)
    assert padded == set(range(last))  # every frame but the last is a target now
    clip = next(c for c in range(256) if int(frames[c, -1, 0, 0, 0]) == last - 1)
    assert torch.equal(frames[clip, :3, 0, 0, 0], torch.full((3,), float(last)))  # the last frame, repeated
    assert torch.equal(actions[clip, :3], torch.zeros(3, 5))  # past the end: no action
    assert torch.equal(actions[clip, 3], torch.nn.functional.one_hot(torch.tensor(INVERSE_ACTIONS[TOGGLE]), 5).float())


def test_revisit_clips_pair_a_context_with_another_time_at_the_reached_pose():
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=4, options={"initial_cover": "uncovered", "cursor": (0, 2)})
    memory = EpisodeMemory((3, 48, 48), env.action_spec)
    memory.append(torch.from_numpy(frame).float(), torch.zeros(5), torch.from_numpy(info["pose"]))
    for action in (LEFT, LEFT, TOGGLE, RIGHT, TOGGLE, RIGHT, LEFT, LEFT):
        frame, *_, info = env.step(action)
        memory.append(torch.from_numpy(frame).float(), torch.from_numpy(env.action_spec.encode(action)),
                      torch.from_numpy(info["pose"]))
    frames, actions, poses = memory.sample_revisit_clips(64, 4, cursor_pose_model, generator=torch.Generator().manual_seed(1))
    all_frames, all_poses = memory.frames, memory.poses
    for clip, acts, clip_poses in zip(frames, actions, poses):
        reached = cursor_pose_model(clip_poses[-2][None], acts[-1][None])[0]
        assert torch.equal(clip_poses[-1], reached)
        target = [j for j in range(len(all_frames)) if torch.equal(all_frames[j], clip[-1])]
        assert any(torch.allclose(all_poses[j], reached) for j in target)
    # The pair that uncovered starts need: the context after (0, 0) was covered (frame 3), a toggle, and the earlier
    # view of (0, 0) open (frame 2) as the target (what the episode never showed as the result of a toggle).
    toggle = torch.from_numpy(env.action_spec.encode(TOGGLE))
    assert any(torch.equal(clip[-2], all_frames[3]) and torch.equal(acts[-1], toggle) and torch.equal(clip[-1], all_frames[2])
               for clip, acts in zip(frames, actions))


def test_short_context_rows_look_like_an_episode_that_began_at_their_newest_context_frame():
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=5, options={"initial_cover": "covered", "cursor": (0, 0)})
    memory = EpisodeMemory((3, 48, 48), env.action_spec)
    memory.append(torch.from_numpy(frame).float(), torch.zeros(5), torch.from_numpy(info["pose"]))
    for action in (TOGGLE, TOGGLE, RIGHT, TOGGLE, TOGGLE, DOWN, TOGGLE):
        frame, *_, info = env.step(action)
        memory.append(torch.from_numpy(frame).float(), torch.from_numpy(env.action_spec.encode(action)),
                      torch.from_numpy(info["pose"]))
    from come_rl.experts.long_term import LongTermMemoryExpert

    def batch(fraction):
        config = MemorizeConfig(batch_size=32, short_context_fraction=fraction)
        return LongTermMemoryExpert._memorization_batch(memory, config, 4, None, torch.Generator().manual_seed(2))

    plain, short = batch(0.0), batch(0.5)
    frames, actions, poses = short
    is_short = [bool((frames[i, :2] == frames[i, 2:3]).all() and (actions[i, :2] == 0).all()) for i in range(32)]
    # Exactly the share asked for is rewritten (plain clips rarely repeat a frame with zero actions: only at the start)
    plain_short = sum(bool((plain[0][i, :2] == plain[0][i, 2:3]).all() and (plain[1][i, :2] == 0).all())
                      for i in range(32))
    assert sum(is_short) >= 16 > plain_short
    # The newest context frame, the action into it, the target and its action are kept; poses follow the frames
    assert torch.equal(frames[:, 2:], plain[0][:, 2:]) and torch.equal(actions[:, 2:], plain[1][:, 2:])
    assert torch.equal(poses[:, 2:], plain[2][:, 2:])
    with pytest.raises(ValueError, match="short_context_fraction"):
        MemorizeConfig(short_context_fraction=1.5)


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert wilson_interval(0, 16)[0] == 0.0 and wilson_interval(16, 16)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_a_tiny_model_memorizes_a_tile_seen_once_and_recalls_it_when_uncovered_again():
    """Covered start: the cursor uncovers tile (1, 1) once, covers it, walks away and back. A small untrained U-Net
    that memorizes the episode (full fine-tuning by the training loss) must imagine that tile's object on the second
    uncover, nearest to the true object among the 8 templates (in at least 4 of 6 samples); without memorization it
    must not (at most 2 of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float rounding, so the same training run, on any machine
    try:
        _tiny_model_recall()
    finally:
        torch.set_num_threads(threads)


def _tiny_model_recall():
    torch.manual_seed(0)
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=11, options={"initial_cover": "covered", "cursor": (1, 1)})
    config = dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[32, 48, 64], cond_dim=32)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), target="full")
    wm = WorldModel(expert, env.action_spec, 48, composition=CompositionConfig(experts=["base", "ltm"], alphas={"ltm": 2.0}),
                    sampler=SamplerConfig(steps=8), memorize_config=MemorizeConfig(method="full", steps=1, batch_size=32,
                                                                                   lr=2e-3, noise_low=0.0))
    wm.reset()
    wm.observe(frame)
    for action in (LEFT, RIGHT, TOGGLE, TOGGLE, RIGHT, LEFT):
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action))
    truth, *_ = env.step(TOGGLE)
    obj = int(info["layout"][1, 1])
    rs, cs = env.tile_slice(1, 1)
    m = env.margin
    templates = env.tile_templates()[:8, m:-m, m:-m].astype(np.float32) / 255

    def recalled(seed: int) -> bool:
        imagined = wm.imagine(torch.from_numpy(env.action_spec.encode(TOGGLE))[None, None].float(), seed=seed)[0, 0]
        tile = ((imagined.permute(1, 2, 0).numpy() + 1) / 2)[rs, cs][m:-m, m:-m]
        return int(np.argmin(((templates - tile) ** 2).mean(axis=(1, 2, 3)))) == obj

    before = [recalled(s) for s in range(6)]
    wm.memorize(steps=300, generator=torch.Generator().manual_seed(0))
    after = [recalled(s) for s in range(6)]
    assert sum(after) >= 4, (before, after)
    assert sum(before) <= 2, before


@pytest.mark.parametrize("bad, message", [
    (dict(episodes_per_start=0), "episodes_per_start must be >= 1"),
    (dict(compositions="PoCE w=9"), "unknown compositions"),
    (dict(steps_list="0,-5"), "steps_list needs integers >= 0"),
    (dict(steps_list="0,ten"), "comma-separated integers"),
])
def test_recall_rejects_bad_settings_before_any_episode(bad, message):
    from come_rl.experiments.recall import RecallConfig, validate

    with pytest.raises(ValueError, match=message):
        validate(RecallConfig(**bad))


def test_recall_runs_end_to_end_on_the_shipped_model(tmp_path):
    """One episode per start, 3 memorization steps: every row has a rate inside its Wilson interval, and the table,
    plot and examples are written."""
    from come_rl.experiments.recall import RecallConfig, run

    rows = run(RecallConfig(episodes_per_start=1, steps_list="0,3", compositions="sweep", sampler_steps=2,
                            out_dir=str(tmp_path), seed=77))
    assert {(r["composition"], r["episode_start"]) for r in rows} >= {("no memory (base)", "covered"),
                                                                       ("LTM alone", "uncovered")}
    for row in rows:
        assert row["tiles"] == 16
        assert row["nearest_ci95_low"] <= row["recall_nearest_object"] <= row["nearest_ci95_high"]
        assert (row["memorize_seconds_per_episode"] > 0) == (row["memorize_steps"] > 0)
    assert {p.name for p in tmp_path.iterdir()} >= {"memory_cards_recall.csv", "memory_cards_recall.md",
                                                    "memory_cards_recall.png", "memory_cards_recall_examples.png"}
    # one record per finished episode: the same command again reads them back (no episode played) ...
    from come_rl.experiments import recall

    table, example = (tmp_path / "memory_cards_recall.csv").read_text(), (tmp_path / "memory_cards_recall_examples.png")
    image = example.read_bytes()
    played = []
    original = recall.RecallWorker._play
    recall.RecallWorker._play = lambda self, task: played.append(task) or original(self, task)
    try:
        again = run(RecallConfig(episodes_per_start=1, steps_list="0,3", compositions="sweep", sampler_steps=2,
                                 out_dir=str(tmp_path), seed=77))
    finally:
        recall.RecallWorker._play = original
    assert not played and again == rows
    assert (tmp_path / "memory_cards_recall.csv").read_text() == table and example.read_bytes() == image
    # ... and other settings are refused
    with pytest.raises(ValueError, match="other settings"):
        run(RecallConfig(episodes_per_start=1, steps_list="0,3", compositions="sweep", sampler_steps=3,
                         out_dir=str(tmp_path), seed=77))


@pytest.mark.slow  # the same come_rl.fanout path as test_reproducibility's Ray run (kept in CI); -m slow runs it
def test_recall_on_ray_gives_the_local_table(tmp_path):
    """Episodes fanned out over 2 Ray actors (a local 2-CPU cluster) give the local run's recall rows."""
    import ray

    from come_rl.experiments.recall import RecallConfig, run

    common = dict(episodes_per_start=1, steps_list="0,2", compositions="no memory (base);LTM alone", sampler_steps=1,
                  threads=1, seed=78)
    local = run(RecallConfig(**common, out_dir=str(tmp_path / "local")))
    try:
        fanned = run(RecallConfig(**common, backend="ray", workers=2, out_dir=str(tmp_path / "ray")))
    finally:
        ray.shutdown()
    drop = "memorize_seconds_per_episode"
    assert [{k: v for k, v in r.items() if k != drop} for r in local] == \
        [{k: v for k, v in r.items() if k != drop} for r in fanned]
    assert len(local) == 4


def test_revisit_clips_without_a_pose_model_use_the_recorded_step():
    # Hand-made poses: frames 0..7 walk right along y = 0 and back; frame j's pixel value is j.
    xs = [0, 1, 2, 3, 3, 2, 1, 0]
    spec = MemoryCardsEnv().action_spec
    memory = EpisodeMemory((1, 2, 2), spec)
    for j, x in enumerate(xs):
        action = torch.zeros(5) if j == 0 else torch.nn.functional.one_hot(torch.tensor(j % 5), 5).float()
        memory.append(torch.full((1, 2, 2), float(j)), action, torch.tensor([float(x), 0.0, 0.0]))
    frames, actions, poses = memory.sample_revisit_clips(128, 3, None, tolerance=0.1,
                                                         generator=torch.Generator().manual_seed(0))
    seen = set()
    for clip, acts, clip_poses in zip(frames, actions, poses):
        end, target = int(clip[-2, 0, 0, 0]), int(clip[-1, 0, 0, 0])
        assert target not in (end, end + 1) and xs[target] == xs[end + 1]  # the same place, at another time
        assert torch.equal(acts[-1], memory.actions[end + 1])  # the action the episode took after the context
        assert float(clip_poses[-1, 0]) == xs[end + 1]
        seen.add((end, target))
    # Every pair: context ends at 1..6, the next pose is met again at another time (x=3 at frames 3/4, etc.).
    expected = {(e, j) for e in range(1, 7) for j in range(8) if j not in (e, e + 1) and xs[j] == xs[e + 1]}
    assert seen == expected
