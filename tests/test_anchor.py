"""Re-anchoring a rollout at revisits (CompositionConfig.anchor): a memorized frame replaces a drifted one."""

import dataclasses
import math

import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experts.expert import DiffusionExpert
from come_rl.interfaces import ActionSpec
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.world_model import CompositionConfig, WorldModel

TINY = dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[8, 16], cond_dim=16, pose_dim=0)
ACTION = torch.as_tensor(ActionSpec.discrete(6).encode(1), dtype=torch.float32)


def _base() -> DiffusionExpert:
    torch.manual_seed(0)
    base = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), target="full", prediction="x0").eval()
    torch.nn.init.normal_(base.backbone.out_conv.weight, std=0.05)
    return base


def _imagine(base, anchor: float, imagined_pose, memorized_value: float, horizon: int = 3, anchor_seed: float = 0.0,
             anchor_after: int = 0, anchor_skip_recent: int = 0):
    """Observe five frames; frame 0 (value ``memorized_value``) was seen at (5, 5, 0). Every imagined frame is posed at
    ``imagined_pose``."""
    pose = torch.tensor(imagined_pose, dtype=torch.float32)
    wm = WorldModel(base, ActionSpec.discrete(6), 64, composition=CompositionConfig(experts=["base"], anchor=anchor,
                                                                                   anchor_seed=anchor_seed,
                                                                                   anchor_after=anchor_after,
                                                                                   anchor_skip_recent=anchor_skip_recent),
                    sampler=SamplerConfig(steps=4), pose_model=lambda poses, actions: pose.expand(poses.shape[0], 3))
    wm.reset()
    poses = [[5.0, 5.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [3.0, 2.0, 0.0]]
    for i, p in enumerate(poses):
        value = memorized_value if i == 0 else 0.1 * i - 0.2
        wm.observe(torch.full((3, 64, 64), value), None if i == 0 else ACTION, p)
    frames = wm.imagine(ACTION[None, None].expand(2, horizon, 6), seed=0)
    return frames, wm.last_anchored.clone()


def test_a_revisit_puts_the_memorized_frame_into_the_context_of_the_next_steps():
    base = _base()
    plain, _ = _imagine(base, 0.0, [5.1, 5.0, 0.0], 0.5)
    anchored, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5)
    other_memory, _ = _imagine(base, 1.0, [5.1, 5.0, 0.0], -0.7)
    assert marks.shape == (2, 3) and bool(marks.all())  # 0.1 cell away: within 1.0 cell of (5, 5, 0)
    assert torch.equal(anchored[:, 0], plain[:, 0])  # the frame returned is the sampled one
    assert not torch.allclose(anchored[:, 1], plain[:, 1], atol=1e-4)  # the next step reads the memorized view
    assert not torch.allclose(anchored[:, 1], other_memory[:, 1], atol=1e-4)  # ... and what that view shows


def test_anchor_after_leaves_the_first_imagined_frames_as_sampled():
    base = _base()
    plain, _ = _imagine(base, 0.0, [5.1, 5.0, 0.0], 0.5, horizon=4)
    anchored, _ = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, horizon=4)
    late, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, horizon=4, anchor_after=2)
    assert marks.tolist() == [[False, False, True, True]] * 2  # frames 0 and 1 sampled, 2 and 3 re-anchored
    assert torch.equal(late[:, :3], plain[:, :3])  # frame 2 is the first whose context could hold a memorized view
    assert not torch.allclose(late[:, 3], plain[:, 3], atol=1e-4)  # frame 3 reads the memorized view ...
    assert not torch.allclose(late[:, 3], anchored[:, 3], atol=1e-4)  # ... once, where anchoring from 0 read it thrice
    never, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, horizon=4, anchor_after=4)
    assert not bool(marks.any()) and torch.equal(never, plain)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="anchor_after"):
            CompositionConfig(experts=["base"], anchor=0.3, anchor_after=bad)


def test_anchor_skip_recent_leaves_the_frames_just_seen_out_of_the_candidates():
    """The last observed frame (3, 2) is the nearest memorized pose to (3, 2.05); skipping it leaves nothing within the
    tolerance (frame 3 at (3, 1) is 1.05 cells off). The oldest frame (5, 5) stays a candidate while fewer than all five
    are skipped."""
    base = _base()
    _, marks = _imagine(base, 1.0, [3.0, 2.05, 0.0], 0.5)
    assert bool(marks.all())
    _, marks = _imagine(base, 1.0, [3.0, 2.05, 0.0], 0.5, anchor_skip_recent=1)
    assert not bool(marks.any())
    plain, _ = _imagine(base, 0.0, [5.1, 5.0, 0.0], 0.5)
    anchored, _ = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5)
    old, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, anchor_skip_recent=4)
    assert bool(marks.all()) and torch.equal(old, anchored)  # frame 0 is older than the 4 skipped
    none, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, anchor_skip_recent=5)
    assert not bool(marks.any()) and torch.equal(none, plain)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="anchor_skip_recent"):
            CompositionConfig(experts=["base"], anchor=0.3, anchor_skip_recent=bad)


