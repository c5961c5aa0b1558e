"""The training command: real steps, atomic checkpoints, resume after a stop, clear errors."""

import json

import numpy as np
import pytest

from come_rl.nets.registry import MODEL_PRESETS, PAPER_PRESETS
from come_rl.train import TrainConfig, parse_overrides, train

TINY = '{"widths": [16, 32, 32], "cond_dim": 32}'


def test_train_writes_checkpoints_and_resumes(tmp_path, capsys):
    args = ["model=unet_cards", f"out={tmp_path}", "threads=1", "batch_size=4", "online_episodes=16",
            f"backbone_overrides={TINY}", "log_every=1"]
    train(parse_overrides([*args, "steps=3"]))
    spec = json.loads((tmp_path / "base.json").read_text())
    assert spec["step"] == 3 and spec["role"] == "base" and spec["backbone"] == "unet"
    assert (tmp_path / "rollout_real_vs_imagined.gif").stat().st_size > 0
    train(parse_overrides([*args, "steps=5"]))  # a second run continues where the first stopped
    assert "resumed base from step 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "base.json").read_text())["step"] == 5
    assert not list(tmp_path.glob("*.tmp"))
    # TensorBoard: the loss of every logged step once (the resumed run continues the curve), and the sample frames.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "base"), size_guidance={"images": 0}).Reload()
    losses = events.Scalars("base/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5] and all(e.value > 0 for e in losses)
    csv_losses = [float(line.split(",")[2]) for line in (tmp_path / "train_log.csv").read_text().splitlines()[1:]]
    assert [e.value for e in losses] == pytest.approx(csv_losses, rel=1e-5)
    assert events.Images("samples/real_top_imagined_bottom")


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown key"):
        parse_overrides(["lerning_rate=1"])
    with pytest.raises(SystemExit, match="bad value for steps"):
        parse_overrides(["steps=many"])
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="unknown online data source online:dmlab"):
        train(TrainConfig(data="online:dmlab", out=str(tmp_path / "o")))


