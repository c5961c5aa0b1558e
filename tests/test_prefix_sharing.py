"""Shared action prefixes (``WorldModel.imagine(streams=, lengths=)``): candidates that begin alike are imagined once
per noise stream until they part, a row stops at its length, and the planners' objectives and the find-the-object
agent use it without changing what they decide on."""

import numpy as np
import pytest
import torch

from come_rl.diffusion import CosineSchedule, SamplerConfig
from come_rl.experts.expert import DiffusionExpert
from come_rl.interfaces import ActionSpec
from come_rl.nets.unet import UNetConfig, VideoUNet
from come_rl.world_model import CompositionConfig, WorldModel
from planners.base import score_candidates
from planners.objectives import LPIPSGoalObjective, PixelGoalObjective, imagine_candidates

TINY = dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[8, 16], cond_dim=16, pose_dim=0)
STEP = torch.tensor([[0.2, 0.0, 0.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, -0.3], [0.0, 0.2, 0.0],
                     [0.0, -0.2, 0.0]])


def _pose_model(poses, actions):
    return poses + STEP[actions.argmax(-1)]


def _model(anchor: float = 0.0) -> WorldModel:
    torch.manual_seed(0)
    base = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), target="full", prediction="x0").eval()
    torch.nn.init.normal_(base.backbone.out_conv.weight, std=0.05)
    wm = WorldModel(base, ActionSpec.discrete(6), 64, composition=CompositionConfig(experts=["base"], anchor=anchor),
                    sampler=SamplerConfig(steps=2), pose_model=_pose_model)
    wm.reset()
    for i in range(5):  # a walk east whose first place the rollouts come back to
        wm.observe(torch.full((3, 64, 64), 0.1 * i - 0.2), None if i == 0 else _one_hot([0])[0], [1.0 + 0.2 * i, 1.0, 0.0])
    return wm


def _one_hot(indices) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(indices), 6).float()


def _rows_per_call(wm: WorldModel) -> list[int]:
    """Record the batch of every network call of the base."""
    sizes: list[int] = []
    predict = wm.base.predict_eps

    def counted(prepared, x_t, *args, **kwargs):
        sizes.append(int(x_t.shape[0]))
        return predict(prepared, x_t, *args, **kwargs)

    wm.base.predict_eps = counted
    return sizes


# rows 1 and 0 are one candidate; row 2 shares row 0's first two actions; rows 3 and 5 are one candidate
ROWS = _one_hot([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 4, 4], [1, 1, 1, 1], [2, 0, 0, 0], [1, 1, 1, 1]])


def test_rows_that_begin_alike_share_one_sample_until_they_part():
    wm = _model(anchor=0.3)
    sizes = _rows_per_call(wm)
    frames = wm.imagine(ROWS, seed=1, streams=[0] * 6)
    poses, anchored = wm.last_poses.clone(), wm.last_anchored.clone()
    assert torch.equal(frames[0], frames[1]) and torch.equal(frames[3], frames[5])
    assert torch.equal(frames[0, :2], frames[2, :2]) and not torch.allclose(frames[0, 2], frames[2, 2], atol=1e-4)
    assert torch.equal(poses[0], poses[1]) and not torch.equal(poses[0, 2], poses[2, 2])
    assert anchored.shape == (6, 4) and bool(anchored.any())  # rows that walk back west come to the memorized start
    # distinct prefixes per step: {0, 1, 2}; {01, 11, 20}; {012, 014, 111, 200}; {0123, 0144, 1111, 2000}
    assert sizes == [3, 3, 3, 3, 4, 4, 4, 4]  # 2 denoising steps each; without streams every step runs 6 rows
    sizes.clear()
    wm.imagine(ROWS, seed=1)
    assert sizes == [6] * 8


def test_the_shared_batch_is_the_distinct_candidates_imagined_alone():
    wm = _model()
    frames = wm.imagine(ROWS, seed=1, streams=[0] * 6)
    distinct = wm.imagine(ROWS[[0, 2, 3, 4]], seed=1, streams=[0] * 4)
    assert torch.equal(frames, distinct[[0, 0, 1, 2, 3, 2]])


def test_without_a_shared_prefix_the_rows_draw_the_noise_of_a_plain_call():
    wm = _model(anchor=0.3)
    rows = _one_hot([[0, 1, 2], [1, 1, 1], [2, 3, 0], [5, 0, 0]])
    plain = wm.imagine(rows, seed=4)
    plain_poses, plain_anchored = wm.last_poses.clone(), wm.last_anchored.clone()
    for kwargs in ({"streams": [0, 0, 0, 0]}, {"lengths": [3, 3, 3, 3]}, {"streams": [7, 7, 2, 2], "lengths": [3] * 4}):
        assert torch.equal(wm.imagine(rows, seed=4, **kwargs), plain), kwargs
        assert torch.equal(wm.last_poses, plain_poses) and torch.equal(wm.last_anchored, plain_anchored)