def test_anchor_seed_samples_a_revisited_frame_from_the_memorized_view():
    """anchor_seed: the frame at a revisit is itself sampled from the memorized view (restarted at t0), so it moves
    toward what was seen there; far from every memorized pose nothing changes."""
    torch.manual_seed(0)  # a v-prediction expert with a zero output: eps = sigma_t x_t, the exact denoiser of N(0, I)
    base = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), target="full", prediction="v").eval()
    torch.nn.init.zeros_(base.backbone.out_conv.weight)
    torch.nn.init.zeros_(base.backbone.out_conv.bias)
    anchored, _ = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5)
    seeded, marks = _imagine(base, 1.0, [5.1, 5.0, 0.0], 0.5, anchor_seed=0.25)
    assert bool(marks.all())
    assert (seeded[:, 0] - 0.5).abs().mean() < 0.7 * (anchored[:, 0] - 0.5).abs().mean()
    far, _ = _imagine(base, 1.0, [8.0, 8.0, 0.0], 0.5)
    assert torch.equal(_imagine(base, 1.0, [8.0, 8.0, 0.0], 0.5, anchor_seed=0.5)[0], far)
    with pytest.raises(ValueError, match="anchor_seed"):
        CompositionConfig(experts=["base"], anchor_seed=0.5)  # no anchor
    with pytest.raises(ValueError, match="anchor_seed"):
        CompositionConfig(experts=["base"], anchor=0.3, anchor_seed=1.0)


def test_far_from_every_memorized_pose_nothing_is_anchored():
    base = _base()
    plain, _ = _imagine(base, 0.0, [8.0, 8.0, 0.0], 0.5)
    anchored, marks = _imagine(base, 1.0, [8.0, 8.0, 0.0], 0.5)
    assert not bool(marks.any())
    assert torch.equal(anchored, plain)
    tight, marks = _imagine(base, 0.05, [5.1, 5.0, 0.0], 0.5)  # 0.1 cell > 0.05: not close enough
    assert not bool(marks.any()) and torch.equal(tight, _imagine(base, 0.0, [5.1, 5.0, 0.0], 0.5)[0])
    turned, marks = _imagine(base, 1.0, [5.0, 5.0, 0.5], 0.5)  # 29 degrees > the default 15
    assert not bool(marks.any()) and torch.equal(turned, _imagine(base, 0.0, [5.0, 5.0, 0.5], 0.5)[0])


def test_without_a_pose_model_nothing_is_anchored_and_bad_tolerances_are_refused():
    base = _base()
    frames = {}
    for anchor in (0.0, 1.0):
        wm = WorldModel(base, ActionSpec.discrete(6), 64, composition=CompositionConfig(experts=["base"], anchor=anchor),
                        sampler=SamplerConfig(steps=2))
        wm.reset()
        for i in range(4):
            wm.observe(torch.full((3, 64, 64), 0.1 * i), None if i == 0 else ACTION, [0.0, 0.0, 0.0])
        frames[anchor] = wm.imagine(ACTION[None, None].expand(1, 2, 6), seed=0)
        assert not bool(wm.last_anchored.any())
    assert torch.equal(frames[0.0], frames[1.0])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="anchor must be"):
            CompositionConfig(experts=["base"], anchor=bad)
    with pytest.raises(ValueError, match="anchor_degrees"):
        CompositionConfig(experts=["base"], anchor=0.3, anchor_degrees=0.0)


def test_the_consistency_table_has_re_anchored_rows(tmp_path):
    """base_anchor re-anchors where the imagined poses come back near the memorized ones; base never does."""
    from come_rl.checkpoint import expert_spec
    from come_rl.experiments.consistency import ConsistencyConfig, run

    base = _base()
    base.spec = expert_spec(base, "unet", TINY, extra={"action_spec": {"kind": "discrete", "dim": 6}, "frame_size": 64})
    WorldModel(base, ActionSpec.discrete(6), 64, composition=CompositionConfig(experts=["base"]),
               sampler=SamplerConfig(steps=2)).save(tmp_path / "ckpt")
    config = ConsistencyConfig(checkpoint=str(tmp_path / "ckpt"), episodes=1, context=12, horizon=4, threads=1,
                               compositions="base,base_anchor", anchor=2.0, anchor_degrees=180.0, seed=40000,
                               out_dir=str(tmp_path / "out"), gif=False)
    by_name = {row["composition"]: row for row in run(config)}
    assert by_name["base"]["anchored_frames"] == 0
    assert by_name["base_anchor"]["anchored_frames"] == 4  # within 2 cells of the 12 observed poses, any heading
    assert by_name["base_anchor"]["lpips_all"] != by_name["base"]["lpips_all"]
    # the per-frame columns: which frames were re-anchored, which are revisits, and the imagined poses' error (the
    # recorded poses here: none)
    assert by_name["base"]["anchored_per_frame"] == "0 0 0 0"
    assert by_name["base_anchor"]["anchored_per_frame"] == "1 1 1 1"
    for row in by_name.values():
        assert sum(int(v) for v in row["revisit_per_frame"].split()) == row["revisit_frames"]
        assert [float(v) for v in row["pose_error_per_frame"].split()] == [0.0] * 4
    with pytest.raises(ValueError, match="anchor must be > 0"):
        run(dataclasses.replace(config, anchor=0.0))