def test_an_stm_trains_beside_the_base_and_evaluates_alone(tmp_path):
    import csv

    from come_rl.evaluate import EvaluateConfig, evaluate

    common = ["data=online:memory_cards", f"out={tmp_path}", "threads=1", "batch_size=4", "online_episodes=16", "steps=2"]
    train(parse_overrides(["model=unet_cards", *common, f"backbone_overrides={TINY}"]))
    stm_tiny = '{"hidden_size": 32, "depth": 2, "num_heads": 2, "context_frames": 4, "window_frames": 2}'
    train(parse_overrides(["model=stm_cards", "role=stm", *common, f"backbone_overrides={stm_tiny}"]))
    assert json.loads((tmp_path / "stm.json").read_text())["role"] == "stm"
    rows = evaluate(EvaluateConfig(checkpoint=str(tmp_path), expert="stm", clips=8, batch_size=8, sampler_steps=2,
                                   threads=1, out_dir=str(tmp_path / "eval")))
    overall = next(r for r in rows if r["kind"] == "all")
    assert overall["expert"] == "stm" and overall["clips"] == 8
    # copy-last-frame is scored on the same clips: moves change the frame, so its error is positive and finite
    assert 0 < overall["mse_copy_last"] < 1 and overall["mse_model"] > 0
    assert overall["mse_ratio_low"] <= overall["mse_ratio_copy_over_model"] <= overall["mse_ratio_high"]
    with open(tmp_path / "eval" / f"{tmp_path.name}_stm_one_step.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with pytest.raises(ValueError, match="expert must be"):
        evaluate(EvaluateConfig(checkpoint=str(tmp_path), expert="ltm"))
    for episodes, data in ((-1, "online:memory_cards"), (4, str(tmp_path))):
        with pytest.raises(ValueError, match="episodes= counts the online episodes"):
            evaluate(EvaluateConfig(checkpoint=str(tmp_path), data=data, episodes=episodes))


def test_the_mse_ratio_interval_resamples_clips_together():
    from come_rl.evaluate import ratio_interval

    rng = np.random.default_rng(3)
    copy = rng.uniform(0.02, 0.06, 400)
    model = copy / 4 * rng.uniform(0.5, 1.5, 400)  # about 4x below copy-last, clip by clip
    low, high = ratio_interval(copy, model)
    assert low < copy.mean() / model.mean() < high and 3.4 < low and high < 4.6
    few_low, few_high = ratio_interval(copy[:25], model[:25])
    assert few_high - few_low > high - low  # fewer clips, a wider interval
    assert ratio_interval(copy, model) == (low, high) and np.isnan(ratio_interval(copy[:1], model[:1])[0])


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_size_presets_take_one_training_step(preset):
    """The paper's expert sizes build through the train command's own path and take one optimizer step on the CPU,
    on one clip at the smallest frame size the preset allows (one patch per frame; one U-Net bottleneck cell)."""
    import numpy as np
    import torch

    from come_rl.nets.registry import DIT_CONFIGS
    from come_rl.train import DistributedContext, build_expert, draw_training_noise, training_step

    name, kwargs = MODEL_PRESETS[preset]
    if name == "unet":
        size = kwargs["unshuffle"] * 2 ** (len(kwargs["widths"]) - 1)
        poses = False
    else:
        size, poses = kwargs.get("patch_size", DIT_CONFIGS[name].patch_size), DIT_CONFIGS[name].pose_dim > 0
    config = TrainConfig(model=preset, role="sltm" if poses else "base", pose_features=poses, batch_size=1,
                         backbone_overrides={"frame_size": size})
    torch.manual_seed(0)
    expert, backbone_name, built = build_expert(config, kwargs["action_dim"], size)
    assert backbone_name == name and built["frame_size"] == size
    n_params = sum(p.numel() for p in expert.backbone.parameters())
    assert n_params > 10e6, f"{preset} has {n_params / 1e6:.1f}M parameters: not the paper's size"
    before = {key: value.clone() for key, value in expert.backbone.state_dict().items()}
    k, action_dim = expert.context_frames, kwargs["action_dim"]
    generator = torch.Generator().manual_seed(0)
    frames = torch.rand(1, k + 1, 3, size, size, generator=generator) * 2 - 1
    actions = torch.eye(action_dim)[torch.randint(0, action_dim, (1, k + 1), generator=generator)]
    pose_features = torch.rand(1, k + 1, 4, generator=generator) if poses else None
    optimizer = torch.optim.AdamW(expert.backbone.parameters(), lr=config.lr)
    expert.train()
    loss = training_step(expert, expert.backbone, optimizer, (frames, actions, pose_features),
                         draw_training_noise(1, (3, size, size), config.drop_prob, generator), config,
                         DistributedContext(), 1, torch.device("cpu"), "fp32", step=0)
    assert np.isfinite(loss) and loss > 0
    after = expert.backbone.state_dict()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed, f"one step of {preset} changed no weight"
    assert all(torch.isfinite(value).all() for value in after.values())
    if poses:
        with pytest.raises(ValueError, match="is pose-conditioned .* add pose_features=true"):
            build_expert(TrainConfig(model=preset, backbone_overrides={"frame_size": size}), action_dim, size)


def test_a_warm_started_expert_begins_as_its_source(tmp_path):
    """init_from: a U-Net STM over 8 context frames and a pose-conditioned U-Net SLTM, warm-started from a trained
    3-frame base, predict exactly what the base predicts from the newest 3 frames (whatever the older frames and the
    poses hold); training then moves them away from it."""
    import torch

    from come_rl.checkpoint import load_expert
    from come_rl.train import warm_start

    common = ["data=online:memory_cards", "threads=1", "batch_size=4", "online_episodes=16", "steps=2",
              f"backbone_overrides={TINY}"]
    train(parse_overrides(["model=unet_cards", f"out={tmp_path / 'base'}", *common]))
    base, _ = load_expert(tmp_path / "base", "base")
    wide = '{"widths": [16, 32, 32], "cond_dim": 32, "context_frames": 8}'
    config = parse_overrides(["model=unet_cards", "role=stm", f"out={tmp_path / 'stm'}", *common[:-1],
                              f"backbone_overrides={wide}", f"init_from={tmp_path / 'base'}", "steps=0"])
    from come_rl.train import build_expert

    stm, _, _ = build_expert(config, 5, 48)
    sltm, _, _ = build_expert(TrainConfig(model="unet_cards", role="sltm", pose_features=True,
                                          backbone_overrides={"widths": [16, 32, 32], "cond_dim": 32}), 5, 48)
    assert "widened to 8 context frames (in_context.weight)" in warm_start(stm, tmp_path / "base")
    assert "pose_embed.weight" in warm_start(sltm, tmp_path / "base" / "base")
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 9, 3, 48, 48, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 9), generator=g), 5).float()
    x_t, t = torch.randn(2, 3, 48, 48, generator=g), torch.full((2,), 0.7)
    with torch.no_grad():
        want = base.predict_eps(base.prepare(frames[:, 5:8], actions[:, 5:]), x_t, t)
        got = stm.predict_eps(stm.prepare(frames[:, :8], actions), x_t, t)
        poses = torch.randn(2, 4, 4, generator=g)
        spatial = sltm.predict_eps(sltm.prepare(frames[:, 5:8], actions[:, 5:], poses=poses), x_t, t)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(spatial, want, atol=1e-5)
    assert want.abs().mean() > 0.1  # a real prediction, not zeros
    # a different-width source cannot start this expert
    with pytest.raises(ValueError, match="cannot take the source's weights"):
        warm_start(build_expert(TrainConfig(model="unet_cards"), 5, 48)[0], tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="init_from"):
        warm_start(stm, tmp_path / "nowhere" / "base")
    # through the command: the warm-started STM trains and its first loss is the base's level, not a fresh net's
    train(parse_overrides(["model=unet_cards", "role=stm", f"out={tmp_path / 'stm'}", *common[:-1],
                           f"backbone_overrides={wide}", f"init_from={tmp_path / 'base'}", "steps=2"]))
    assert json.loads((tmp_path / "stm" / "stm.json").read_text())["train_config"]["init_from"] == str(tmp_path / "base")


