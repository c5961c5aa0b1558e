"""Train one expert of the world model on recorded (or freshly generated) episodes.

Usage:
    python -m come_rl.train model=unet_cards data=online:memory_cards out=runs/cards_base minutes=30
    python -m come_rl.train model=unet_maze data=/path/to/collected/memory_maze out=runs/maze_base minutes=60

Every ``key=value`` sets a field of :class:`TrainConfig`. Training shows a tqdm bar, writes atomic checkpoints every
``checkpoint_seconds`` (weights + EMA + optimiser + data RNG), and resumes from ``out`` when it is run again with the
same ``out`` -- kill it at any time. At the end it writes a GIF of samples vs ground truth and the held-out evaluation
(``come_rl.evaluate``) next to the checkpoint.
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


def lr_at(step: int, config: TrainConfig) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def train(config: TrainConfig) -> Path:
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_data_source(config.data, seed=config.seed, online_episodes=config.online_episodes)
    frame_size = source.frame_size
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
        print(f"resumed {config.role} from step {step} ({elapsed / 60:.1f} min trained)")
    n_params = sum(p.numel() for p in expert.backbone.parameters())
    (out / "train_log.csv").touch()
    budget = config.minutes * 60.0
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc=f"train {config.role} {config.model}")
    last_ckpt = time.time()
    losses: list[float] = []
    expert.train()

    def save() -> None:
        save_expert(out, expert, dict(spec, step=step, minutes=elapsed / 60, parameters=n_params), state_dict=ema,
                    half=config.half_weights)
        torch_save_atomic({"model": expert.backbone.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                           "step": step, "elapsed": elapsed, "rng": rng.bit_generator.state,
                           "generator": generator.get_state(), "spec": spec}, state_path)

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
        if step % 50 == 0:
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-50:]):.4f}", clips_s=f"{config.batch_size / dt:.0f}")
            with open(out / "train_log.csv", "a") as log:
                log.write(f"{step},{elapsed:.1f},{np.mean(losses[-50:]):.6f}\n")
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