def _observe_and_imagine(base, composition: CompositionConfig, memorized: list, imagined_pose, horizon: int = 2,
                         pose_model=None):
    """Observe ``memorized`` [(value, pose)] then three context frames far away (values -0.2..0, poses near (1, 1));
    every imagined frame is posed at ``imagined_pose`` unless a ``pose_model`` is given."""
    if pose_model is None:
        pose = torch.tensor(imagined_pose, dtype=torch.float32)

        def pose_model(poses, actions):
            return pose.expand(poses.shape[0], 3)
    wm = WorldModel(base, ActionSpec.discrete(6), 64, composition=composition, sampler=SamplerConfig(steps=4),
                    pose_model=pose_model)
    wm.reset()
    seen = [*memorized, *((0.1 * i - 0.2, [1.0 + i, 1.0, 0.0]) for i in range(3))]
    for i, (value, p) in enumerate(seen):
        wm.observe(torch.full((3, 64, 64), float(value)), None if i == 0 else ACTION, p)
    frames = wm.imagine(ACTION[None, None].expand(2, horizon, 6), seed=0)
    return frames, wm.last_anchored.clone(), wm.last_poses.clone()


def test_anchor_appearance_re_anchors_on_the_nearby_view_that_looks_like_the_sampled_frame():
    """Two views lie in the wider pose window and none within the pose tolerance: the one that looks like the sampled
    frame (grey, as this near-zero model samples) is chosen, not the bright one; a strict threshold chooses none."""
    base = _base()
    rule = dict(experts=["base"], anchor=0.1, anchor_search=1.0, anchor_search_degrees=45.0)
    pose = [5.25, 5.0, 0.0]
    plain, marks, _ = _observe_and_imagine(base, CompositionConfig(**rule), [(0.9, [5.0, 5.0, 0.0]),
                                                                             (0.0, [5.5, 5.0, 0.0])], pose)
    assert not bool(marks.any())  # 0.25 cell from each: outside the pose tolerance of 0.1
    both, marks, _ = _observe_and_imagine(base, CompositionConfig(**rule, anchor_appearance=10.0),
                                          [(0.9, [5.0, 5.0, 0.0]), (0.0, [5.5, 5.0, 0.0])], pose)
    assert bool(marks.all())
    grey_only, _, _ = _observe_and_imagine(base, CompositionConfig(**rule, anchor_appearance=10.0),
                                           [(0.9, [9.0, 9.0, 0.0]), (0.0, [5.5, 5.0, 0.0])], pose)
    bright_only, _, _ = _observe_and_imagine(base, CompositionConfig(**rule, anchor_appearance=10.0),
                                             [(0.9, [5.0, 5.0, 0.0]), (0.0, [9.5, 9.0, 0.0])], pose)
    assert torch.equal(both, grey_only)  # the grey view was chosen ...
    assert not torch.allclose(both[:, 1], bright_only[:, 1], atol=1e-4)  # ... which differs from the bright one
    assert not torch.allclose(both[:, 1], plain[:, 1], atol=1e-4)
    assert torch.equal(both[:, 0], plain[:, 0])  # the frame returned is the sampled one
    strict, marks, _ = _observe_and_imagine(base, CompositionConfig(**rule, anchor_appearance=1e-9),
                                            [(0.9, [5.0, 5.0, 0.0]), (0.0, [5.5, 5.0, 0.0])], pose)
    assert not bool(marks.any()) and torch.equal(strict, plain)
    narrow, marks, _ = _observe_and_imagine(base, CompositionConfig(**dict(rule, anchor_search=0.2),
                                                                    anchor_appearance=10.0),
                                            [(0.9, [5.0, 5.0, 0.0]), (0.0, [5.5, 5.0, 0.0])], pose)
    assert not bool(marks.any()) and torch.equal(narrow, plain)  # no view within 0.2 cell
    with pytest.raises(ValueError, match="anchor_appearance"):
        CompositionConfig(experts=["base"], anchor_appearance=0.1)  # no anchor
    with pytest.raises(ValueError, match="anchor_search"):
        CompositionConfig(experts=["base"], anchor=0.3, anchor_search=0.0)


