"""The STM's window: clips whose next view only an older frame saw (come_rl.data.same_view) and the U-Net's window
recall (attention over the context frames keyed by the actions since each)."""

import math

import numpy as np
import pytest
import torch

from come_rl.data.episodes import Episode, EpisodeDataset
from come_rl.data.same_view import SameViewClips, StaleRecentClips, window_same_view
from come_rl.diffusion import CosineSchedule
from come_rl.interfaces import ActionSpec
from come_rl.experts.expert import DiffusionExpert
from come_rl.nets.unet import UNetConfig, VideoUNet, WindowRecall

CFG = dict(frame_size=32, unshuffle=4, action_dim=6, context_frames=8, widths=[16, 32], cond_dim=16, warp_anchor=True,
           warp_width=16)


def _turning_poses() -> np.ndarray:
    """Standing still, turning left 18 degrees a step four times, then right four times, twice over."""
    steps = [0, 1, 1, 1, 1, -1, -1, -1, -1] * 2
    heading = np.radians(18.0) * np.cumsum(steps)
    return np.stack([np.full_like(heading, 2.0), np.full_like(heading, 3.0), heading], axis=1)


def test_a_turn_that_comes_back_sees_again_what_an_older_frame_saw():
    poses = _turning_poses()  # headings 0, 18, 36, 54, 72, 54, 36, 18, 0, 0, 18, ...
    mask = window_same_view(poses, window=6, recent=3)
    # frame 7 (18 deg) was seen by frame 1 (6 back); frames 4-6 (72, 54, 36) did not see it
    assert mask[7]
    # frame 6 (36 deg): frame 2 saw it 4 back, frame 5 (54) and 4 (72) did not, frame 3 (54) did not: True
    assert mask[6]
    # frame 8 (0 deg): frame 0 is 8 back (outside a window of 6): False; inside a window of 8: True
    assert not mask[8] and window_same_view(poses, window=8, recent=3)[8]
    # frame 9 (0 deg again) has its view in the last frame: not "only in an older frame"
    assert not mask[9]
    assert not mask[:6].any()  # fewer than `window` frames before them
    # a step apart in place (0.2 cell > 0.15) is another view; within 0.1 cell the same
    moved = poses.copy()
    moved[:2, 0] += 0.2
    assert not window_same_view(moved, window=6, recent=3)[7]
    moved[:2, 0] -= 0.1
    assert window_same_view(moved, window=6, recent=3)[7]
    # headings wrap: 359 degrees is 1 degree from 0
    wrapped = poses.copy()
    wrapped[:, 2] += 2 * math.pi
    assert np.array_equal(window_same_view(wrapped, window=6, recent=3), mask)
    with pytest.raises(ValueError, match="NaN"):
        window_same_view(np.full((5, 3), np.nan), window=3, recent=1)
    with pytest.raises(ValueError, match="recent < window"):
        window_same_view(poses, window=3, recent=3)


class _Source:
    """One hand-made episode of the turning poses; frame i is filled with the value i."""

    def __init__(self, poses=True):
        p = _turning_poses()
        steps = len(p) - 1
        frames = np.broadcast_to(np.arange(steps + 1, dtype=np.uint8)[:, None, None, None], (steps + 1, 8, 8, 3))
        episode = Episode(frames=frames.copy(), actions=np.eye(6, dtype=np.float32)[np.arange(steps) % 6],
                          rewards=np.zeros(steps, np.float32), poses=p if poses else None, seed=0, index=0)
        self.action_spec = ActionSpec.discrete(6)
        self.dataset = EpisodeDataset.from_episodes([episode], self.action_spec)
        self.frame_size = 8

    def sample_clips(self, batch_size, length, rng):
        return self.dataset.sample_clips(batch_size, length, rng)