def test_streams_keep_repeated_rows_independent_samples():
    wm = _model()
    frames = wm.imagine(ROWS[[0, 0, 0]], seed=2, streams=[0, 1, 0])
    assert torch.equal(frames[0], frames[2]) and not torch.allclose(frames[0, 0], frames[1, 0], atol=1e-4)


def test_a_row_stops_at_its_length_and_holds_its_last_frame():
    wm = _model()
    sizes = _rows_per_call(wm)
    frames = wm.imagine(ROWS, seed=3, streams=[0] * 6, lengths=[1, 4, 2, 4, 1, 4])
    poses = wm.last_poses
    assert frames.shape == (6, 4, 3, 64, 64)
    assert all(torch.equal(frames[0, h], frames[0, 0]) for h in range(4))
    assert torch.equal(frames[2, 2], frames[2, 1]) and torch.equal(frames[2, 3], frames[2, 1])
    assert torch.equal(poses[4, 3], poses[4, 0]) and not torch.equal(poses[1, 3], poses[1, 0])
    assert torch.equal(frames[0, 0], frames[1, 0])  # row 0 is row 1's prefix: the same sample while both run
    # step 0: {0, 1, 2}; step 1: {01, 11}; steps 2-3: {012, 111}
    assert sizes == [3, 3, 2, 2, 2, 2, 2, 2]
    sizes.clear()
    wm.imagine(ROWS[:2], seed=3, lengths=[1, 1])  # nobody runs past step 0: no network call after it
    assert sizes == [2, 2]


def test_bad_streams_and_lengths_are_refused_before_any_work():
    wm = _model()
    for kwargs, message in (({"streams": [0, 0]}, "streams must have shape \\(6,\\)"),
                            ({"streams": [0.5] * 6}, "streams must be integers"),
                            ({"lengths": [0] * 6}, "lengths must lie in \\[1, 4\\]"),
                            ({"lengths": [5] * 6}, "lengths must lie in \\[1, 4\\]"),
                            ({"streams": [True] * 6}, "streams must be integers")):
        with pytest.raises(ValueError, match=message):
            wm.imagine(ROWS, seed=0, **kwargs)
    frames, actions, poses = wm.memory.last(3)
    history = (frames[None].expand(6, -1, -1, -1, -1), actions[None].expand(6, -1, -1), poses[None].expand(6, -1, -1))
    with pytest.raises(ValueError, match="with per-row history pass streams=None"):
        wm.imagine(ROWS, seed=0, history=history, streams=[0] * 6)
    assert wm.imagine(ROWS, seed=0, history=history, lengths=[2] * 6).shape == (6, 4, 3, 64, 64)


def test_objectives_share_prefixes_per_repeat_and_refuse_the_planners_repeats():
    wm = _model()
    goal = torch.zeros(3, 64, 64)
    sizes = _rows_per_call(wm)
    frames = imagine_candidates(wm, ROWS, torch.Generator().manual_seed(0), share_prefixes=True, repeats=2)
    assert frames.shape == (12, 4, 3, 64, 64)
    assert torch.equal(frames[0], frames[1]) and torch.equal(frames[6], frames[7])  # within a repeat: one sample
    assert not torch.allclose(frames[0, 0], frames[6, 0], atol=1e-4)  # the two repeats: independent samples
    assert sizes[:2] == [6, 6]  # 3 distinct first actions x 2 repeats
    shared = LPIPSGoalObjective(wm, goal, lpips=lambda a, b: (a - b).pow(2).flatten(1).mean(1), share_prefixes=True,
                                generator=torch.Generator().manual_seed(0))
    scores = shared(ROWS)
    assert scores[0] == scores[1] and scores[3] == scores[5] and scores[0] != scores[2]
    with pytest.raises(ValueError, match="set the objective's repeats instead, or the objective's share_prefixes=false"):
        score_candidates(shared, ROWS, repeats=2)
    with pytest.raises(ValueError, match="share_prefixes must be true or false"):
        PixelGoalObjective(wm, goal, share_prefixes="yes")


