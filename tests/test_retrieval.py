"""The spatial expert that retrieves memorized frames by pose (come_rl.experts.retrieval)."""

import math

import numpy as np
import pytest
import torch

from come_rl.checkpoint import expert_spec, save_expert
from come_rl.data.episodes import Episode, EpisodeDataset
from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experts.expert import DiffusionExpert
from come_rl.experts.retrieval import RetrievalClips, nearest_pose_index, pose_distance
from come_rl.interfaces import ActionSpec
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.world_model import CompositionConfig, WorldModel

TINY = dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[8, 16], cond_dim=16, pose_dim=4)


def test_nearest_pose_weighs_half_a_cell_as_45_degrees_and_wraps_headings():
    memory = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, math.pi], [0.2, 0.0, 2 * math.pi - 0.05]])
    query = np.array([[0.9, 0.0, 0.1], [0.0, 0.1, -math.pi + 0.1], [0.1, 0.0, 0.0], [0.0, 0.0, math.pi / 2]])
    assert nearest_pose_index(memory, query).tolist() == [1, 2, 0, 0]
    # 0.5 cell counts as much as 45 degrees
    assert pose_distance(memory[:1], np.array([[0.5, 0.0, 0.0]]))[0, 0] == pytest.approx(1.0)
    assert pose_distance(memory[:1], np.array([[0.0, 0.0, -math.pi / 4]]))[0, 0] == pytest.approx(1.0)
    # torch in, torch out, the same numbers
    assert torch.equal(nearest_pose_index(torch.tensor(memory), torch.tensor(query)), torch.tensor([1, 2, 0, 0]))
    with pytest.raises(ValueError, match="at least one memorized frame"):
        nearest_pose_index(np.zeros((0, 3)), query)


class _Source:
    """A data set of one hand-made episode: frame i is filled with the value i, its pose walks along x and comes back."""

    def __init__(self):
        steps = 40
        xs = np.concatenate([np.arange(21), np.arange(19, -1, -1)]).astype(np.float32)
        poses = np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], axis=1)
        frames = np.broadcast_to(np.arange(steps + 1, dtype=np.uint8)[:, None, None, None], (steps + 1, 64, 64, 3))
        episode = Episode(frames=frames.copy(), actions=np.eye(6, dtype=np.float32)[np.zeros(steps, int)],
                          rewards=np.zeros(steps, np.float32), poses=poses, seed=0, index=0)
        self.action_spec = ActionSpec.discrete(6)
        self.dataset = EpisodeDataset.from_episodes([episode], self.action_spec)
        self.frame_size = 64

    def sample_clips(self, batch_size, length, rng):
        return self.dataset.sample_clips(batch_size, length, rng)


def test_training_clips_retrieve_the_nearest_pose_from_before_the_gap():
    source = RetrievalClips(_Source(), max_gap=3)
    clips = source.sample_clips(256, 5, np.random.default_rng(0))
    target_index = clips["start"] + 4
    retrieved_index = clips["frames"][:, 1, 0, 0, 0].astype(int)  # frame i holds the value i
    assert (clips["actions"][:, 0] == 0).all() and (clips["actions"][:, 1:].sum(-1) == 1).all()
    assert np.array_equal(clips["poses"][:, 1, 0], retrieved_index.astype(np.float32))  # its pose goes with it
    assert (retrieved_index <= target_index - 1).all()
    # On the way back (x falling) the frame of the way out at the target's own place is within reach: retrieved.
    back = target_index >= 26
    assert back.any()
    assert np.array_equal(clips["poses"][back, 1, 0], clips["poses"][back, -1, 0])
    assert (retrieved_index[back] < 21).all()
    # On the way out the nearest reachable frame is the last one before the gap, 1 to 3 frames back.
    out = target_index <= 20
    assert set((target_index - retrieved_index)[out].tolist()) == {1, 2, 3}
    # The same rng gives the same clips (a resumed training run samples what an uninterrupted one does).
    again = source.sample_clips(256, 5, np.random.default_rng(0))
    assert np.array_equal(again["frames"], clips["frames"])
    with pytest.raises(ValueError, match="poses"):
        RetrievalClips(object())