def test_same_view_clips_fill_their_share_of_the_batch_with_such_clips():
    source = SameViewClips(_Source(), fraction=0.5)
    clips = source.sample_clips(16, 8, np.random.default_rng(0))  # 6 context frames
    targets = clips["start"] + 7
    want = np.flatnonzero(window_same_view(_turning_poses(), window=6, recent=3))
    assert set(targets[:8].tolist()) <= set(want.tolist()) and len(set(targets[:8].tolist())) > 1
    assert (clips["frames"][:, -1, 0, 0, 0] == targets).all()  # frames, actions and poses of the same clip
    assert np.array_equal(clips["poses"][:8], np.stack([_turning_poses()[s:s + 8] for s in clips["start"][:8]]).astype(np.float32))
    again = source.sample_clips(16, 8, np.random.default_rng(0))
    assert np.array_equal(again["frames"], clips["frames"])  # the same rng, the same batch
    with pytest.raises(ValueError, match="poses"):
        SameViewClips(_Source(poses=False), fraction=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        SameViewClips(_Source(), fraction=1.5)
    with pytest.raises(ValueError, match="longer context"):
        source.sample_clips(4, 5, np.random.default_rng(0))


def test_stale_recent_clips_lag_only_the_newest_context_frames_of_their_share_of_rows():
    source = StaleRecentClips(_Source(), fraction=0.5, max_recent=3, max_stale=2)
    clips = source.sample_clips(64, 8, np.random.default_rng(1))  # 7 context frames, the target last
    plain = _Source().sample_clips(64, 8, np.random.default_rng(1))  # the same draws before the wrapper's own
    true = plain["frames"][:, :, 0, 0, 0].astype(int)  # frame value = its index in the episode
    got = clips["frames"][:, :, 0, 0, 0].astype(int)
    assert np.array_equal(clips["actions"], plain["actions"]) and np.array_equal(got[:, -1], true[:, -1])
    changed = got != true
    assert 16 < changed.any(axis=1).sum() < 48, "about half the rows are stale"
    for row in np.flatnonzero(changed.any(axis=1)):
        r = 7 - np.flatnonzero(~changed[row, :7]).max() - 1  # changed frames form a suffix of the context
        assert 1 <= r <= 3 and changed[row, 7 - r:7].all() and not changed[row, :7 - r].any()
        lag = set((true[row, 7 - r:7] - got[row, 7 - r:7]).tolist())
        assert len(lag) == 1 and lag.pop() in (1, 2), "each stale frame is the frame s steps before it"
    again = source.sample_clips(64, 8, np.random.default_rng(1))
    assert np.array_equal(again["frames"], clips["frames"])  # the same rng, the same batch
    with pytest.raises(ValueError, match="no true context frame"):
        source.sample_clips(4, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        StaleRecentClips(_Source(), fraction=0.0, max_recent=3)
    with pytest.raises(ValueError, match="stale_recent_max"):
        StaleRecentClips(_Source(), fraction=0.5, max_recent=0)


def _saved_donor(directory, config: dict) -> DiffusionExpert:
    """A residual x0 U-Net STM of ``config`` with every weight away from its initialisation, saved in ``directory``."""
    from come_rl.checkpoint import expert_spec, save_expert

    torch.manual_seed(0)
    donor = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), target="residual", prediction="x0")
    for p in donor.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_expert(directory, donor, expert_spec(donor, "unet", config, extra={"frame_size": 32}))
    return donor


def _one_step_inputs(g: torch.Generator) -> tuple:
    """(frames, actions, x_t, t) of 2 rows for an 8-frame context of 32x32 frames."""
    frames = torch.rand(2, 8, 3, 32, 32, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 9), generator=g), 6).float()
    return frames, actions, torch.randn(2, 3, 32, 32, generator=g), torch.full((2,), 0.6)


def test_a_recall_stm_warm_started_from_a_plain_one_begins_as_it(tmp_path):
    from come_rl.train import TrainConfig, build_expert, warm_start

    donor = _saved_donor(tmp_path, CFG)
    config = TrainConfig(model="unet", role="stm", target="residual", prediction="x0",
                         backbone_overrides=dict(CFG, window_recall=True))
    expert, _, _ = build_expert(config, 6, 32)
    assert "recall tensors initialised" in warm_start(expert, tmp_path)
    g = torch.Generator().manual_seed(5)
    frames, actions, x_t, t = _one_step_inputs(g)
    with torch.no_grad():
        want = donor.predict_eps(donor.prepare(frames, actions), x_t, t)
        got = expert.predict_eps(expert.prepare(frames, actions), x_t, t)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        expert.backbone.recall.conv.weight.normal_(std=0.05)  # a trained recall: an old frame now counts
        older = frames.clone()
        older[:, 0] = -older[:, 0]
        changed = expert.predict_eps(expert.prepare(older, actions), x_t, t)
    assert (changed - got).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="window_recall"):
        UNetConfig(**dict(CFG, context_frames=1, window_recall=True))


