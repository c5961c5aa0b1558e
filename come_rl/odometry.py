"""Where imagined actions take the agent: a learned odometry head that gives imagined frames their poses.

A world model that remembers places must be asked about places: a planner that scores a rollout by where it ends
(``planners.objectives.PathObjective``) and the spatial expert (SLTM), which conditions on the pose of every frame it
imagines, both need the poses of imagined frames. The env reports the agent's real pose; nothing reports an imagined
one. :class:`OdometryNet` predicts the motion of the next step from what the agent sees now, the motion of the step
before (the maze's agent is a ball with inertia) and the action; :class:`OdometryPoseModel` integrates it along a
rollout, reading the frames the world model imagines (a frame facing a wall says that "forward" will not move).

Motion is ``(dx, dy, dyaw)`` in the agent's frame (``come_rl.conventions.absolute_to_relative``).

Train and check on collected data::
    python -m come_rl.odometry data=<collected maze episodes> val=<held-out episodes> out=<checkpoint dir> minutes=10

It writes ``odometry.safetensors`` + ``odometry.json`` (``WorldModel.load`` picks them up as the model's pose model)
and ``odometry_eval.json``: open-loop pose error over held-out segments (ATE / RPE by evo) against two references,
the mean motion of each action and a linear model of action and previous motion.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_safetensors
from torch import nn
from tqdm import tqdm

from come_rl.checkpoint import check_finite, verify_sha256
from come_rl.cli_args import parse_cli
from come_rl.conventions import absolute_to_relative, frames_to_tensor, relative_to_absolute, wrap_angle_tensor
from come_rl.data.episodes import EpisodeDataset
from come_rl.io_utils import atomic_write_bytes, atomic_write_text, sha256_file
from come_rl.metrics.trajectory import absolute_trajectory_error, relative_pose_error

ODOMETRY_NAME = "odometry"
FORMAT_VERSION = 1
# per-dimension scale of the motion (maze cells, cells, radians per step), so that the loss weighs the three alike
MOTION_SCALE = (0.1, 0.01, 0.15)


@dataclass(frozen=True)
class OdometryConfig:
    """Size of an :class:`OdometryNet`."""

    frame_size: int = 64
    action_dim: int = 6
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.frame_size % (2 ** len(self.channels)) or min(self.channels) < 1 or self.hidden < 1 or self.action_dim < 1:
            raise ValueError(f"OdometryConfig: frame_size must be divisible by 2^{len(self.channels)} and sizes "
                             f"positive, got {self}")


def _compose(poses: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """poses (..., 3) moved by motion (..., 3) given in their own frame -> (..., 3), yaw wrapped to [-pi, pi)."""
    cos, sin = torch.cos(poses[..., 2]), torch.sin(poses[..., 2])
    x = poses[..., 0] + cos * motion[..., 0] - sin * motion[..., 1]
    y = poses[..., 1] + sin * motion[..., 0] + cos * motion[..., 1]
    yaw = wrap_angle_tensor(poses[..., 2] + motion[..., 2])
    return torch.stack([x, y, yaw], dim=-1)


def _relative(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The motion (..., 3) from pose ``before`` to pose ``after``, in the frame of ``before``."""
    delta = after[..., :2] - before[..., :2]
    cos, sin = torch.cos(before[..., 2]), torch.sin(before[..., 2])
    turn = wrap_angle_tensor(after[..., 2] - before[..., 2])
    return torch.stack([cos * delta[..., 0] + sin * delta[..., 1], -sin * delta[..., 0] + cos * delta[..., 1], turn], -1)