def test_stale_clips_show_past_frames_from_earlier_with_the_true_actions_and_poses():
    fresh = RetrievalClips(_Source(), max_gap=3).sample_clips(512, 6, np.random.default_rng(1))
    clips = RetrievalClips(_Source(), max_gap=3, stale_fraction=0.5, max_stale=4).sample_clips(
        512, 6, np.random.default_rng(1))
    past = clips["frames"][:, 2:5, 0, 0, 0].astype(int)  # slots 2..4 hold frames start + 2 .. start + 4, or earlier
    true_past = clips["start"][:, None] + np.arange(2, 5)
    shift = true_past - past
    assert (shift == shift[:, :1]).all()  # a consecutive run, shifted as a whole
    stale = shift[:, 0] > 0
    assert 0.4 < stale.mean() < 0.6 and set(shift[stale, 0].tolist()) <= {1, 2, 3, 4}
    assert shift[stale, 0].max() == 4 and (past >= 0).all()
    # Actions, poses, the target and the retrieved frame are a fresh clip's: only the past frames are stale.
    for key in ("actions", "poses", "start"):
        assert np.array_equal(clips[key], fresh[key])
    assert np.array_equal(clips["frames"][:, [0, 1, 5]], fresh["frames"][:, [0, 1, 5]])
    # What the expert is told: the lag over max_stale, 0 for fresh clips.
    assert np.allclose(clips["staleness"], shift[:, 0] / 4) and "staleness" not in fresh
    with pytest.raises(ValueError, match="stale_fraction"):
        RetrievalClips(_Source(), stale_fraction=1.5)


def test_imagination_tells_a_stale_trained_expert_how_many_frames_it_imagined():
    """A retrieving expert with staleness_levels is told h / levels at imagined step h (0 while its past frames are
    all real); the level changes what it predicts; an expert without the input is told nothing."""
    config = dict(TINY, context_frames=4, retrieval=True, context_noise=True, staleness_levels=4)
    sltm = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), name="sltm", uses_poses=True,
                           target="full", prediction="x0").eval()
    with torch.no_grad():  # every layer away from its (often zero) initialisation, so the level reaches the output
        for parameter in sltm.backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    told = []
    prepare = sltm.prepare

    def recording_prepare(*args, context_level=None, **kwargs):
        told.append(None if context_level is None else context_level.tolist())
        return prepare(*args, context_level=context_level, **kwargs)

    sltm.prepare = recording_prepare
    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()
    wm = WorldModel(base, ActionSpec.discrete(6), 64, sltm=sltm, sampler=SamplerConfig(steps=2),
                    composition=CompositionConfig(experts=["base", "sltm"], pairwise=True),
                    pose_model=lambda poses, actions: poses + 0.1)
    wm.reset()
    for i in range(5):
        wm.observe(torch.full((3, 64, 64), 0.1 * i), None if i == 0 else ActionSpec.discrete(6).encode(1), [i, 0.0, 0.0])
    actions = torch.as_tensor(ActionSpec.discrete(6).encode(1)).float()[None, None].expand(2, 6, 6)
    told_first = wm.imagine(actions, seed=0)
    assert [row[0] for row in told] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # conditional rows; min(h, 4) / 4
    with torch.no_grad():
        torch.nn.init.zeros_(sltm.backbone.context_level_embed.weight)
    told.clear()
    assert not torch.allclose(wm.imagine(actions, seed=0)[:, 1:], told_first[:, 1:], atol=1e-4)
    assert torch.allclose(wm.imagine(actions, seed=0)[:, :1], told_first[:, :1], atol=1e-6)  # level 0 at step 0
    with pytest.raises(ValueError, match="staleness_levels"):
        UNetConfig(**dict(TINY, context_frames=4, retrieval=True, staleness_levels=4))  # no level input


def test_training_on_stale_clips_builds_an_expert_told_the_staleness(tmp_path):
    from come_rl.train import TrainConfig, build_expert

    config = TrainConfig(model="unet", role="sltm", target="full", prediction="x0", pose_features=True,
                         retrieval_stale_fraction=0.5, backbone_overrides=dict(TINY, context_frames=4, retrieval=True))
    expert, _, kwargs = build_expert(config, 6, 64)
    assert expert.backbone.config.staleness_levels == 32 and expert.backbone.context_level_embed is not None
    frames, actions, poses = torch.rand(2, 5, 3, 64, 64) * 2 - 1, torch.zeros(2, 5, 6), torch.randn(2, 5, 4)
    loss = expert.loss(frames, actions, poses, context_level=torch.tensor([0.0, 0.5]), context_eps=None)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="does not retrieve"):
        build_expert(TrainConfig(model="unet", role="sltm", pose_features=True, retrieval_stale_fraction=0.5,
                                 backbone_overrides=dict(TINY, context_frames=4)), 6, 64)


