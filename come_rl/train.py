"""Train one expert of the world model on recorded (or freshly generated) episodes.

Usage:
    python -m come_rl.train model=unet_cards data=online:memory_cards out=runs/cards_base minutes=30
    python -m come_rl.train model=unet_maze data=/path/to/collected/memory_maze out=runs/maze_base minutes=60

Every ``key=value`` sets a field of :class:`TrainConfig`. Training shows a tqdm bar, writes atomic checkpoints every
``checkpoint_seconds`` (weights + EMA + optimiser + data RNG + the online episode pool's state), and resumes from
``out`` when it is run again with the same ``out`` -- kill it at any time: the resumed run trains the weights an
uninterrupted one does, and ``train_log.csv`` (one row per ``log_every`` steps) loses the rows of the steps it trains
again. At the end it writes a GIF of samples vs ground truth and the held-out evaluation (``come_rl.evaluate``) next
to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from come_rl.cli_args import parse_dataclass
from come_rl.checkpoint import build_backbone_from_spec, expert_spec, save_expert, torch_save_atomic
from come_rl.data_sources import clips_to_tensors, open_data_source
from come_rl.diffusion import build_schedule
from come_rl.experts.expert import DiffusionExpert
from come_rl.io_utils import atomic_write_text

# Backbone recipes by preset name: (registry name, kwargs). CPU sizes train in minutes on 2 cores.
MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    # Memory Cards at 48x48: unshuffle 3 -> 16x16, levels 16/8/4 (one bottleneck cell per tile); 3.9M parameters.
    "unet_cards": ("unet", dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[48, 96, 192])),
    # Memory Maze at 64x64: unshuffle 4 -> 16x16, levels 16/8/4.
    "unet_maze": ("unet", dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[64, 128, 256])),
    # Short-term memory expert for Memory Cards: the sliding-window DiT (window 4 frames, full attention in block 1)
    # over 8 context frames; patch 8 on 48x48 = 36 tokens per frame keeps it CPU-sized.
    "stm_cards": ("stm_cpu", dict(frame_size=48, patch_size=8, context_frames=8, predicted_frames=1, action_dim=5,
                                  window_frames=4, full_attention_layers=[1])),
    # Spatial expert for Memory Cards: conditioned on the absolute cursor pose (x, y, sin, cos), 3 context frames.
    "sltm_cards": ("sltm_cpu", dict(frame_size=48, patch_size=8, context_frames=3, predicted_frames=1, action_dim=5,
                                    pose_dim=4)),
    # The paper's Memory Cards U-Net size (for GPU users; encoder channels 64/128/256/512, 8 resnets per level).
    "unet_paper": ("unet", dict(frame_size=48, unshuffle=1, action_dim=5, context_frames=3,
                                widths=[64, 128, 256, 512], blocks_per_level=8)),
}


@dataclass
class TrainConfig:
    """Fields settable as key=value on the command line."""

    model: str = "unet_cards"
    """backbone preset (see MODEL_PRESETS) or a transformer registry name (come_rl.nets.registry)."""
    role: str = "base"
    """which expert this trains: base, stm or sltm (the LTM is the base plus test-time LoRA, not trained here)."""
    data: str = "online:memory_cards"
    """a collected data set directory (come_rl.collect), Memory Maze's offline npz folder, or online:memory_cards."""
    out: str = "runs/base"
    """checkpoint directory; rerunning with the same out resumes."""
    minutes: float = 30.0
    """wall-clock budget; training stops at whichever of minutes / steps comes first."""
    steps: int = 10**9
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    drop_prob: float = 0.1
    """condition dropout: the share of rows trained in the unconditional mode (the composition's baseline)."""
    schedule: str = "cosine"
    target: str = "full"
    """what the expert denoises: "full" (the next frame; the default) or "residual" (its change to the last frame)."""
    threads: int = 2
    seed: int = 0
    checkpoint_seconds: float = 120.0
    log_every: int = 50
    """steps per row of train_log.csv (step, seconds, mean loss over those steps)."""
    pose_features: bool = False
    """condition on absolute pose features (SLTM)."""
    backbone_overrides: dict = field(default_factory=dict)
    online_episodes: int = 1024
    """size of the episode pool for online:<env> data."""
    half_weights: bool = False
    """store the shipped weights in float16 (halves the file)."""