def test_the_find_agent_imagines_each_walk_prefix_once_per_sample():
    """The walks to the 16 tiles (rows first) form a tree: with shared prefixes and lengths the agent's decision
    needs far fewer network rows, and every tile still gets its own uncovered frames, sample by sample."""
    from agents.find_object import WorldModelFindAgent
    from envs.memory_cards import cursor_pose_model
    from envs.memory_cards_find import MemoryCardsFindEnv

    torch.manual_seed(0)
    config = dict(TINY, frame_size=48, unshuffle=4, action_dim=5)
    base = DiffusionExpert(VideoUNet(UNetConfig(**config)), CosineSchedule(), target="full", prediction="x0").eval()
    env = MemoryCardsFindEnv()
    _, info = env.reset(seed=7)
    rows = {}
    for share in (False, True):
        wm = WorldModel(base, env.action_spec, 48, composition=CompositionConfig(experts=["base"]),
                        sampler=SamplerConfig(steps=1), pose_model=cursor_pose_model)
        agent = WorldModelFindAgent(wm, memorize_steps=0, samples=2, share_prefixes=share)
        agent.watch(env, info)
        sizes = _rows_per_call(wm)
        distances, frames, paths = agent.tile_distances(env, np.zeros((12, 12, 3), np.uint8))
        rows[share] = sum(sizes)
        assert distances.shape == (16, 2) and frames.shape[:2] == (16, 2) and np.isfinite(distances).all()
        if share:
            assert not np.array_equal(frames[:, 0], frames[:, 1])  # the two samples stay independent
    horizon = max(len(p) for p in paths)
    assert rows[False] == 32 * horizon
    with pytest.raises(ValueError, match="share_prefixes must be true or false"):
        WorldModelFindAgent(wm, samples=2, share_prefixes="yes")
    assert rows[True] < 0.6 * rows[False]


class _FramePoseModel:
    """A pose model that reads the frame the action is taken from (as the odometry head does)."""

    reads_context = True

    def __call__(self, poses, actions, previous=None, frame=None):
        return poses + STEP[actions.argmax(-1)] * (1.0 + frame.float().mean(dim=(1, 2, 3)))[:, None]


# (imagine's keywords, the rows its last step runs)
@pytest.mark.parametrize("kwargs,last_step_rows", [({}, 6), ({"streams": [0] * 6}, 4),
                                                   ({"streams": [0] * 6, "lengths": [1, 4, 2, 4, 1, 4]}, 2)],
                         ids=["plain", "streams", "lengths"])
def test_the_last_step_is_posed_without_sampling_its_frame(kwargs, last_step_rows):
    """``imagine(last_frame=False)``: the other frames, every pose (the last read from the frame before it) and the
    generator's state are a full call's; the last step costs no network row."""
    wm = _model(anchor=0.3)
    wm.pose_model = _FramePoseModel()
    wm.sampler = SamplerConfig(steps=2, eta=1.0)  # noise drawn at every step, not only the first
    sizes = _rows_per_call(wm)
    full_generator, short_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = wm.imagine(ROWS, generator=full_generator, **kwargs)
    full_poses, full_rows = wm.last_poses.clone(), sum(sizes)
    sizes.clear()
    short = wm.imagine(ROWS, generator=short_generator, last_frame=False, **kwargs)
    assert short.shape == (6, 3, 3, 64, 64) and torch.equal(short, full[:, :3])
    assert torch.equal(wm.last_poses, full_poses) and not torch.equal(full_poses[:, 3], full_poses[:, 2])
    assert torch.equal(torch.randn(8, generator=full_generator), torch.randn(8, generator=short_generator))
    assert sum(sizes) == full_rows - 2 * last_step_rows  # 2 denoising steps of the last step's rows saved


def test_a_horizon_of_one_without_its_frame_runs_no_network_and_bad_values_are_refused():
    wm = _model()
    sizes = _rows_per_call(wm)
    frames = wm.imagine(ROWS[:, :1], seed=0, last_frame=False)
    assert frames.shape == (6, 0, 3, 64, 64) and wm.last_poses.shape == (6, 1, 3) and sizes == []
    with pytest.raises(ValueError, match="last_frame must be true or false"):
        wm.imagine(ROWS, seed=0, last_frame="no")


def test_the_place_objective_without_lpips_poses_the_last_step_without_its_frame():
    """A PathObjective that reads only final poses (lpips_weight 0) scores exactly as with the last frame sampled,
    with the last step's network rows saved; with the LPIPS term it samples that frame."""
    from planners.objectives import PathObjective

    path = np.array([[1.0 + 0.2 * i, 1.0, 0.0] for i in range(5)] + [[2.0, 1.2, 0.0], [2.0, 1.4, 0.0]])
    scores, rows = {}, {}
    for skips in (False, True):
        wm = _model()
        wm.skips_last_frame = skips
        sizes = _rows_per_call(wm)
        objective = PathObjective(wm, torch.zeros(3, 64, 64), path, scoring="graph", turn_weight=0.6,
                                  share_prefixes=True, generator=torch.Generator().manual_seed(2))
        scores[skips], rows[skips] = objective(ROWS), sum(sizes)
    assert torch.equal(scores[True], scores[False]) and len(set(scores[True].tolist())) > 2
    assert rows[True] == rows[False] - 2 * 4  # the 4 distinct 4-step candidates x 2 denoising steps
    wm = _model()
    sizes = _rows_per_call(wm)
    PathObjective(wm, torch.zeros(3, 64, 64), path, lpips_weight=1.0, share_prefixes=True)(ROWS)
    assert sum(sizes) == rows[False]  # the LPIPS term reads the last frame: it is sampled