def _retrieval_expert(seed=0, retrieval=True):
    torch.manual_seed(seed)
    config = dict(TINY, context_frames=4, retrieval=True) if retrieval else dict(TINY)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), name="sltm", uses_poses=True,
                             target="full", prediction="x0")
    for name in ("out_conv", "in_context", "pose_embed") + (("retrieval_pose_embed",) if retrieval else ()):
        torch.nn.init.normal_(getattr(expert.backbone, name).weight, std=0.1)
    expert.spec = expert_spec(expert, "unet", config, extra={"action_spec": {"kind": "discrete", "dim": 6},
                                                             "frame_size": 64, "role": "sltm"})
    return expert.eval()


def test_a_retrieval_unet_needs_poses_and_a_past_frame():
    with pytest.raises(ValueError, match="pose_features=true"):
        UNetConfig(**dict(TINY, pose_dim=0, retrieval=True))
    with pytest.raises(ValueError, match="context_frames >= 3"):
        UNetConfig(**dict(TINY, context_frames=2, warp_anchor=True, retrieval=True))


def test_warm_started_from_a_spatial_expert_it_begins_as_that_expert(tmp_path):
    from come_rl.train import TrainConfig, build_expert, warm_start

    source = _retrieval_expert(retrieval=False)
    save_expert(tmp_path, source, dict(source.spec, role="sltm"))
    config = TrainConfig(model="unet", role="sltm", target="full", prediction="x0", pose_features=True,
                         backbone_overrides=dict(TINY, context_frames=4, retrieval=True))
    expert, _, _ = build_expert(config, 6, 64)
    assert "retrieval_pose_embed.weight" in warm_start(expert, tmp_path / "sltm")
    frames, actions, poses = torch.rand(2, 4, 3, 64, 64) * 2 - 1, torch.zeros(2, 5, 6), torch.randn(2, 5, 4)
    actions[..., 1] = 1
    x, t = torch.randn(2, 3, 64, 64), torch.full((2,), 0.6)
    with torch.no_grad():
        mine = expert.predict_eps(expert.prepare(frames, actions, poses), x, t)
        theirs = source.predict_eps(source.prepare(frames[:, 1:], actions[:, 1:], poses[:, 1:]), x, t)
    assert torch.allclose(mine, theirs, atol=1e-6)