def parse_overrides(argv: list[str], config_cls=TrainConfig):
    """Parse ``key=value`` arguments into a dataclass, with a clear error on unknown keys or bad values."""
    try:
        return parse_dataclass(argv, config_cls)
    except ValueError as error:
        raise SystemExit(f"{error}") from error


def build_expert(config: TrainConfig, action_dim: int, frame_size: int) -> tuple[DiffusionExpert, str, dict]:
    if config.model in MODEL_PRESETS:
        name, kwargs = MODEL_PRESETS[config.model]
        kwargs = dict(kwargs)
    else:
        name, kwargs = config.model, {}
    kwargs.update(config.backbone_overrides)
    if kwargs.get("action_dim", action_dim) != action_dim:
        raise ValueError(f"model {config.model} expects action_dim {kwargs['action_dim']} but the data has {action_dim}")
    if kwargs.get("frame_size", frame_size) != frame_size:
        raise ValueError(f"model {config.model} expects frames of {kwargs['frame_size']} px but the data has {frame_size}")
    kwargs["action_dim"], kwargs["frame_size"] = action_dim, frame_size
    if config.pose_features:
        kwargs["pose_dim"] = 4
    backbone = build_backbone_from_spec(name, kwargs)
    expert = DiffusionExpert(backbone, build_schedule(config.schedule), name=config.role, uses_poses=config.pose_features,
                             target=config.target)
    return expert, name, kwargs


TRAIN_LOG_HEADER = "step,seconds,loss"


def trim_train_log(path: Path, step: int) -> None:
    """Keep the rows of ``train_log.csv`` up to ``step`` (the step training resumes from), rewritten atomically.

    Rows are appended between checkpoints, so after a kill the log holds rows of steps the resumed run trains again
    (they would be written twice) and maybe a torn last line; a fresh start (step 0) keeps the header only.
    """
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            fields = line.rstrip("\n").split(",")
            if not line.endswith("\n") or len(fields) != 3:
                continue  # the header, or a row a kill cut short
            try:
                logged_step = int(fields[0])
                float(fields[1]), float(fields[2])
            except ValueError:
                continue
            if logged_step <= step:
                rows.append(line)
    atomic_write_text(path, TRAIN_LOG_HEADER + "\n" + "".join(rows))


def remove_stray_files(out: Path, role: str) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.<name>.<random>.tmp``) of this role's files."""
    for name in (f"{role}_train_state.pt", f"{role}.safetensors", f"{role}.json", "train_log.csv"):
        for stray in out.glob(f".{name}.*.tmp"):
            stray.unlink(missing_ok=True)