def test_batches_made_ahead_by_a_thread_train_the_same_weights_and_resume(tmp_path):
    """data_workers=1 (a thread makes the next batches while a step trains) trains byte-identical weights to
    data_workers=0, also when every step writes a checkpoint (the thread is stopped and the generators rewound to the
    first batch made ahead) and the run is stopped and resumed halfway."""
    from safetensors.torch import load_file

    common = ["model=unet_cards", "threads=1", "batch_size=4", "online_episodes=16", f"backbone_overrides={TINY}"]
    train(parse_overrides([*common, f"out={tmp_path / 'inline'}", "steps=6", "data_workers=0"]))
    ahead = [*common, f"out={tmp_path / 'ahead'}", "data_workers=1", "checkpoint_seconds=0"]
    train(parse_overrides([*ahead, "steps=3"]))
    train(parse_overrides([*ahead, "steps=6"]))
    inline, resumed = (load_file(str(tmp_path / name / "base.safetensors")) for name in ("inline", "ahead"))
    assert inline.keys() == resumed.keys()
    assert all(inline[key].equal(resumed[key]) for key in inline)
    with pytest.raises(ValueError, match="data_workers must be 0"):
        train(parse_overrides([*common, f"out={tmp_path / 'bad'}", "steps=1", "data_workers=2"]))


def test_cosine_learning_rate_decay_follows_its_curve_and_refuses_an_open_end(tmp_path):
    from come_rl.train import lr_at

    config = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_decay="cosine", lr_final=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)  # warm-up as before
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of both ends
    assert lr_at(110, config) == pytest.approx(1e-4) and lr_at(500, config) == pytest.approx(1e-4)
    assert lr_at(60, TrainConfig(lr=1e-3, warmup_steps=10, steps=110)) == pytest.approx(1e-3)  # none: constant
    with pytest.raises(ValueError, match="give the run's step count"):
        train(TrainConfig(lr_decay="cosine", out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="lr_decay must be none or cosine"):
        train(TrainConfig(lr_decay="linear", steps=10, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="recall_key_lr must be > 0"):
        train(TrainConfig(recall_key_lr=0.0, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="recall_lr must be >= 0"):
        train(TrainConfig(recall_lr=-1e-3, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="same_view_fraction must be in"):
        train(TrainConfig(same_view_fraction=1.5, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="stale_recent_fraction must be in"):
        train(TrainConfig(stale_recent_fraction=-0.5, out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # refused before anything is written