def test_imagination_reads_the_memorized_frame_nearest_the_imagined_pose():
    """Changing the memorized frame seen at the imagined pose changes what is imagined; changing one seen elsewhere
    (and outside the temporal context) does not."""
    sltm = _retrieval_expert()
    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()
    rule = CompositionConfig(experts=["base", "sltm"], pairwise=True)
    target_pose = torch.tensor([5.0, 5.0, 0.0])

    def imagine(memorized_at_target: float, memorized_elsewhere: float) -> torch.Tensor:
        wm = WorldModel(base, ActionSpec.discrete(6), 64, sltm=sltm, composition=rule, sampler=SamplerConfig(steps=2),
                        pose_model=lambda poses, actions: target_pose.expand(poses.shape[0], 3).clone())
        wm.reset()
        values = [memorized_at_target, memorized_elsewhere, 0.1, 0.2, 0.3, 0.4]
        poses = [[5.0, 5.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [3.0, 2.0, 0.0], [3.0, 3.0, 0.0]]
        for i, (value, pose) in enumerate(zip(values, poses)):
            wm.observe(torch.full((3, 64, 64), value), None if i == 0 else ActionSpec.discrete(6).encode(1), pose)
        return wm.imagine(ActionSpec.discrete(6).encode(1)[None, None], seed=0)

    reference = imagine(0.5, -0.5)
    # a past handed in (history=) without an episode memory gives the expert nothing to retrieve: a clear error
    empty = WorldModel(base, ActionSpec.discrete(6), 64, sltm=sltm, composition=rule, sampler=SamplerConfig(steps=2),
                       pose_model=lambda poses, actions: target_pose.expand(poses.shape[0], 3).clone())
    history = (torch.zeros(1, 4, 3, 64, 64), torch.zeros(1, 4, 6), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="retrieves memorized frames by pose"):
        empty.imagine(ActionSpec.discrete(6).encode(1)[None, None], history=history)
    assert torch.equal(imagine(0.5, 0.9), reference)
    assert not torch.allclose(imagine(-0.9, -0.5), reference, atol=1e-4)


def test_a_retrieval_sltm_refuses_to_memorize_adapters():
    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()
    with pytest.raises(ValueError, match="sltm_memorizes=false"):
        WorldModel(base, ActionSpec.discrete(6), 64, sltm=_retrieval_expert(),
                   composition=CompositionConfig(experts=["base", "sltm"], sltm_memorizes=True))


def test_the_consistency_table_runs_a_retrieval_sltm_and_the_nearest_view_row(tmp_path):
    from come_rl.experiments.consistency import ConsistencyConfig, run

    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()
    torch.nn.init.normal_(base.backbone.out_conv.weight, std=0.02)
    base.spec = expert_spec(base, "unet", dict(TINY, pose_dim=0), extra={
        "action_spec": {"kind": "discrete", "dim": 6}, "frame_size": 64})
    wm = WorldModel(base, ActionSpec.discrete(6), 64, sltm=_retrieval_expert(),
                    composition=CompositionConfig(experts=["base"], pairwise=True), sampler=SamplerConfig(steps=2))
    wm.save(tmp_path / "ckpt")
    rows = run(ConsistencyConfig(checkpoint=str(tmp_path / "ckpt"), episodes=1, context=12, horizon=3, threads=1,
                                 compositions="copy_last,nearest_view,base,sltm", out_dir=str(tmp_path / "out"),
                                 seed=40000, gif=False))
    by_name = {row["composition"]: row for row in rows}
    assert list(by_name) == ["copy_last", "nearest_view", "base", "sltm"]
    assert by_name["sltm"]["lpips_all"] != by_name["base"]["lpips_all"]
    assert by_name["sltm"]["memorize_seconds"] == 0.0  # its memory is the frames: nothing to fine-tune
    assert 0 <= by_name["nearest_view"]["lpips_all"] <= 1.5


def test_the_shipped_maze_checkpoint_composes_all_four_experts_with_the_retrieving_sltm():
    """The packaged Memory Maze model: its SLTM retrieves (and so does not memorize adapters), every expert loads,
    and CoME imagines a frame that depends on the memorized view at the imagined pose (frame 0: outside every
    expert's past frames, reached only by retrieval)."""
    rule = {"experts": ["base", "ltm", "stm", "sltm"]}
    wm = WorldModel.load("memory_maze", composition=rule, sampler={"steps": 2}, device="cpu", precision="fp32")
    assert wm.sltm.retrieval and not wm.composition.sltm_memorizes
    assert wm.stm.context_frames == 16 and wm.sltm.context_frames == 4
    target_pose = torch.tensor([4.0, 4.0, 0.5])
    wm.pose_model = lambda poses, actions: target_pose.expand(poses.shape[0], 3).clone()
    generator = torch.Generator().manual_seed(0)

    def imagine(view_at_target: torch.Tensor) -> torch.Tensor:
        wm.reset()
        frames = torch.rand(20, 3, 64, 64, generator=generator) * 2 - 1
        frames[0] = view_at_target
        for i in range(20):
            pose = target_pose.tolist() if i == 0 else [1.0 + 0.1 * i, 1.0, 0.0]
            wm.observe(frames[i], None if i == 0 else ActionSpec.discrete(6).encode(1), pose)
        return wm.imagine(ActionSpec.discrete(6).encode(1)[None, None], seed=0)

    first = imagine(torch.full((3, 64, 64), 0.8))
    assert first.shape == (1, 1, 3, 64, 64) and torch.isfinite(first).all()
    generator.manual_seed(0)
    assert not torch.allclose(imagine(torch.full((3, 64, 64), -0.8)), first, atol=1e-3)


def test_a_blind_retrieving_expert_sees_only_the_retrieved_view():
    """Training clips of a blind expert show the retrieved view (and its pose) in every context slot; imagining with
    it depends on the memorized view at the imagined pose, not on the past frames."""
    clips = RetrievalClips(_Source(), max_gap=3, blind=True).sample_clips(64, 6, np.random.default_rng(2))
    assert (clips["frames"][:, 2:5] == clips["frames"][:, 1:2]).all()
    assert (clips["poses"][:, 2:5] == clips["poses"][:, 1:2]).all()
    config = dict(TINY, context_frames=4, retrieval=True, retrieval_blind=True)
    torch.manual_seed(0)
    sltm = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), name="sltm", uses_poses=True,
                           target="full", prediction="x0").eval()
    with torch.no_grad():
        for parameter in sltm.backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()

    def imagine(at_target: float, past: float) -> torch.Tensor:
        wm = WorldModel(base, ActionSpec.discrete(6), 64, sltm=sltm, sampler=SamplerConfig(steps=2),
                        composition=CompositionConfig(experts=["base", "sltm"], pairwise=True),
                        pose_model=lambda poses, actions: torch.tensor([[5.0, 5.0, 0.0]]).expand(poses.shape[0], 3))
        wm.reset()
        poses = [[5.0, 5.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [3.0, 2.0, 0.0]]
        for i, pose in enumerate(poses):
            wm.observe(torch.full((3, 64, 64), at_target if i == 0 else past + 0.01 * i),
                       None if i == 0 else ActionSpec.discrete(6).encode(1), pose)
        return wm.imagine(ActionSpec.discrete(6).encode(1)[None, None], seed=0)

    assert torch.allclose(imagine(0.5, -0.5), imagine(0.5, 0.3), atol=1e-6)  # the past frames are not read
    assert not torch.allclose(imagine(0.5, -0.5), imagine(-0.5, -0.5), atol=1e-4)
    with pytest.raises(ValueError, match="retrieval_blind"):
        UNetConfig(**dict(TINY, retrieval_blind=True))


def test_the_retrieval_gate_silences_the_expert_where_its_view_was_seen_far_away():
    """retrieval_gate={"sltm": d}: a sample whose retrieved view lies within d of the imagined pose composes as without
    the gate; one whose view lies farther composes as the base alone (pairwise: the share goes back to the base)."""
    sltm = _retrieval_expert()
    base = DiffusionExpert(VideoUNet(UNetConfig(**dict(TINY, pose_dim=0))), CosineSchedule(), target="full",
                           prediction="x0").eval()
    torch.nn.init.normal_(base.backbone.out_conv.weight, std=0.05)

    def imagine(experts, gate, first_pose):
        rule = CompositionConfig(experts=experts, pairwise=True, weights={"base": 1.0, "sltm": 3.0},
                                 retrieval_gate={} if gate is None else {"sltm": gate})
        wm = WorldModel(base, ActionSpec.discrete(6), 64, sltm=sltm, composition=rule, sampler=SamplerConfig(steps=2),
                        pose_model=lambda poses, actions: torch.tensor([[5.0, 5.0, 0.0]]).expand(poses.shape[0], 3))
        wm.reset()
        poses = [first_pose, [1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [3.0, 2.0, 0.0]]
        for i, pose in enumerate(poses):
            wm.observe(torch.full((3, 64, 64), 0.1 * i - 0.2), None if i == 0 else ActionSpec.discrete(6).encode(1), pose)
        return wm.imagine(ActionSpec.discrete(6).encode(1)[None, None], seed=0)

    seen_here, seen_far = [5.0, 5.0, 0.0], [5.0, 1.0, 0.0]
    assert torch.allclose(imagine(["base", "sltm"], 0.5, seen_here), imagine(["base", "sltm"], None, seen_here), atol=1e-6)
    assert torch.allclose(imagine(["base", "sltm"], 0.5, seen_far), imagine(["base"], None, seen_far), atol=1e-5)
    assert not torch.allclose(imagine(["base", "sltm"], None, seen_far), imagine(["base"], None, seen_far), atol=1e-4)
    with pytest.raises(ValueError, match="retrieval_gate"):
        CompositionConfig(experts=["base", "sltm"], retrieval_gate={"base": 1.0})