class OdometryNet(nn.Module):
    """``forward(frame (B, 3, H, W) in [-1, 1], previous_motion (B, 3), action (B, A)) -> motion (B, 3)``."""

    def __init__(self, config: OdometryConfig | None = None):
        super().__init__()
        self.config = config = config or OdometryConfig()
        layers: list[nn.Module] = []
        channels_in = 3
        for channels in config.channels:
            layers += [nn.Conv2d(channels_in, channels, 4, stride=2, padding=1), nn.GroupNorm(1, channels), nn.SiLU()]
            channels_in = channels
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        side = config.frame_size // 2 ** len(config.channels)
        self.frame_proj = nn.Linear(channels_in * side * side, config.hidden)
        inputs = config.hidden + config.action_dim * (1 + 3) + 3
        self.head = nn.Sequential(nn.Linear(inputs, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden),
                                  nn.SiLU(), nn.Linear(config.hidden, 3))
        self.register_buffer("scale", torch.tensor(MOTION_SCALE, dtype=torch.float32))

    def forward(self, frame: torch.Tensor, previous_motion: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        previous = previous_motion / self.scale
        features = F.silu(self.frame_proj(self.encoder(frame)))
        # the action times the previous motion: inertia differs per action (a turn keeps going forward, a noop slows)
        crossed = (action[:, :, None] * previous[:, None, :]).flatten(1)
        return self.head(torch.cat([features, action, crossed, previous], dim=1)) * self.scale


class OdometryPoseModel:
    """The world model's pose model (``WorldModel.pose_model``): the pose after ``action`` from the pose now, the pose
    before it and the frame now (``reads_context``: ``WorldModel.imagine`` passes ``previous=`` and ``frame=``)."""

    reads_context = True

    def __init__(self, net: OdometryNet):
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, poses: torch.Tensor, actions: torch.Tensor, previous: torch.Tensor | None = None,
                 frame: torch.Tensor | None = None) -> torch.Tensor:
        if frame is None:
            raise ValueError("the odometry pose model reads the frame the action is taken from: pass frame=")
        poses = poses.float()
        previous_motion = torch.zeros_like(poses) if previous is None else _relative(previous.float(), poses)
        device = next(self.net.parameters()).device
        motion = self.net(frame.float().to(device), previous_motion.to(device), actions.float().to(device)).to(poses)
        return _compose(poses, motion)

    def rollout(self, start_pose, start_previous, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop poses (T, 3) after each of T actions, from frames (T, 3, H, W): frame t is the one action t is
        taken from (real frames for a check against real poses, imagined ones in planning)."""
        pose = torch.as_tensor(np.asarray(start_pose), dtype=torch.float32)[None]
        previous = torch.as_tensor(np.asarray(start_previous), dtype=torch.float32)[None]
        poses = []
        for t in range(len(actions)):
            nxt = self(pose, actions[t:t + 1], previous=previous, frame=frames[t:t + 1])
            previous, pose = pose, nxt
            poses.append(nxt[0])
        return torch.stack(poses)


def save_odometry(directory: str | Path, net: OdometryNet, info: dict) -> Path:


    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{ODOMETRY_NAME}.safetensors"
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    atomic_write_bytes(weights, save_safetensors(state))
    spec = {"format_version": FORMAT_VERSION, "sha256": sha256_file(weights), "config": asdict(net.config), **info}
    atomic_write_text(directory / f"{ODOMETRY_NAME}.json", json.dumps(spec, indent=2) + "\n")
    return weights


def load_odometry(directory: str | Path) -> OdometryPoseModel:
    """The pose model saved in a checkpoint directory; a clear error for a missing, corrupt or modified file."""


    directory = Path(directory)
    weights, recipe = directory / f"{ODOMETRY_NAME}.safetensors", directory / f"{ODOMETRY_NAME}.json"
    for path in (weights, recipe):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {path.name}; train the odometry head with "
                                    f"`python -m come_rl.odometry data=... out={directory}`")
    try:
        spec = json.loads(recipe.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{recipe} is not valid JSON ({error}); retrain the odometry head or re-copy the file") from error
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{recipe} has format_version {spec.get('format_version')}, this come_rl reads {FORMAT_VERSION}")
    verify_sha256(weights, recipe, spec)  # the experts' check: a recorded sum the file does not have is refused
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {weights} ({error}); retrain the odometry head or re-copy it") from error
    check_finite(weights, state)
    net = OdometryNet(OdometryConfig(**spec["config"]))
    net.load_state_dict(state)
    return OdometryPoseModel(net)


# ------------------------------------------------------------------------------------------------ data and training
class _Transitions:
    """Every step t >= 1 of a data set: frame t, motion t - 1, action t -> motion t."""

    def __init__(self, dataset):
        if dataset.poses is None:
            raise ValueError("the odometry head learns from poses: use a data set collected with poses (Memory Maze)")
        self.dataset = dataset
        index, motions = [], []
        for k, poses in enumerate(dataset.poses):
            motion = absolute_to_relative(poses).astype(np.float32)  # (T, 3)
            motions.append(motion)
            index += [(k, t) for t in range(1, len(motion))]
        self.motions, self.index = motions, np.asarray(index, dtype=np.int64)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        pairs = self.index[rows]
        frames = np.stack([self.dataset.frames[k][t] for k, t in pairs])
        previous = np.stack([self.motions[k][t - 1] for k, t in pairs])
        actions = np.stack([self.dataset.actions[k][t] for k, t in pairs])
        target = np.stack([self.motions[k][t] for k, t in pairs])
        return frames_to_tensor(frames), torch.from_numpy(previous), torch.from_numpy(actions), torch.from_numpy(target)


def reference_models(dataset) -> dict:
    """Two references fitted on the training data: the mean motion of each action, and a linear model of the action and
    the previous motion (inertia); each a function (previous_motion (3,), action_index) -> motion (3,)."""
    previous, actions, target = [], [], []
    for k, poses in enumerate(dataset.poses):
        motion = absolute_to_relative(poses)
        previous.append(motion[:-1])
        target.append(motion[1:])
        actions.append(np.asarray(dataset.actions[k][1:]).argmax(1))
    previous, actions, target = np.concatenate(previous), np.concatenate(actions), np.concatenate(target)
    num_actions = int(np.asarray(dataset.actions[0]).shape[1])
    means = np.stack([target[actions == a].mean(0) if (actions == a).any() else np.zeros(3) for a in range(num_actions)])

    def features(prev: np.ndarray, action: np.ndarray) -> np.ndarray:
        onehot = np.eye(num_actions)[action]
        return np.concatenate([onehot] + [onehot * prev[:, j:j + 1] for j in range(3)], axis=1)

    weights = np.linalg.lstsq(features(previous, actions), target, rcond=None)[0]
    return {"action_mean": lambda prev, a: means[a],
            "linear_inertia": lambda prev, a: (features(np.asarray(prev)[None], np.array([a])) @ weights)[0]}


def evaluate_segments(pose_model: OdometryPoseModel, dataset, horizon: int = 16, segments: int = 128, seed: int = 0,
                      references: dict | None = None) -> dict:
    """Open-loop pose error over ``segments`` held-out segments of ``horizon`` steps, integrated from the true pose and
    motion at the segment's start, reading the real frames: ATE / RPE (evo, translation, no alignment) and the
    position error after 4, 8 and ``horizon`` steps; the same for each reference model."""

    rng = np.random.default_rng(seed)
    rows = {name: {"ate": [], "rpe": [], "end4": [], "end8": [], f"end{horizon}": []}
            for name in ["odometry", *(references or {})]}
    for _ in range(segments):
        k = int(rng.integers(len(dataset.poses)))
        poses = np.asarray(dataset.poses[k], np.float64)
        t = int(rng.integers(1, len(poses) - horizon - 1))
        truth = poses[t:t + horizon + 1]
        previous_pose = poses[t - 1]
        frames = frames_to_tensor(np.asarray(dataset.frames[k][t:t + horizon]))
        actions = torch.from_numpy(np.asarray(dataset.actions[k][t:t + horizon], np.float32))
        estimates = {"odometry": np.concatenate([truth[:1], pose_model.rollout(
            truth[0], previous_pose, frames, actions).double().numpy()])}
        for name, reference in (references or {}).items():
            previous = absolute_to_relative(np.stack([previous_pose, truth[0]]))[0]
            motions = []
            for a in np.asarray(dataset.actions[k][t:t + horizon]).argmax(1):
                previous = reference(previous, int(a))
                motions.append(previous)
            estimates[name] = relative_to_absolute(np.stack(motions), truth[0])
        for name, estimate in estimates.items():
            row = rows[name]
            row["ate"].append(absolute_trajectory_error(estimate, truth))
            row["rpe"].append(relative_pose_error(estimate, truth))
            for step in (4, 8, horizon):
                row[f"end{step}"].append(float(np.linalg.norm(estimate[step, :2] - truth[step, :2])))
    return {name: {key: float(np.mean(values)) for key, values in row.items()} for name, row in rows.items()}


@dataclass
class OdometryTrainConfig:
    data: str = ""
    val: str = ""
    out: str = ""
    minutes: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    noise: float = 0.05
    horizon: int = 16
    segments: int = 128


def train(config: OdometryTrainConfig, progress: bool = True) -> dict:
    """Train for ``minutes`` of wall clock (or until interrupted), then evaluate on ``val`` and save in ``out``."""


    if not config.data or not config.out:
        raise ValueError("give data=<collected Memory Maze episodes> and out=<checkpoint directory>")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    dataset = EpisodeDataset(config.data)
    transitions = _Transitions(dataset)
    frame_size = int(np.asarray(dataset.frames[0]).shape[1])
    net = OdometryNet(OdometryConfig(frame_size=frame_size, action_dim=int(np.asarray(dataset.actions[0]).shape[1])))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    deadline = time.monotonic() + 60 * config.minutes
    steps, losses, log = 0, [], []
    bar = tqdm(desc="odometry", unit="step", disable=not progress, file=sys.stderr, mininterval=5)
    start = time.monotonic()
    try:
        while time.monotonic() < deadline:
            fraction = min(1.0, (time.monotonic() - start) / (60 * config.minutes))
            for group in optimizer.param_groups:  # cosine decay over the wall-clock budget
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * fraction))
            frames, previous, actions, target = transitions.batch(rng.integers(len(transitions.index),
                                                                               size=config.batch_size))
            if config.noise > 0:  # imagined frames are not real ones: a little noise keeps the head from pixel details
                frames = (frames + config.noise * torch.randn_like(frames)).clamp(-1, 1)
            loss = F.mse_loss(net(frames, previous, actions) / net.scale, target / net.scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(loss.item())
            if steps % 100 == 0:
                log.append({"step": steps, "seconds": round(time.monotonic() - start, 1),
                            "loss": float(np.mean(losses[-100:]))})
                bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            bar.update(1)
    except KeyboardInterrupt:
        print("odometry: interrupted; evaluating and saving what was trained", file=sys.stderr)
    bar.close()
    info = {"data": str(config.data), "steps": steps, "seconds": round(time.monotonic() - start, 1),
            "batch_size": config.batch_size, "lr": config.lr, "noise": config.noise, "seed": config.seed,
            "parameters": sum(p.numel() for p in net.parameters()), "train_log": log}
    save_odometry(config.out, net, info)
    result = {"train": {k: v for k, v in info.items() if k != "train_log"}}
    if config.val:
        held_out = EpisodeDataset(config.val)
        result["val"] = {"data": str(config.val), "horizon": config.horizon, "segments": config.segments,
                         **evaluate_segments(OdometryPoseModel(net), held_out, config.horizon, config.segments,
                                             seed=config.seed, references=reference_models(dataset))}

    atomic_write_text(Path(config.out) / "odometry_eval.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, OdometryTrainConfig,
                       "python -m come_rl.odometry data=DIR out=DIR [val=DIR minutes=10 ...]")
    result = train(config)
    print(json.dumps(result.get("val", result), indent=2))


if __name__ == "__main__":
    main()