def test_the_recall_learns_which_frame_a_turn_that_comes_back_shows():
    """Frames hold their heading (left +1, right -1 a step); the next frame's view is that of the newest context frame
    with the target's heading. Trained on that, the recall's attention goes to that frame: its key (the actions since)
    is what tells, which a fixed weight per slot cannot."""
    k, b = 6, 512
    g = torch.Generator().manual_seed(0)
    turns = torch.randint(0, 2, (b, k + 1), generator=g)  # action 2: left, 3: right
    actions = torch.nn.functional.one_hot(turns + 2, 6).float()
    heading = torch.cumsum(torch.where(turns == 0, 1, -1), dim=1)  # heading after each action; frame j has heading[j]
    target = heading[:, -1]
    matches = heading[:, :k] == target[:, None]
    has = matches.any(1)
    newest = (k - 1) - matches.flip(1).float().argmax(1)
    frames = heading[:, :k, None, None, None].float().expand(b, k, 1, 2, 2) / 4  # a frame shows its heading
    torch.manual_seed(0)
    recall = WindowRecall(6, k, 4, 8, 2)
    optimizer = torch.optim.Adam(recall.parameters(), lr=1e-2)
    for _ in range(300):
        loss = (recall.frame(frames, actions)[has] - frames[has, :, :, :, :][torch.arange(int(has.sum())), newest[has]]
                ).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weights = recall.weights(actions)
    assert weights.shape == (b, k + 1) and torch.allclose(weights.sum(1), torch.ones(b))
    on_matching = (weights[:, :k] * matches).sum(1)[has].mean()
    assert on_matching > 0.8, f"attention on a frame of the target's heading: {on_matching:.2f}"


def test_a_recall_experts_loss_trains_its_keys_from_the_start():
    """The recall's input convolution starts at zero, so the diffusion loss alone gives its keys no gradient; its own
    loss (the recalled view against the next frame) does."""
    torch.manual_seed(0)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**dict(CFG, window_recall=True))), CosineSchedule(),
                             target="residual", prediction="x0")
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 9, 3, 32, 32, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 9), generator=g), 6).float()
    expert.loss(frames, actions, generator=g).backward()
    key_grad = sum(p.grad.abs().sum() for p in expert.backbone.recall.key.parameters())
    assert key_grad > 0


def test_the_recall_convolution_trains_at_its_own_rate_when_asked():
    from come_rl.train import TrainConfig, build_expert, parameter_groups

    backbone = build_expert(TrainConfig(model="unet", role="stm", backbone_overrides=dict(CFG, window_recall=True)),
                            6, 32)[0].backbone
    named = {id(p): name for name, p in backbone.named_parameters()}

    def groups(**overrides):
        found = parameter_groups(backbone, TrainConfig(lr=1e-4, **overrides))
        listed = [id(p) for group in found for p in group["params"]]
        assert sorted(listed) == sorted(named), "every parameter in exactly one group"
        return [(sorted(named[id(p)] for p in g["params"]), g.get("lr_scale", 1.0)) for g in found]

    plain = groups()  # recall_lr 0: the convolution trains with the network, the keys at recall_key_lr
    assert len(plain) == 2 and "recall.conv.weight" in plain[0][0]
    assert plain[1] == (["recall.key.0.bias", "recall.key.0.weight", "recall.key.2.bias", "recall.key.2.weight",
                         "recall.none_logit"], pytest.approx(100.0))
    own = groups(recall_lr=1e-3)
    assert own[2] == (["recall.conv.weight"], pytest.approx(10.0)) and "recall.conv.weight" not in own[0][0]
    # a network without a recall: one group whatever recall_lr says
    plain_net = build_expert(TrainConfig(model="unet", role="stm", backbone_overrides=CFG), 6, 32)[0].backbone
    assert len(parameter_groups(plain_net, TrainConfig(recall_lr=1e-3))) == 1


def test_told_stale_clips_say_how_many_newest_frames_lag():
    source = StaleRecentClips(_Source(), fraction=0.5, max_recent=3, max_stale=2, told=6)
    clips = source.sample_clips(64, 8, np.random.default_rng(1))  # 7 context frames (the first is dropped later)
    plain = _Source().sample_clips(64, 8, np.random.default_rng(1))
    changed = clips["frames"][:, :7, 0, 0, 0] != plain["frames"][:, :7, 0, 0, 0]
    stale = changed.sum(1)  # a stale suffix of r frames, each lagging its frame: r frames changed
    assert clips["staleness"].dtype == np.float32 and clips["staleness"].shape == (64,)
    assert np.allclose(clips["staleness"][stale > 0] * 6, stale[stale > 0])
    assert (clips["staleness"] > 0).sum() >= (stale > 0).sum() and 16 < (clips["staleness"] > 0).sum() < 48
    assert "staleness" not in StaleRecentClips(_Source(), 0.5, 3).sample_clips(4, 8, np.random.default_rng(1))
    with pytest.raises(ValueError, match="told"):
        StaleRecentClips(_Source(), fraction=0.5, max_recent=3, told=2)  # fewer levels than stale frames


