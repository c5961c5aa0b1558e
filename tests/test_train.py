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
