"""A latent Memory Maze base, probed against the pixel base at the same CPU budget.

Usage:
    python -m come_rl.experiments.latent_probe data=data/maze_train run_dir=runs/latent_probe \\
        ae_minutes=15 minutes=60 eval_seed=30000 clips=256 threads=1 out_dir=results/latent_probe

The paper's experts denoise VAE latents; the shipped maze base denoises pixels (a U-Net on 4x4-unshuffled cells with a
motion prior, ``unet_maze_warp``). This probe asks whether latents are worth it at this project's scale, by held-out
quality per CPU-minute on the clips the pixel candidates were chosen on:

1. an autoencoder trained here (:class:`FrameAutoencoder`: 64x64x3 frames <-> 16x16 x ``latent_channels`` latents
   bounded by tanh, MSE + L1 on pixels, the decoder also trained on noised latents so that it forgives an imperfect
   sample), ``ae_minutes`` of training;
2. the maze U-Net (the same widths, levels and motion prior as ``unet_maze_warp``, here on the 16x16 latent grid with
   no unshuffling: the same grid the pixel base works on) trained on the frozen encoder's latents of the same clips,
   residual target, x0-prediction, ``minutes`` of training; EMA weights are evaluated;
3. one-step prediction on held-out clips (``come_rl.evaluate``'s clips for ``eval_data`` / ``eval_seed`` / ``clips``):
   the sampled latent decoded, MSE and LPIPS against the real next frame beside copy-last-frame's, per kind of
   transition; and the autoencoder's own floor (the real next frame encoded and decoded).

Both stages checkpoint to ``run_dir`` every ``checkpoint_seconds`` (atomically) and resume from there; a finished
stage is not retrained. Outputs in ``out_dir``: ``latent_probe.csv`` / ``.md``, ``latent_probe_examples.png`` (rows:
last context frame, real next, latent model; ``_floor_examples``: the autoencoder's reconstruction), ``train_log.csv``
and ``latent_probe_training.png`` (the loss of each stage against training minutes).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from come_rl import devices
from come_rl.checkpoint import torch_save_atomic
from come_rl.cli_args import parse_cli
from come_rl.conventions import frames_to_tensor
from come_rl.data_sources import clips_to_tensors, open_data_source
from come_rl.diffusion import SamplerConfig, sample
from come_rl.diffusion.schedule import build_schedule
from come_rl.evaluate import _save_examples, data_env_name, score_by_kind, transition_kinds
from come_rl.experts.expert import DiffusionExpert
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.nets.registry import build_backbone
from come_rl.results import append_rows, read_rows, write_table


@dataclass
class LatentProbeConfig:
    data: str = ""
    """the training episodes (a ``come_rl.collect`` data set, e.g. data/maze_train), required."""
    run_dir: str = "runs/latent_probe"
    """where both stages checkpoint (autoencoder.pt, diffusion.pt) and resume from."""
    out_dir: str = "results/latent_probe"
    latent_channels: int = 8
    ae_width: int = 16
    ae_minutes: float = 15.0
    ae_batch: int = 32
    """frames per autoencoder step (4 frames of each of ae_batch / 4 clips)."""
    ae_lr: float = 1e-3
    ae_latent_noise: float = 0.1
    """the decoder also reconstructs from latents plus Gaussian noise of this scale (half of each batch)."""
    minutes: float = 60.0
    """training minutes of the latent diffusion model."""
    batch_size: int = 32
    lr: float = 5e-4
    ema_decay: float = 0.999
    drop_prob: float = 0.1
    target: str = "residual"
    warp: bool = True
    """the motion prior of ``unet_maze_warp`` on the latent grid."""
    eval_data: str = "online:memory_maze"
    eval_seed: int = 30000
    clips: int = 256
    sampler_steps: int = 10
    threads: int = 1
    precision: str = "auto"
    """auto: bf16 where the CPU has bfloat16 kernels (what the probe's results were made with) and on CUDA, else fp32."""
    seed: int = 0
    checkpoint_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.ae_minutes < 0 or self.minutes < 0:
            raise ValueError("ae_minutes and minutes must be >= 0")
        if self.clips < 1 or self.sampler_steps < 1:
            raise ValueError("clips and sampler_steps must be >= 1")


@dataclass
class Streams:
    """The run's random streams, saved in each checkpoint: ``rng`` draws clips, ``generator`` draws noise."""

    rng: np.random.Generator
    generator: torch.Generator


def _block(channels: int) -> nn.Module:
    return nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = _block(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FrameAutoencoder(nn.Module):
    """Frames (N, 3, 64, 64) in [-1, 1] <-> latents (N, C, 16, 16) in [-1, 1] (tanh), a 4x downsampling conv net
    (widths w / 2w / 4w at 64x64 / 32x32 / 16x16, w = 16: cheap at full resolution, where a CPU spends most; 0.34 s
    per step of 32 frames on one core in bf16, w = 32 three times that)."""

    def __init__(self, latent_channels: int = 8, width: int = 16):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1), _Residual(w1),
            nn.Conv2d(w1, w2, 4, stride=2, padding=1), _Residual(w2),
            nn.Conv2d(w2, w3, 4, stride=2, padding=1), _Residual(w3),
            nn.GroupNorm(8, w3), nn.SiLU(), nn.Conv2d(w3, latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, w3, 3, padding=1), _Residual(w3), _Residual(w3),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w3, w2, 3, padding=1), _Residual(w2),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w2, w1, 3, padding=1), _Residual(w1),
            nn.GroupNorm(8, w1), nn.SiLU(), nn.Conv2d(w1, 3, 3, padding=1))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(frames).float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(latents).float())

    def encode_clips(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, H, W) -> (B, L, C, H/4, W/4)."""
        b, length = frames.shape[:2]
        return self.encode(frames.flatten(0, 1)).unflatten(0, (b, length))


def latent_expert(config: LatentProbeConfig) -> DiffusionExpert:
    """The maze U-Net (``unet_maze_warp``'s widths and levels) on the 16x16 latent grid."""
    backbone = build_backbone("unet", frame_size=16, channels=config.latent_channels, unshuffle=1, action_dim=6,
                              context_frames=3, widths=[64, 128, 256], warp_anchor=config.warp)
    return DiffusionExpert(backbone, build_schedule("cosine"), target=config.target, prediction="x0")


def _load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a corrupt file: say which and how to fix it
        raise ValueError(f"{path} could not be read ({type(error).__name__}: {error}); delete it to retrain that "
                         "stage, or point run_dir= elsewhere") from error


def _train_loop(name: str, minutes: float, path: Path, modules: dict, optimizer, step_fn, config: LatentProbeConfig,
                streams: Streams, log_path: Path) -> None:
    """Run ``step_fn(step) -> loss`` until ``minutes`` of training (counted across resumes), checkpointing
    ``modules`` + ``optimizer`` + the clip stream's state atomically; the loss every 100 steps goes to ``log_path``
    (appended at each checkpoint, so a killed run keeps the log of what it saved)."""
    log_rows: list = []
    state = _load_state(path)
    step, elapsed = 0, 0.0
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        streams.rng.bit_generator.state = state["rng"]
        streams.generator.set_state(state["generator"])
    if state is not None and state.get("done"):
        return
    budget = minutes * 60.0
    last_save, start = time.perf_counter(), time.perf_counter() - elapsed
    bar = tqdm(total=round(budget), initial=round(elapsed), desc=f"{name} (s of training)", unit="s")

    def save(done: bool) -> None:
        if log_rows:
            append_rows(log_path, log_rows)
            log_rows.clear()
        torch_save_atomic({**{k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                           "step": step, "elapsed": time.perf_counter() - start, "done": done,
                           "rng": streams.rng.bit_generator.state, "generator": streams.generator.get_state()}, path)

    losses = []
    while time.perf_counter() - start < budget:
        loss = step_fn(step)
        if not np.isfinite(loss):
            raise FloatingPointError(f"{name}: the loss is {loss} at step {step}; lower the learning rate")
        losses.append(loss)
        step += 1
        now = time.perf_counter()
        bar.update(round(now - start) - bar.n)
        if step % 100 == 0:
            log_rows.append({"stage": name, "step": step, "minutes": round((now - start) / 60, 2),
                             "loss": float(np.mean(losses))})
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", step=step)
            losses = []
        if now - last_save > config.checkpoint_seconds:
            save(False)
            last_save = now
    bar.close()
    if losses:  # the last, partial window
        log_rows.append({"stage": name, "step": step, "minutes": round((time.perf_counter() - start) / 60, 2),
                         "loss": float(np.mean(losses))})
    save(True)


def encode_dataset(source, autoencoder: FrameAutoencoder, device: torch.device, precision: str,
                   chunk: int = 256) -> torch.Tensor:
    """Every frame of a recorded data set through the frozen encoder: (frames, C, 16, 16), in the data set's order."""
    frames = source.dataset._all_frames
    latents = []
    for start in tqdm(range(0, len(frames), chunk), desc="encoding the data set"):
        batch = frames_to_tensor(frames[start:start + chunk])
        with torch.no_grad(), devices.autocast(device, precision):
            latents.append(autoencoder.encode(batch).float())
    return torch.cat(latents)


def train(config: LatentProbeConfig, autoencoder: FrameAutoencoder, expert: DiffusionExpert, ema: DiffusionExpert,
          streams: Streams) -> None:
    source = open_data_source(config.data, seed=config.seed)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(config.out_dir) / "train_log.csv"
    device = devices.resolve_device("cpu")
    precision = devices.resolve_precision(config.precision, device, cpu_auto="bf16")

    def batch(size: int, length: int) -> tuple:
        return clips_to_tensors(source.sample_clips(size, length, streams.rng))

    ae_optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config.ae_lr)

    def ae_step(step: int) -> float:
        frames = batch(config.ae_batch // 4, 5)[0].flatten(0, 1)  # 4 frames of each of ae_batch / 4 clips
        with devices.autocast(device, precision):
            latents = autoencoder.encode(frames)
            half = latents.shape[0] // 2
            noise = devices.randn(latents[half:].shape, streams.generator) * config.ae_latent_noise
            latents = torch.cat([latents[:half], (latents[half:] + noise).clamp(-1, 1)])
            decoded = autoencoder.decode(latents)
        loss = F.mse_loss(decoded, frames) + 0.1 * (decoded - frames).abs().mean()
        ae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ae_optimizer.step()
        return loss.detach().item()

    _train_loop("autoencoder", config.ae_minutes, run_dir / "autoencoder.pt", {"autoencoder": autoencoder},
                ae_optimizer, ae_step, config, streams, log_path)
    autoencoder.requires_grad_(False).eval()

    optimizer = torch.optim.AdamW(expert.parameters(), lr=config.lr)
    k = expert.context_frames
    finished = _load_state(run_dir / "diffusion.pt")
    table = (None if finished is not None and finished.get("done")  # a finished stage is loaded, not retrained
             else encode_dataset(source, autoencoder, device, precision))  # every frame encoded once, as latent models do
    offsets = source.dataset._frame_offsets

    def diffusion_step(step: int) -> float:
        clips = source.sample_clips(config.batch_size, k + 2, streams.rng)
        _, actions, _ = clips_to_tensors(clips)
        index = (offsets[clips["episode"]] + clips["start"])[:, None] + np.arange(1, k + 2)  # without the first frame
        latents = table[torch.from_numpy(index)]
        warm = min(1.0, (step + 1) / 200)  # linear warm-up, then the constant rate
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm
        with devices.autocast(device, precision):
            loss = expert.loss(latents, actions, drop_prob=config.drop_prob, generator=streams.generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for target, online in zip(ema.parameters(), expert.parameters()):
                target.lerp_(online, 1 - config.ema_decay)
        return loss.detach().item()

    _train_loop("latent diffusion", config.minutes, run_dir / "diffusion.pt", {"expert": expert, "ema": ema},
                optimizer, diffusion_step, config, streams, log_path)


def evaluate_probe(config: LatentProbeConfig, autoencoder: FrameAutoencoder, expert: DiffusionExpert) -> list[dict]:
    source = open_data_source(config.eval_data, seed=config.eval_seed)
    k = expert.context_frames
    clips = source.sample_clips(config.clips, k + 2, np.random.default_rng(config.eval_seed))
    tensors = clips_to_tensors(clips)
    frames, actions, _ = tensors
    device = devices.resolve_device("cpu")
    precision = devices.resolve_precision(config.precision, device, cpu_auto="bf16")
    sampler = SamplerConfig(steps=config.sampler_steps)
    generator = torch.Generator().manual_seed(config.eval_seed)
    predicted, floor = [], []
    for start in tqdm(range(0, len(frames), 32), desc="held-out clips"):
        sl = slice(start, start + 32)
        with torch.no_grad(), devices.autocast(device, precision):
            latents = autoencoder.encode_clips(frames[sl])
            state = expert.prepare(latents[:, :k], actions[sl])
            sampled = sample(lambda x, t, state=state: expert.predict_eps(state, x, t), tuple(latents[:, k].shape),
                             expert.schedule, sampler, generator)
            predicted.append(autoencoder.decode(sampled).clamp(-1, 1).float())
            floor.append(autoencoder.decode(latents[:, k]).clamp(-1, 1).float())
    predicted, floor = torch.cat(predicted), torch.cat(floor)
    kinds = transition_kinds(clips, data_env_name(source, config.eval_data))
    lpips = get_lpips(device="cpu")
    rows = [{"model": "latent base", **row} for row in score_by_kind(predicted, tensors, k, kinds, lpips)]
    rows += [{"model": "autoencoder floor", **row} for row in score_by_kind(floor, tensors, k, kinds, lpips)]
    out = Path(config.out_dir)
    _save_examples(predicted[:8], frames[:8, k], frames[:8, k - 1], out / "latent_probe_examples.png")
    _save_examples(floor[:8], frames[:8, k], frames[:8, k - 1], out / "latent_probe_floor_examples.png")
    return rows


def run(config: LatentProbeConfig) -> list[dict]:
    if not config.data or config.data.startswith("online:"):
        raise ValueError(f"data={config.data!r}: the probe trains on a recorded Memory Maze data set (its frames are "
                         "encoded once); collect one with `python -m come_rl.collect env=memory_maze episodes=24 "
                         "steps=1000 seed=20000 out=data/maze_train` and pass data=data/maze_train")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    streams = Streams(np.random.default_rng(config.seed), torch.Generator().manual_seed(config.seed))
    autoencoder, expert = FrameAutoencoder(config.latent_channels, config.ae_width), latent_expert(config)
    ema = latent_expert(config)
    ema.load_state_dict(expert.state_dict())
    ema.requires_grad_(False)
    train(config, autoencoder, expert, ema, streams)
    out = Path(config.out_dir)
    ema.eval()
    if (out / "train_log.csv").is_file():
        plot_training(out / "train_log.csv", out / "latent_probe_training.png")
    rows = evaluate_probe(config, autoencoder, ema)
    parameters = sum(p.numel() for p in expert.parameters()) / 1e6
    ae_parameters = sum(p.numel() for p in autoencoder.parameters()) / 1e6
    settings = " ".join(f"{key}={value}" for key, value in dataclasses.asdict(config).items())
    write_table(out / "latent_probe.csv", rows, md_path=out / "latent_probe.md",
                title=f"Latent maze base, one step on {config.clips} held-out clips ({config.eval_data} seed "
                      f"{config.eval_seed}), {config.sampler_steps}-step DDIM, vs copy-last-frame; U-Net "
                      f"{parameters:.2f}M on 16x16x{config.latent_channels} latents, autoencoder {ae_parameters:.2f}M, "
                      f"{config.ae_minutes} + {config.minutes} CPU-min (`python -m come_rl.experiments.latent_probe "
                      f"{settings}`)")
    return rows


def plot_training(log_path: Path, png: Path) -> None:
    """The loss of each stage against training minutes (``train_log.csv``) -> ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, rows = read_rows(log_path)
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    figure, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        points = [(float(r["minutes"]), float(r["loss"])) for r in rows if r["stage"] == stage]
        axis.plot(*zip(*points))
        axis.set(title=stage, xlabel="training minutes (1 CPU thread)", ylabel="loss", yscale="log")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, LatentProbeConfig)
    for row in run(config):
        print(row)


if __name__ == "__main__":
    main()