def test_a_told_stm_starts_as_its_source_and_its_recall_learns_to_skip_stale_frames(tmp_path):
    """Built by stale_recent_told, an STM has a context level (its stale count / K) and a recall score for stale
    frames, both zero at a warm start (it predicts as its source at any level); trained on clips whose newest frames
    are stale copies, the recall's score for them goes down, so its attention moves to the true older frames."""
    from come_rl.train import TrainConfig, build_expert, warm_start

    overrides = dict(CFG, window_recall=True)
    donor = _saved_donor(tmp_path, overrides)
    config = TrainConfig(model="unet", role="stm", target="residual", prediction="x0", stale_recent_fraction=0.5,
                         stale_recent_told=True, backbone_overrides=overrides)
    expert, _, kwargs = build_expert(config, 6, 32)
    assert kwargs["staleness_levels"] == 8 and expert.backbone.recall.stale_logit is not None
    warm_start(expert, tmp_path)
    g = torch.Generator().manual_seed(5)
    frames, actions, x_t, t = _one_step_inputs(g)
    with torch.no_grad():
        want = donor.predict_eps(donor.prepare(frames, actions), x_t, t)
        for level in (0.0, 0.5):
            got = expert.predict_eps(expert.prepare(frames, actions, context_level=torch.full((2,), level)), x_t, t)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Clips of a scene that does not move: every true frame is the target; the newest r frames are noise (stale).
    recall = expert.backbone.recall
    optimizer = torch.optim.Adam([recall.stale_logit], lr=5e-2)
    clean = torch.rand(16, 1, 3, 32, 32, generator=g).expand(16, 10, 3, 32, 32).clone()
    still = torch.zeros(16, 10, 6)
    r = torch.randint(1, 5, (16,), generator=g)
    for row in range(16):
        clean[row, 9 - r[row]:9] = torch.rand(int(r[row]), 3, 32, 32, generator=g) * 2 - 1
    level = r.float() / 8

    def stale_share():
        with torch.no_grad():
            w = recall.weights(still[:, 1:], r)
        return torch.stack([w[i, 8 - int(r[i]):8].sum() for i in range(16)]).mean().item()

    before = stale_share()
    for _ in range(60):
        loss = expert.loss(clean[:, 1:], still[:, 1:], generator=g, context_level=level, context_eps=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert recall.stale_logit.item() < -0.5, recall.stale_logit.item()
    assert stale_share() < 0.5 * before, (stale_share(), before)
    with pytest.raises(ValueError, match="stale_recent_fraction"):
        build_expert(TrainConfig(model="unet", role="stm", stale_recent_told=True, backbone_overrides=overrides), 6, 32)
    with pytest.raises(ValueError, match="window recall"):
        build_expert(TrainConfig(model="unet", role="stm", stale_recent_fraction=0.5, stale_recent_told=True,
                                 backbone_overrides=CFG), 6, 32)
    with pytest.raises(ValueError, match="both use the context level"):
        build_expert(TrainConfig(model="unet", role="stm", stale_recent_fraction=0.5, stale_recent_told=True,
                                 context_noise=0.3, backbone_overrides=overrides), 6, 32)


def test_imagination_tells_a_told_stm_how_many_of_its_newest_frames_it_imagined():
    """A told STM (staleness_levels = its context length) is told min(h, K) / K at imagined step h: 0 on the real
    context, then the count of its own frames in the window."""
    from come_rl.diffusion import SamplerConfig
    from come_rl.interfaces import ActionSpec
    from come_rl.world_model import CompositionConfig, WorldModel

    tiny = dict(frame_size=32, unshuffle=4, action_dim=6, widths=[8, 16], cond_dim=16)
    stm = DiffusionExpert(VideoUNet(UNetConfig(**tiny, context_frames=4, window_recall=True, context_noise=True,
                                               staleness_levels=4)), CosineSchedule(), name="stm").eval()
    told = []
    prepare = stm.prepare

    def recording_prepare(*args, context_level=None, **kwargs):
        told.append(None if context_level is None else context_level.tolist())
        return prepare(*args, context_level=context_level, **kwargs)

    stm.prepare = recording_prepare
    base = DiffusionExpert(VideoUNet(UNetConfig(**tiny, context_frames=2)), CosineSchedule()).eval()
    wm = WorldModel(base, ActionSpec.discrete(6), 32, stm=stm, sampler=SamplerConfig(steps=1),
                    composition=CompositionConfig(experts=["base", "stm"], pairwise=True))
    wm.reset()
    for i in range(5):
        wm.observe(torch.full((3, 32, 32), 0.1 * i), None if i == 0 else ActionSpec.discrete(6).encode(1))
    wm.imagine(torch.as_tensor(ActionSpec.discrete(6).encode(1)).float()[None, None].expand(2, 6, 6), seed=0)
    assert [row[0] for row in told] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # one prepare per imagined frame
