"""Damaged files fail loudly and say which file and what to do: checkpoint weights (SHA-256, NaN/inf), RECON poses."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from come_rl.checkpoint import expert_spec, load_expert, save_expert, sign_checkpoint
from come_rl.diffusion import CosineSchedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.io_utils import sha256_file
from come_rl.nets.unet import UNetConfig, VideoUNet
from envs.recon import _jpeg_bytes, load_recon_trajectory

TINY = dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[16, 16, 16], cond_dim=16)
SHIPPED = Path(__file__).resolve().parents[1] / "come_rl" / "checkpoints"


def tiny_expert() -> DiffusionExpert:
    """A random-init U-Net expert with its recipe: enough to save and load, seconds to build."""
    torch.manual_seed(0)
    expert = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule())
    expert.spec = expert_spec(expert, "unet", TINY, extra={"action_spec": {"kind": "discrete", "dim": 5},
                                                           "frame_size": 48})
    return expert.eval()


def overwrite_middle_of_tensor_data(weights: Path, payload: bytes) -> int:
    """Overwrite ``payload`` into the middle of the tensor bytes, the safetensors header untouched; returns the offset.

    The header is an 8-byte little-endian length and that many bytes of JSON; the offset is kept 8-byte aligned so
    float32 values are replaced whole (finite in, finite out: only the sum can notice).
    """
    data = bytearray(weights.read_bytes())
    data_start = 8 + struct.unpack("<Q", data[:8])[0]
    offset = data_start + (len(data) - data_start) // 2 // 8 * 8
    data[offset:offset + len(payload)] = payload
    weights.write_bytes(bytes(data))
    return offset


def test_tampered_weight_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    expert = tiny_expert()
    weights = save_expert(tmp_path, expert, expert.spec)
    recipe = tmp_path / "base.json"
    saved_sum = sha256_file(weights)
    overwrite_middle_of_tensor_data(weights, np.full(4, 0.5, np.float32).tobytes())
    tampered = load_file(str(weights))  # the header still parses: safetensors alone would load this file
    assert any(not torch.equal(tampered[k], v) for k, v in expert.backbone.state_dict().items())
    with pytest.raises(ValueError, match=re.escape(str(weights))) as caught:
        load_expert(tmp_path, "base")
    message = str(caught.value)
    assert json.loads(recipe.read_text())["sha256"] == saved_sum and saved_sum in message
    assert "SHA-256" in message and "corrupt or" in message and "modified" in message
    assert "Re-copy" in message and "retrain" in message and f'delete the "sha256" entry from {recipe}' in message
    # The documented way to accept the file deliberately: delete the entry, and it loads (as the tampered weights).
    spec = json.loads(recipe.read_text())
    del spec["sha256"]
    recipe.write_text(json.dumps(spec, indent=2))
    loaded, _ = load_expert(tmp_path, "base")
    assert any(not torch.equal(loaded.backbone.state_dict()[k], v) for k, v in expert.backbone.state_dict().items())


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path: Path, bad_value: float) -> None:
    expert = tiny_expert()
    with torch.no_grad():
        expert.backbone.out_conv.weight.view(-1)[3] = bad_value
    weights = save_expert(tmp_path, expert, expert.spec)  # summed as written: the sum is right, the values are not
    with pytest.raises(ValueError, match=re.escape(str(weights))) as caught:
        load_expert(tmp_path, "base")
    message = str(caught.value)
    assert "'out_conv.weight' (1 of" in message and "NaN or inf" in message and "retrain" in message
    recipe = tmp_path / "base.json"
    recipe.write_text(json.dumps({k: v for k, v in json.loads(recipe.read_text()).items() if k != "sha256"}))
    with pytest.raises(ValueError, match="NaN or inf"):
        sign_checkpoint(tmp_path)  # nor does signing vouch for such a file (here, one saved before sums)


def test_shipped_checkpoints_carry_sums_and_verify() -> None:
    directories = sorted(p for p in SHIPPED.iterdir() if p.is_dir())
    assert directories, SHIPPED
    for directory in directories:
        roles = sorted(p.stem for p in directory.glob("*.safetensors"))
        assert "base" in roles, directory
        for role in roles:
            spec = json.loads((directory / f"{role}.json").read_text())
            assert spec.get("sha256") == sha256_file(directory / f"{role}.safetensors"), (directory, role)
            if role == "odometry":  # the pose model, not an expert: its own loader checks the sum
                from come_rl.odometry import load_odometry

                load_odometry(directory)
                continue
            _, loaded_spec = load_expert(directory, role)  # verifies the sum and the finiteness
            assert loaded_spec["role"] == role


def test_sign_adds_only_the_sum_to_an_old_checkpoint(tmp_path: Path) -> None:
    expert = tiny_expert()
    weights = save_expert(tmp_path, expert, expert.spec)
    (tmp_path / "world_model.json").write_text('{"sampler": {"steps": 10}}')  # settings, no weights: not signed
    recipe = tmp_path / "base.json"
    spec = json.loads(recipe.read_text())
    del spec["sha256"]
    old_text = json.dumps(spec, indent=2)  # as save_expert wrote it before sums were recorded
    recipe.write_text(old_text)
    load_expert(tmp_path, "base")  # checkpoints without a sum still load
    assert sign_checkpoint(tmp_path) == [recipe]
    new_lines, old_lines = recipe.read_text().splitlines(), old_text.splitlines()
    added = [line for line in new_lines if line not in old_lines]
    assert added == [f'  "sha256": "{sha256_file(weights)}",'] and len(new_lines) == len(old_lines) + 1
    assert (tmp_path / "world_model.json").read_text() == '{"sampler": {"steps": 10}}'
    assert sign_checkpoint(tmp_path) == []  # already signed: nothing rewritten
    overwrite_middle_of_tensor_data(weights, np.full(2, 0.25, np.float32).tobytes())
    with pytest.raises(ValueError, match="changed since they were signed"):
        sign_checkpoint(tmp_path)  # signing does not silently bless a changed file
    assert sign_checkpoint(tmp_path, force=True) == [recipe]
    load_expert(tmp_path, "base")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_recon_traj_data_names_the_file_and_the_fix(tmp_path: Path, keep: float) -> None:
    folder = tmp_path / "traj_a"
    folder.mkdir()
    steps = 6
    for t in range(steps):
        (folder / f"{t}.jpg").write_bytes(_jpeg_bytes(np.full((8, 8, 3), 20 * t, np.uint8)))
    data = pickle.dumps({"position": np.random.default_rng(0).normal(size=(steps, 2)), "yaw": np.zeros(steps)})
    pickle_path = folder / "traj_data.pkl"
    pickle_path.write_bytes(data)
    assert len(load_recon_trajectory(tmp_path, "traj_a")) == steps
    pickle_path.write_bytes(data[:int(len(data) * keep)])  # a copy cut short
    with pytest.raises(ValueError, match=re.escape(str(pickle_path))) as caught:
        load_recon_trajectory(tmp_path, "traj_a")
    message = str(caught.value)
    assert "truncated or corrupt" in message and "re-copy" in message and "re-convert" in message
