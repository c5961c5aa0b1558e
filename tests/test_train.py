"""The training command: real steps, atomic checkpoints, resume after a stop, clear errors."""

import json

import pytest

from come_rl.train import TrainConfig, parse_overrides, train

TINY = '{"widths": [16, 32, 32], "cond_dim": 32}'


def test_train_writes_checkpoints_and_resumes(tmp_path, capsys):
    args = ["model=unet_cards", f"out={tmp_path}", "threads=1", "batch_size=4", "online_episodes=16",
            f"backbone_overrides={TINY}"]
    train(parse_overrides([*args, "steps=3"]))
    spec = json.loads((tmp_path / "base.json").read_text())
    assert spec["step"] == 3 and spec["role"] == "base" and spec["backbone"] == "unet"
    assert (tmp_path / "rollout_real_vs_imagined.gif").stat().st_size > 0
    train(parse_overrides([*args, "steps=5"]))  # a second run continues where the first stopped
    assert "resumed base from step 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "base.json").read_text())["step"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown key"):
        parse_overrides(["lerning_rate=1"])
    with pytest.raises(SystemExit, match="bad value for steps"):
        parse_overrides(["steps=many"])
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="online data"):
        train(TrainConfig(data="online:memory_maze", out=str(tmp_path / "o")))


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
    with open(tmp_path / "eval" / f"{tmp_path.name}_stm_one_step.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with pytest.raises(ValueError, match="expert must be"):
        evaluate(EvaluateConfig(checkpoint=str(tmp_path), expert="ltm"))