def test_anchor_pose_puts_the_memorized_pose_into_the_pose_track():
    """A pose model that steps +0.2 in x from the last pose: after a re-anchored step, the next pose is stepped from
    the memorized pose (a loop closure) with anchor_pose, from the estimate without."""
    base = _base()
    step = torch.tensor([0.2, 0.0, 0.0])

    def stepper(poses, actions):
        return poses + step

    memorized = [(0.5, [3.3, 1.0, 0.0])]  # the last context pose is (3, 1, 0): the first imagined one is (3.2, 1, 0)
    rule = dict(experts=["base"], anchor=0.15)
    _, marks, estimate = _observe_and_imagine(base, CompositionConfig(**rule), memorized, None, pose_model=stepper)
    assert marks[:, 0].all() and torch.allclose(estimate[:, 1], torch.tensor([3.4, 1.0, 0.0]).expand(2, 3))
    _, marks, closed = _observe_and_imagine(base, CompositionConfig(**rule, anchor_pose=True), memorized, None,
                                            pose_model=stepper)
    assert marks[:, 0].all() and torch.allclose(closed[:, 1], torch.tensor([3.5, 1.0, 0.0]).expand(2, 3))
    assert torch.allclose(closed[:, 0], estimate[:, 0])  # the pose reported for the anchored frame is the estimate
    with pytest.raises(ValueError, match="anchor_pose"):
        CompositionConfig(experts=["base"], anchor_pose=True)


def test_the_loop_closure_moves_the_pose_track_rigidly():
    """_rigid_shift takes the estimate to the memorized pose and keeps every motion between the track's poses as the
    odometry read it (distance, turn, and the heading of each step relative to the pose it starts from)."""
    import math

    from come_rl.world_model import _rigid_shift

    track = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.3], [1.5, 0.4, 0.9]]])
    target = torch.tensor([[4.0, 2.0, -2.5]])
    moved = _rigid_shift(track, track[:, -1], target)
    assert torch.allclose(moved[:, -1], target, atol=1e-6)

    def body_motion(a, b):  # b relative to a, in a's frame
        dx, dy = b[0] - a[0], b[1] - a[1]
        c, s = math.cos(a[2]), math.sin(a[2])
        return torch.tensor([c * dx + s * dy, -s * dx + c * dy, b[2] - a[2]])

    for i in range(2):
        assert torch.allclose(body_motion(track[0, i], track[0, i + 1]), body_motion(moved[0, i], moved[0, i + 1]),
                              atol=1e-5)
    assert not torch.allclose(moved, track)


def test_a_re_anchored_view_is_turned_to_the_imagined_heading():
    """anchor_turn shifts the memorized view sideways by pixels-per-degree x the heading difference: turning left
    (counter-clockwise, positive) moves the content right; the uncovered columns repeat the edge; no turn, no change."""
    from come_rl.world_model import _turn_view

    view = torch.zeros(3, 1, 2, 8)
    view[..., 2] = 1.0  # a vertical stripe at column 2
    view[..., 0] = 0.5  # the left edge column
    seen_at = torch.zeros(3, 3)
    now = torch.tensor([[0.0, 0.0, math.radians(3.0)], [5.0, 5.0, 0.0], [0.0, 0.0, math.radians(-2.0)]])
    turned = _turn_view(view, seen_at, now, pixels_per_degree=1.0)
    assert turned[0, 0, 0].tolist() == [0.5, 0.5, 0.5, 0.5, 0, 1.0, 0, 0]  # 3 degrees left: 3 pixels right, edge kept
    assert torch.equal(turned[1], view[1])  # the same heading (position does not turn a view)
    assert turned[2, 0, 0].tolist() == [1.0, 0, 0, 0, 0, 0, 0, 0]  # 2 degrees right: 2 pixels left
    # across the +-180 degree seam the shortest turn is taken
    across = _turn_view(view[:1], torch.tensor([[0.0, 0.0, math.radians(179.0)]]),
                        torch.tensor([[0.0, 0.0, math.radians(-179.0)]]), pixels_per_degree=1.0)
    assert across[0, 0, 0].tolist() == [0.5, 0.5, 0.5, 0, 1.0, 0, 0, 0]
    with pytest.raises(ValueError, match="anchor_turn must be"):
        CompositionConfig(experts=["base"], anchor_turn=0.85)  # needs anchor > 0
    with pytest.raises(ValueError, match="anchor_turn must be"):
        CompositionConfig(experts=["base"], anchor=0.35, anchor_turn=-1.0)