def lr_at(step: int, config: TrainConfig) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def train(config: TrainConfig) -> Path:
    if config.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {config.log_every}")
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stray_files(out, config.role)
    source = open_data_source(config.data, seed=config.seed, online_episodes=config.online_episodes)
    frame_size = source.frame_size
    # The initial weights come from torch's global generator, which torch seeds from OS entropy in every process: seed
    # it, so that one command trains the same weights (a resumed run loads them; an uninterrupted one must match it).
    torch.manual_seed(config.seed)
    expert, backbone_name, backbone_kwargs = build_expert(config, source.action_spec.dim, frame_size)
    k = expert.context_frames
    ema = {name: p.detach().clone() for name, p in expert.backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(expert.backbone.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    spec = expert_spec(expert, backbone_name, backbone_kwargs, extra={
        "action_spec": dataclasses.asdict(source.action_spec), "frame_size": frame_size,
        "data": config.data, "train_config": dataclasses.asdict(config),
    })
    state_path = out / f"{config.role}_train_state.pt"
    step, elapsed, rng = 0, 0.0, np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []  # since the last row of train_log.csv
    if state_path.exists():
        try:
            state = torch.load(state_path, weights_only=False)
        except Exception as error:  # a corrupt file must not silently restart training from scratch
            raise RuntimeError(f"cannot resume from {state_path} ({error}); delete it to start over") from error
        if state["spec"]["backbone_kwargs"] != backbone_kwargs:
            raise ValueError(f"{state_path} was trained with a different model ({state['spec']['backbone_kwargs']}); "
                             f"use another out= directory")
        expert.backbone.load_state_dict(state["model"])
        ema = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        rng.bit_generator.state = state["rng"]
        generator.set_state(state["generator"])
        losses = list(state.get("losses", []))
        if callable(getattr(source, "load_state_dict", None)):
            if "data" in state:
                source.load_state_dict(state["data"])
            else:  # a checkpoint of an older version: training goes on, on another sequence of clips
                print(f"{state_path} does not hold the online episode pool's state; the pool restarts from seed "
                      f"{config.seed}")
        print(f"resumed {config.role} from step {step} ({elapsed / 60:.1f} min trained)")
    n_params = sum(p.numel() for p in expert.backbone.parameters())
    trim_train_log(out / "train_log.csv", step)
    budget = config.minutes * 60.0
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc=f"train {config.role} {config.model}")
    last_ckpt = time.time()
    expert.train()

    def save() -> None:
        save_expert(out, expert, dict(spec, step=step, minutes=elapsed / 60, parameters=n_params), state_dict=ema,
                    half=config.half_weights)
        torch_save_atomic({"model": expert.backbone.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                           "step": step, "elapsed": elapsed, "rng": rng.bit_generator.state,
                           "generator": generator.get_state(), "spec": spec, "losses": losses,
                           **({"data": source.state_dict()} if callable(getattr(source, "state_dict", None)) else {})},
                          state_path)

    while elapsed < budget and step < config.steps:
        t0 = time.time()
        clips = source.sample_clips(config.batch_size, k + 2, rng)
        frames, actions, poses = clips_to_tensors(clips, pose_features=config.pose_features)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = expert.loss(frames, actions, poses, drop_prob=config.drop_prob, generator=generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower lr= and resume")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.backbone.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for name, p in expert.backbone.state_dict().items():
                if p.is_floating_point():
                    ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    ema[name].copy_(p)
        step += 1
        losses.append(loss.item())
        dt = time.time() - t0
        elapsed += dt
        bar.update(int(elapsed) - bar.n)
        if step % config.log_every == 0:
            bar.set_postfix(step=step, loss=f"{np.mean(losses):.4f}", clips_s=f"{config.batch_size / dt:.0f}")
            with open(out / "train_log.csv", "a") as log:
                log.write(f"{step},{elapsed:.1f},{np.mean(losses):.6f}\n")
            losses = []
        if time.time() - last_ckpt > config.checkpoint_seconds:
            save()
            last_ckpt = time.time()
    bar.close()
    save()
    print(f"saved {out} after {step} steps, {elapsed / 60:.1f} min, {n_params / 1e6:.2f}M parameters")
    if config.role == "base":
        _rollout_video(out, source, config)
    return out


def _rollout_video(out: Path, source, config: TrainConfig) -> None:
    """Samples vs ground truth at the end of training: 16 imagined frames (EMA weights) beside the real ones."""
    from come_rl.visualize import rollout_comparison, save_rollout_gif
    from come_rl.world_model import WorldModel

    wm = WorldModel.load(out, experts=["base"])
    clip = source.sample_clips(1, wm.base.context_frames + 16, np.random.default_rng(config.seed + 7))
    real, imagined = rollout_comparison(wm, clip["frames"][0], clip["actions"][0], context=wm.base.context_frames)
    path = save_rollout_gif(out / "rollout_real_vs_imagined.gif", [real, imagined])
    print(f"wrote {path} (left: real, right: imagined)")


def main(argv: list[str] | None = None) -> None:
    config = parse_overrides(sys.argv[1:] if argv is None else argv)
    train(config)


if __name__ == "__main__":
    main()
