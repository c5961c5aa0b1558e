"""Train one expert of the world model on recorded (or freshly generated) episodes.

Usage:
    python -m come_rl.train model=unet_cards data=online:memory_cards out=runs/cards_base minutes=30
    python -m come_rl.train model=unet_maze data=/path/to/collected/memory_maze out=runs/maze_base minutes=60

    torchrun --nproc_per_node=8 -m come_rl.train model=dit_b_maze data=/path/to/memory_maze batch_size=256 device=cuda

Every ``key=value`` sets a field of :class:`TrainConfig`. Training shows a tqdm bar, writes atomic checkpoints every
``checkpoint_seconds`` (weights + EMA + optimiser + data RNG + the online episode pool's state), and resumes from
``out`` when it is run again with the same ``out`` -- kill it at any time: the resumed run trains the weights an
uninterrupted one does, and ``train_log.csv`` (one row per ``log_every`` steps) loses the rows of the steps it trains
again. At the end it writes a GIF of samples vs ground truth and the held-out evaluation (``come_rl.evaluate``) next
to the checkpoint.

Devices (``come_rl.devices``): ``device=auto|cpu|cuda|cuda:N`` (auto: CUDA when present), ``precision=auto|fp32|bf16``
(auto: bf16 autocast on CUDA, fp32 on the CPU), ``compile=true`` for torch.compile.

Distributed training: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins a process group (gloo on the CPU, NCCL
on CUDA, each rank on ``cuda:LOCAL_RANK``) and trains the network wrapped in DistributedDataParallel. ``batch_size`` is
the global batch of one optimizer step: every rank draws the same global batch of clips and noise from the same seeded
generators (so the generators, the online pool and the checkpoint are identical on every rank) and trains on its own
rows, ``batch_size / (world size x grad_accum_steps)`` clips per micro-batch; DDP averages the gradients. N processes
therefore train the weights one process does (to float rounding), a killed run resumes with the same world size or
another, and changing the number of GPUs needs no new learning rate. Rank 0 alone reads the resume state (and sends
it to the others), writes checkpoints and logs. A rank that dies or stalls (its node gone, a hung GPU) does not leave
the others waiting on a collective forever: each waits at most ``dist_timeout_s`` seconds, then fails with an error
that names the step and says to rerun the command, which resumes from the last checkpoint (torchrun stops the other
ranks when one fails).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from come_rl import devices
from come_rl.checkpoint import expert_spec, load_expert, save_expert, torch_save_atomic
from come_rl.cli_args import parse_cli
from come_rl.data_sources import BatchStream, open_data_source
from come_rl.diffusion import build_schedule, sample_noise_levels
from come_rl.distill import distillation_target, grid_levels
from come_rl.shortcut import check_max_steps, draw_step_counts, shortcut_batch
from come_rl.experts.expert import DiffusionExpert
from come_rl.io_utils import atomic_write_text
from come_rl.nets.registry import MODEL_PRESETS, build_backbone
from come_rl.visualize import rollout_comparison, save_rollout_gif
from come_rl.world_model import WorldModel


@dataclass
class TrainConfig:
    """Fields settable as key=value on the command line."""

    model: str = "unet_cards"
    """a training preset (come_rl.nets.registry.MODEL_PRESETS) or a backbone registry name (unet, dit_cpu, ...)."""
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
    lr_decay: str = "none"
    """"none": lr after warm-up to the end; "cosine": lr falls on a half cosine from the end of warm-up to
    ``lr_final`` x lr at ``steps`` (needs a finite ``steps``; step-based, so a resumed run follows the same curve)."""
    lr_final: float = 0.05
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    drop_prob: float = 0.1
    """condition dropout: the share of rows trained in the unconditional mode (the composition's baseline)."""
    schedule: str = "cosine"
    target: str = "full"
    """what the expert denoises: "full" (the next frame; the default) or "residual" (its change to the last frame)."""
    prediction: str = "v"
    """what the network outputs: "v" (v-prediction; the default) or "x0" (the clean target, with the capped v-loss;
    see come_rl.experts.expert)."""
    context_noise: float = 0.0
    """> 0: context-noise augmentation (UNet presets): each clip's context frames get Gaussian noise of a level drawn
    from U[0, context_noise] (frames in [-1, 1]) and the network is told the level (UNetConfig.context_noise, switched
    on by this key), the cure for autoregressive drift; 0: clean contexts."""
    threads: int = 2
    seed: int = 0
    checkpoint_seconds: float = 120.0
    dist_timeout_s: float = 600.0
    """under torchrun: the longest a rank waits on a collective for the others (a dead or stalled rank) before it fails
    with a resume hint; above the longest step and checkpoint write of a healthy run."""
    log_every: int = 50
    """steps per row of train_log.csv (step, seconds, mean loss over those steps)."""
    pose_features: bool = False
    """condition on absolute pose features (SLTM)."""
    retrieval_stale_fraction: float = 0.0
    """a retrieving expert (come_rl.experts.retrieval): the share of training clips whose past frames are the frames
    s steps earlier (s uniform in 1 .. retrieval_max_stale), actions and poses true, as a rollout's drifted frames are,
    so the expert learns to trust the retrieved view; 0: real past frames only."""
    retrieval_max_stale: int = 32
    retrieval_blind: bool = False
    """a retrieving expert without past frames (UNetConfig.retrieval_blind): every context slot holds the retrieved
    view, in training and sampling, so it cannot drift with its own frames."""
    same_view_fraction: float = 0.0
    """> 0 (an STM on episodes with poses): this share of each batch is clips whose target's view only a context frame
    older than the last three saw (within 0.15 cell and 10 degrees, ``come_rl.data.same_view``): the ~10 % of maze steps
    where the window holds what the last frames miss. 0: uniform clips."""
    stale_recent_fraction: float = 0.0
    """> 0 (an STM): this share of the rows shows its newest context frames stale, each the frame some steps before
    it (``come_rl.data.same_view.StaleRecentClips``), as a rollout's own frames lag the motion while the window's
    older frames stay true; actions and target true. 0: true contexts."""
    stale_recent_max: int = 12
    """the most newest context frames made stale in such a row (uniform in 1 .. this; <= context_frames)."""
    stale_recent_told: bool = False
    """with ``stale_recent_fraction``: the STM (a window recall) is told how many of its newest context frames are
    stale (its context level, ``UNetConfig.staleness_levels`` = its context length; sampling tells it how many are
    imagined) and its recall learns a score for them, so that true contexts keep teaching its one-step behaviour
    and stale ones when to read the window's older real frames. false: not told."""
    stale_recent_steps: int = 4
    """the most steps a stale frame lags (uniform in 1 .. this)."""
    recall_key_lr: float = 1e-2
    """the learning rate of a window recall's keys (``UNetConfig.window_recall``: a small MLP of the actions since each
    context frame), on the same warm-up and decay as ``lr``: at the rest of the network's rate (1e-4 for a warm start)
    they had not moved after 500 steps."""
    recall_lr: float = 0.0
    """the learning rate of a window recall's input convolution (what the recalled view adds to the first layer,
    zero-initialised), on the same warm-up and decay as ``lr``. 0: ``lr``. At a warm start's 1e-4 its weights reached a
    norm of 0.23 in 2.4k steps against 2.4-2.6 for each of the last three context slots (results/stm_context)."""
    backbone_overrides: dict = field(default_factory=dict)
    online_episodes: int = 0
    """size of the episode pool for online:<env> data (0: the env's default, 1024 for memory_cards, 4 episodes of
    1000 steps for memory_maze)."""
    half_weights: bool = False
    """store the shipped weights in float16 (halves the file)."""
    init_from: str = ""
    """warm start: an expert checkpoint (directory, or directory/role, e.g. come_rl/checkpoints/memory_cards/base)
    whose weights start this expert, so that it begins as that expert (see :func:`warm_start`)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N; under torchrun every rank uses cuda:LOCAL_RANK."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (CUDA only)."""
    compile: bool = False
    """torch.compile the backbone (opt-in: the first steps pay the compilation)."""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step; each holds batch_size / (world size x grad_accum_steps) clips per rank."""
    distill_from: str = ""
    """progressive distillation (``come_rl.distill``): a teacher expert checkpoint (directory, or directory/role). The
    student starts as a copy of it (same network, target and prediction; ``model`` / ``target`` / ``prediction`` /
    ``init_from`` do not apply) and learns to take in one DDIM step what the teacher takes in two; sample it with
    ``distill_steps`` steps. "": ordinary training."""
    distill_steps: int = 0
    """the student's DDIM steps (the teacher's are twice as many); needs ``distill_from``."""
    shortcut_fraction: float = 0.0
    """> 0: shortcut training (``come_rl.shortcut``): this fraction of each batch learns few-step denoising from the
    model's own two half steps, the rest takes the plain loss; the U-Net is built step-conditioned (warm-start it from a
    plain expert with ``init_from``). 0: ordinary training."""
    shortcut_max_steps: int = 4
    """the most DDIM steps a self-consistency row is trained for (a power of two: rows draw 1, 2, ..., this)."""
    data_workers: int = -1
    """1: a background thread makes the next batches (clips, tensors, noise; pinned for a GPU) while a step trains;
    0: made in the loop; -1 (auto): 1 on CUDA, 0 on the CPU (there a batch costs ~5 % of a step and the thread would
    take a core from the step). The same batches either way."""


def parse_overrides(argv: list[str], config_cls=TrainConfig):
    """``key=value`` arguments -> a :class:`TrainConfig` (or ``config_cls``), exiting with the error on a bad one."""
    return parse_cli(argv, config_cls)


def build_expert(config: TrainConfig, action_dim: int, frame_size: int) -> tuple[DiffusionExpert, str, dict]:
    if config.model in MODEL_PRESETS:
        name, kwargs = MODEL_PRESETS[config.model]
        kwargs = dict(kwargs)
    else:
        name, kwargs = config.model, {}
    kwargs.update(config.backbone_overrides)
    if config.shortcut_fraction > 0:
        if name != "unet":
            raise ValueError(f"shortcut_fraction needs a U-Net model (unet_* presets), got {config.model}")
        kwargs["step_conditioned"] = True
    if kwargs.get("action_dim", action_dim) != action_dim:
        raise ValueError(f"model {config.model} expects action_dim {kwargs['action_dim']} but the data has {action_dim}")
    if kwargs.get("frame_size", frame_size) != frame_size:
        raise ValueError(f"model {config.model} expects frames of {kwargs['frame_size']} px but the data has {frame_size}")
    kwargs["action_dim"], kwargs["frame_size"] = action_dim, frame_size
    if config.pose_features:
        kwargs["pose_dim"] = 4
    if config.context_noise < 0:
        raise ValueError(f"context_noise must be >= 0 (a noise level for the context frames), got {config.context_noise}")
    if config.context_noise > 0:
        if name != "unet":
            raise ValueError(f"context_noise needs a U-Net model (unet_* presets), got {config.model}")
        kwargs["context_noise"] = True
    if config.retrieval_stale_fraction > 0:  # the expert is told how stale its past frames are (come_rl.experts.retrieval)
        if name != "unet" or not kwargs.get("retrieval"):
            raise ValueError(f"retrieval_stale_fraction is for a retrieving U-Net (model=unet_maze_retrieval); "
                             f"model={config.model} does not retrieve")
        if config.context_noise > 0:
            raise ValueError("context_noise and retrieval_stale_fraction both use the context level: pick one")
        kwargs["context_noise"], kwargs["staleness_levels"] = True, config.retrieval_max_stale
    if config.stale_recent_told:
        if config.stale_recent_fraction <= 0:
            raise ValueError("stale_recent_told tells an STM about its stale frames: set stale_recent_fraction > 0 too")
        if name != "unet" or not kwargs.get("window_recall"):
            raise ValueError(f"stale_recent_told is for an STM with a window recall (a U-Net with window_recall=true); "
                             f"model={config.model} has none: add backbone_overrides with window_recall=true")
        if config.context_noise > 0:
            raise ValueError("context_noise and stale_recent_told both use the context level: pick one")
        kwargs["context_noise"], kwargs["staleness_levels"] = True, int(kwargs.get("context_frames", 3))
    if config.retrieval_blind:
        if name != "unet" or not kwargs.get("retrieval"):
            raise ValueError(f"retrieval_blind is for a retrieving U-Net (model=unet_maze_retrieval); "
                             f"model={config.model} does not retrieve")
        kwargs["retrieval_blind"] = True
    backbone = build_backbone(name, **kwargs)
    if getattr(backbone, "pose_dim", 0) and not config.pose_features:
        raise ValueError(f"model {config.model} is pose-conditioned (pose_dim={backbone.pose_dim}) but pose_features is "
                         f"false: it would train without its poses; add pose_features=true (and role=sltm)")
    expert = DiffusionExpert(backbone, build_schedule(config.schedule), name=config.role, uses_poses=config.pose_features,
                             target=config.target, prediction=config.prediction)
    return expert, name, kwargs


# ------------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun job; a plain process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context(environ: dict | None = None) -> DistributedContext:
    """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (absent: a single process)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ValueError(f"bad torchrun environment (WORLD_SIZE={environ.get('WORLD_SIZE')!r}, "
                         f"RANK={environ.get('RANK')!r}, LOCAL_RANK={environ.get('LOCAL_RANK')!r}): {error}") from error
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"bad torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world)


def training_device(device: str, context: DistributedContext) -> torch.device:
    """The device this rank trains on: ``come_rl.devices.resolve_device``, and ``cuda:LOCAL_RANK`` under torchrun."""
    text = str(device).strip().lower()
    if context.world_size > 1 and text.startswith("cuda:"):
        raise ValueError(f"device={text} under torchrun: every rank trains on cuda:LOCAL_RANK; pass device=cuda (or "
                         f"auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if context.world_size > 1 and text in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if context.local_rank >= count:
            raise ValueError(f"LOCAL_RANK={context.local_rank} but only {count} CUDA device(s) are visible; run "
                             f"torchrun with --nproc_per_node <= {count}")
        return torch.device("cuda", context.local_rank)
    return devices.resolve_device(text)


def micro_batch_size(config: TrainConfig, world_size: int) -> int:
    """Clips per rank and micro-batch: batch_size / (world size x grad_accum_steps), which must divide evenly."""
    if isinstance(config.grad_accum_steps, bool) or not isinstance(config.grad_accum_steps, int) \
            or config.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an integer >= 1, got {config.grad_accum_steps!r}")
    shards = world_size * config.grad_accum_steps
    if config.batch_size < 1 or config.batch_size % shards:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by world size {world_size} x "
                         f"grad_accum_steps {config.grad_accum_steps} = {shards}: batch_size is the global batch of "
                         f"one optimizer step, split evenly over ranks and micro-batches; pick a multiple of {shards}")
    return config.batch_size // shards


def shard_rows(micro_step: int, context: DistributedContext, micro_batch: int) -> slice:
    """This rank's rows of the global batch in micro-step ``micro_step``: micro-batch-major, then rank."""
    start = (micro_step * context.world_size + context.rank) * micro_batch
    return slice(start, start + micro_batch)


def draw_training_noise(batch_size: int, frame_shape: tuple[int, ...], drop_prob: float,
                        generator: torch.Generator, context_noise: float = 0.0, context_frames: int = 0) -> tuple:
    """Noise levels t, noise eps and the condition-dropped rows of a global batch, drawn (on the CPU) in the order
    ``DiffusionExpert.loss`` draws them: a single process trains exactly what it trained before ranks existed.
    With ``context_noise`` > 0 also each row's context-noise level and the context noise (B, K, C, H, W)."""
    t = sample_noise_levels(batch_size, generator=generator)
    eps = devices.randn((batch_size, *frame_shape), generator)
    drop = devices.rand((batch_size,), generator) < drop_prob if drop_prob > 0 else None
    if context_noise <= 0:
        return t, eps, drop
    level = devices.rand((batch_size,), generator) * context_noise
    return t, eps, drop, level, devices.randn((batch_size, context_frames, *frame_shape), generator)


def training_step(expert: DiffusionExpert, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batch: tuple, noise: tuple, config: TrainConfig, context: DistributedContext, micro_batch: int,
                  device: torch.device, precision: str, step: int, teacher: DiffusionExpert | None = None) -> float:
    """One optimizer step on the global ``batch`` (frames, actions, poses) with its ``noise`` (t, eps, drop).

    This rank runs its rows of each of the ``grad_accum_steps`` micro-batches (gradients of loss / accumulation summed
    locally; DistributedDataParallel averages them over ranks at the last one), clips the gradient norm to 1 and steps
    the optimizer. Returns the global batch's mean loss, the same number on every rank; a non-finite loss raises on
    every rank, before the weights change. With a ``teacher`` (distillation) the levels are moved to the student's
    DDIM grid and each row regresses the teacher's two-step target (``come_rl.distill``).
    """
    frames, actions, poses = batch
    t, eps, drop, *context_noise = noise  # (level, context eps) with context-noise augmentation
    targets, step_sizes = None, None
    if teacher is not None:
        t = grid_levels(t, config.distill_steps)
        with devices.autocast(device, precision):
            targets = distillation_target(teacher, frames, actions, poses, t, eps, drop, config.distill_steps)
    elif config.shortcut_fraction > 0:  # come_rl.shortcut: its own rows, drawn per step (a resumed run draws the same)
        counts = draw_step_counts(len(t), config.shortcut_fraction, config.shortcut_max_steps,
                                  torch.Generator().manual_seed(config.seed * 1_000_003 + step))
        with devices.autocast(device, precision):
            t, targets, step_sizes = shortcut_batch(expert, frames, actions, poses, t, eps, drop, counts,
                                                    config.shortcut_max_steps)
    accumulation = config.grad_accum_steps
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro_step in range(accumulation):
        rows = shard_rows(micro_step, context, micro_batch)
        no_sync = isinstance(network, DistributedDataParallel) and micro_step < accumulation - 1
        with network.no_sync() if no_sync else contextlib.nullcontext():
            with devices.autocast(device, precision):
                loss = expert.loss(frames[rows], actions[rows], None if poses is None else poses[rows], t=t[rows],
                                   eps=eps[rows], drop=None if drop is None else drop[rows], network=network,
                                   distill_target=None if targets is None else targets[rows],
                                   step=None if step_sizes is None else step_sizes[rows],
                                   **({"context_level": context_noise[0][rows],
                                       "context_eps": None if context_noise[1] is None else context_noise[1][rows]}
                                      if context_noise else {}))
            (loss / accumulation).backward()
        total += loss.detach().float() / accumulation
    if context.world_size > 1:
        dist.all_reduce(total)
        total /= context.world_size
    value = total.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value} at step {step}; lower lr= and resume")
    torch.nn.utils.clip_grad_norm_(expert.backbone.parameters(), 1.0)
    optimizer.step()
    return value


def _is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a process group's (a peer gone, a timeout) rather than the training's own."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(mark in text for mark in ("gloo", "nccl", "timed out", "timeout", "connection", "pair closure",
                                         "broken pipe", "peer"))


def _max_over_ranks(value: float, context: DistributedContext, device: torch.device) -> float:
    """The largest ``value`` of all ranks (ranks decide together when the time budget is spent)."""
    if context.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _load_resume_state(state_path: Path, context: DistributedContext, device: torch.device) -> dict | None:
    """Rank 0 reads the training state (None: a fresh start) and sends it to every rank, so that all ranks resume
    from one file even without a shared file system; a file that cannot be read fails on every rank, no hang."""
    payload: dict = {"state": None}
    if context.is_main and state_path.exists():
        try:
            payload = {"state": torch.load(state_path, map_location="cpu", weights_only=False)}
        except Exception as error:  # a corrupt file must not silently restart training from scratch
            payload = {"error": f"cannot resume from {state_path} ({error}); delete it to start over"}
    if context.world_size > 1:
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        payload = box[0]
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["state"]


def _cpu_state(state: dict) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


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


def warm_start(expert: DiffusionExpert, source: str | Path) -> str:
    """Start ``expert`` from the weights of the expert checkpoint ``source``, so that it predicts what that one predicts.

    Every tensor whose name and shape match is copied. The one that grows with the context (a U-Net's ``in_context``,
    whose input channels are the context frames, oldest first) takes the source's weights on its newest frames and
    zeros on the older ones; a layer the source lacks (e.g. the pose embedding of a spatial expert) is zeroed. The
    warm-started expert therefore begins as exactly the source expert (tested) and training teaches it only what its
    longer context or its poses add: the inductive bias a CPU budget needs, since the base took the longest to train.
    ``source`` is an expert checkpoint directory (its base) or ``directory/role``.
    """
    path = Path(source)
    directory, role = (path, "base") if path.is_dir() else (path.parent, path.name)
    if not directory.is_dir():
        raise FileNotFoundError(f"init_from={source}: no checkpoint directory {directory}; pass a directory such as "
                                f"come_rl/checkpoints/memory_cards/base")
    donor, spec = load_expert(directory, role)
    if donor.target != expert.target:
        raise ValueError(f"init_from={source} predicts the {donor.target} target but this expert is trained on the "
                         f"{expert.target} target; pass target={donor.target} or another checkpoint")
    if donor.prediction != expert.prediction:
        raise ValueError(f"init_from={source} outputs {donor.prediction} but this expert is trained to output "
                         f"{expert.prediction}; pass prediction={donor.prediction} or another checkpoint")
    mine, theirs = expert.backbone.state_dict(), donor.backbone.state_dict()
    has_warp = getattr(expert.backbone, "warp", None) is not None
    donor_warp = getattr(donor.backbone, "warp", None) is not None
    # Frame inputs of the context convolution: the context frames, plus the warped frame when both have a motion prior.
    mine_inputs = expert.context_frames + (1 if has_warp and donor_warp else 0)
    their_inputs = donor.context_frames + (1 if has_warp and donor_warp else 0)
    copied, widened, zeroed, kept, initialised = 0, [], [], [], []
    with torch.no_grad():
        for name, tensor in mine.items():
            if name in theirs and theirs[name].shape == tensor.shape:
                tensor.copy_(theirs[name].to(tensor.dtype))
                copied += 1
            elif name.startswith(("warp.", "recall.")) and name not in theirs:
                # A motion prior (or a window recall) the source lacks keeps its initialisation: the warp's last layer
                # starts at zero, so the warp starts as the identity and the warped-frame input below starts with zero
                # weights; the recall's convolution starts at zero (its keys need their random start to learn).
                initialised.append(name)
            elif (name == "in_context.weight" and getattr(expert.backbone, "warp", None) is not None
                  and getattr(donor.backbone, "warp", "absent") is None and name in theirs
                  and tensor.shape[1] == theirs[name].shape[1] * (expert.context_frames + 1) // expert.context_frames
                  and tensor.shape[0] == theirs[name].shape[0]):
                tensor.zero_()
                tensor[:, :theirs[name].shape[1]] = theirs[name].to(tensor.dtype)  # the context frames; warped: 0
                widened.append(name)
            elif (name in theirs and tensor.dim() == 4 and theirs[name].dim() == 4
                  and theirs[name].shape[0] == tensor.shape[0] and theirs[name].shape[2:] == tensor.shape[2:]
                  and tensor.shape[1] > theirs[name].shape[1]
                  and tensor.shape[1] % mine_inputs == 0 and theirs[name].shape[1] % their_inputs == 0
                  and tensor.shape[1] // mine_inputs == theirs[name].shape[1] // their_inputs):
                # Inputs are frame-major (oldest context frame first, the warped frame last when both have one), so
                # the source's inputs land on the newest frames (and the warped frame) and the older ones start at 0.
                tensor.zero_()
                tensor[:, -theirs[name].shape[1]:] = theirs[name].to(tensor.dtype)  # the newest frames
                widened.append(name)
            elif name not in theirs and tensor.is_floating_point():
                tensor.zero_()
                zeroed.append(name)
            else:
                kept.append(name)
    if kept:
        raise ValueError(f"init_from={source}: {len(kept)} tensors of this {spec['backbone']} expert cannot take the "
                         f"source's weights (e.g. {kept[:3]}); warm start needs the same backbone with the same widths")
    return (f"{copied} tensors copied, {len(widened)} widened to {expert.context_frames} context frames "
            f"({', '.join(widened) or 'none'}), {len(zeroed)} new tensors zeroed ({', '.join(zeroed) or 'none'})"
            + (f", {len(initialised)} motion-prior / recall tensors initialised" if initialised else ""))


def check_distillation(config: TrainConfig) -> None:
    """Refuse a distillation asked for half-way, before any work."""
    if bool(config.distill_from) != (config.distill_steps != 0):
        raise ValueError(f"distillation needs both distill_from=<teacher checkpoint> and distill_steps=<student DDIM "
                         f"steps >= 1>, got distill_from={config.distill_from!r}, distill_steps={config.distill_steps}")
    if config.distill_from and (isinstance(config.distill_steps, bool) or config.distill_steps < 1):
        raise ValueError(f"distill_steps must be an integer >= 1 (the student's DDIM steps), got {config.distill_steps}")
    if not 0.0 <= config.shortcut_fraction < 1.0:
        raise ValueError(f"shortcut_fraction must be in [0, 1) (the rest of each batch keeps the plain loss the memory "
                         f"is trained by), got {config.shortcut_fraction}")
    if config.shortcut_fraction > 0:
        check_max_steps(config.shortcut_max_steps)
        if config.distill_from or config.context_noise > 0:
            raise ValueError("shortcut_fraction > 0 trains its own few-step path: not with distill_from or "
                             "context_noise > 0")
    if config.distill_from and config.context_noise > 0:
        raise ValueError("distillation with context_noise > 0 is not supported: the teacher sees clean contexts; set "
                         "context_noise=0")


def load_teacher(config: TrainConfig, action_spec, frame_size: int) -> tuple[DiffusionExpert, str, dict]:
    """The teacher expert of ``distill_from`` (directory, or directory/role), checked against the data: the same
    frame size and action space, and the role this run trains."""
    path = Path(config.distill_from)
    directory, role = (path, config.role) if path.is_dir() and (path / f"{config.role}.json").is_file() else (
        path.parent, path.name)
    if not directory.is_dir():
        raise FileNotFoundError(f"distill_from={config.distill_from}: no checkpoint directory {directory}; pass a "
                                f"trained expert, e.g. come_rl/checkpoints/memory_cards (or .../base)")
    teacher, spec = load_expert(directory, role)
    if spec.get("frame_size") not in (None, frame_size):
        raise ValueError(f"distill_from={config.distill_from} is a {spec['frame_size']}x{spec['frame_size']} model but "
                         f"data={config.data} has {frame_size}x{frame_size} frames; distill on the data it was trained on")
    teacher_actions = spec.get("action_spec")
    if teacher_actions is not None and (teacher_actions.get("kind"), teacher_actions.get("dim")) != (
            action_spec.kind, action_spec.dim):
        raise ValueError(f"distill_from={config.distill_from} takes {teacher_actions.get('kind')} actions of dimension "
                         f"{teacher_actions.get('dim')} but data={config.data} has {action_spec.kind} actions of "
                         f"dimension {action_spec.dim}; distill on the data it was trained on")
    if spec["role"] != config.role:
        raise ValueError(f"distill_from={config.distill_from} is a {spec['role']} expert; pass role={spec['role']}")
    return teacher, spec["backbone"], spec["backbone_kwargs"]


def distillation_record(config: TrainConfig, teacher: DiffusionExpert) -> dict:
    """What a student's recipe says of its teacher (a resumed run must match it)."""
    return {"teacher": str(config.distill_from), "teacher_sha256": (teacher.spec or {}).get("sha256"),
            "teacher_steps": 2 * config.distill_steps, "student_steps": config.distill_steps}


def parameter_groups(backbone: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the network at ``lr``; a window recall's keys at ``recall_key_lr`` and, with
    ``recall_lr`` > 0, its input convolution at ``recall_lr`` (each as ``lr_scale``, a factor on the scheduled ``lr``,
    so warm-up and decay apply to every group). Empty groups are left out."""
    keys, conv, others = [], [], []
    for name, param in backbone.named_parameters():
        if name.startswith(("recall.key.", "recall.none", "recall.stale")):
            keys.append(param)
        elif name.startswith("recall.conv.") and config.recall_lr > 0:
            conv.append(param)
        else:
            others.append(param)
    return ([{"params": others}] + ([{"params": keys, "lr_scale": config.recall_key_lr / config.lr}] if keys else [])
            + ([{"params": conv, "lr_scale": config.recall_lr / config.lr}] if conv else []))


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of ``step``: linear warm-up over ``warmup_steps``, then constant or a cosine decay to
    ``lr_final`` x ``lr`` at ``steps`` (``lr_decay``)."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_decay == "none" or step < config.warmup_steps:
        return config.lr * warm
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_lr_schedule(config: TrainConfig) -> None:
    if config.lr_decay not in ("none", "cosine"):
        raise ValueError(f"lr_decay must be none or cosine, got {config.lr_decay!r}")
    if config.lr_decay == "cosine" and config.steps >= 10**9:
        raise ValueError("lr_decay=cosine decays over steps=: give the run's step count (e.g. steps=20000); "
                         "minutes= still stops it early")
    if not 0.0 <= config.lr_final <= 1.0:
        raise ValueError(f"lr_final must be in [0, 1] (a fraction of lr), got {config.lr_final}")


@dataclass
class TrainResult:
    """What :func:`train_expert` leaves: the checkpoint directory and this rank's trained expert."""

    out: Path
    expert: DiffusionExpert
    step: int
    context: DistributedContext


def train(config: TrainConfig) -> Path:
    """Train (or resume) the expert of ``config``; returns the checkpoint directory."""
    return train_expert(config).out


def train_expert(config: TrainConfig) -> TrainResult:
    """:func:`train`, returning this rank's expert as well (the distributed tests compare the ranks' weights)."""
    if config.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {config.log_every}")
    check_distillation(config)
    check_lr_schedule(config)
    if not config.recall_key_lr > 0:
        raise ValueError(f"recall_key_lr must be > 0 (the window recall keys' learning rate), got {config.recall_key_lr}")
    if not config.recall_lr >= 0:
        raise ValueError(f"recall_lr must be >= 0 (the window recall convolution's learning rate; 0: lr), got "
                         f"{config.recall_lr}")
    if not 0.0 <= config.same_view_fraction <= 1.0:
        raise ValueError(f"same_view_fraction must be in [0, 1] (the share of each batch of same-view clips), got "
                         f"{config.same_view_fraction}")
    if not 0.0 <= config.stale_recent_fraction <= 1.0:
        raise ValueError(f"stale_recent_fraction must be in [0, 1] (the share of rows with stale newest context "
                         f"frames), got {config.stale_recent_fraction}")
    if not config.dist_timeout_s > 0:
        raise ValueError(f"dist_timeout_s must be > 0 seconds (how long a rank waits for the others), got "
                         f"{config.dist_timeout_s}")
    context = distributed_context()
    micro_batch = micro_batch_size(config, context.world_size)
    device = training_device(config.device, context)
    precision = devices.resolve_precision(config.precision, device)
    joined = context.world_size > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=config.dist_timeout_s))
    finished = False
    try:
        result = _train(config, context, micro_batch, device, precision)
        finished = True
        return result
    except (RuntimeError, dist.DistError) as error:
        if context.world_size > 1 and _is_collective_failure(error):
            raise RuntimeError(
                f"rank {context.rank}: a collective with the other ranks failed or waited more than dist_timeout_s="
                f"{config.dist_timeout_s:g} s (another rank died or stalled: {str(error).splitlines()[0][:200]}). What "
                f"was last checkpointed in out={config.out} is kept; run the same command again to resume from there"
            ) from error
        raise
    finally:
        if joined:
            # DDP's reducer (kept alive by reference cycles) must go while its process group still exists: freed at
            # interpreter exit instead, its gloo threads abort the process ("terminate called without an active
            # exception", seen on a loaded 2-core machine)
            gc.collect()
            if finished:  # the other ranks wait for rank 0's checkpoint and GIF: no rank leaves while gloo talks
                dist.barrier()
            dist.destroy_process_group()


def _train(config: TrainConfig, context: DistributedContext, micro_batch: int, device: torch.device,
           precision: str) -> TrainResult:
    main = context.is_main
    out = Path(config.out)
    if main:
        from come_rl.locks import hold_directory

        hold_directory(out, f"come_rl.train role={config.role}")  # one training run per out= (come_rl.locks)
        remove_stray_files(out, config.role)
    source = open_data_source(config.data, seed=config.seed, online_episodes=config.online_episodes)
    # Set once the input is known good: a refused call leaves the process's thread count alone (a test session that
    # checks bad input and then runs at 1 thread on a loaded 2-core machine was 100x slower after a stray threads=2).
    torch.set_num_threads(config.threads)
    frame_size = source.frame_size
    # The initial weights come from torch's global generator, which torch seeds from OS entropy in every process: seed
    # it, so that one command trains the same weights (a resumed run loads them; an uninterrupted one must match it),
    # and every rank starts from the same weights.
    torch.manual_seed(config.seed)
    teacher = None
    if config.distill_from:  # the student is a copy of the teacher (come_rl.distill)
        teacher, backbone_name, backbone_kwargs = load_teacher(config, source.action_spec, frame_size)
        expert = copy.deepcopy(teacher)
        expert.name = config.role
        teacher.to(device).eval().requires_grad_(False)
    else:
        expert, backbone_name, backbone_kwargs = build_expert(config, source.action_spec.dim, frame_size)
    expert.to(device)
    devices.prefer_channels_last(expert)  # on the CPU: NHWC convolutions (devices.prefer_channels_last)
    if teacher is not None:
        devices.prefer_channels_last(teacher)
    k = expert.context_frames
    if expert.retrieval:  # its first context slot is the frame retrieved by pose (come_rl.experts.retrieval)
        from come_rl.experts.retrieval import RetrievalClips

        source = RetrievalClips(source, stale_fraction=config.retrieval_stale_fraction,
                                max_stale=config.retrieval_max_stale, blind=config.retrieval_blind)
    if config.same_view_fraction:
        if expert.retrieval:
            raise ValueError("same_view_fraction is for an STM, not a retrieving expert: set same_view_fraction=0")
        from come_rl.data.same_view import SameViewClips

        source = SameViewClips(source, config.same_view_fraction)
        if main:
            print(f"same-view clips: {config.same_view_fraction:.0%} of each batch, from "
                  f"{len(source.starts(k + 2)[0])} such clips of {k + 2} frames")
    if config.stale_recent_fraction:
        if expert.retrieval:
            raise ValueError("stale_recent_fraction is for an STM; a retrieving expert has retrieval_stale_fraction")
        if config.stale_recent_max > k:
            raise ValueError(f"stale_recent_max={config.stale_recent_max} must be at most the expert's {k} context "
                             f"frames: lower it")
        from come_rl.data.same_view import StaleRecentClips

        source = StaleRecentClips(source, config.stale_recent_fraction, config.stale_recent_max,
                                  config.stale_recent_steps, told=k if config.stale_recent_told else 0)
    ema = {name: p.detach().clone() for name, p in expert.backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(parameter_groups(expert.backbone, config), lr=config.lr, weight_decay=config.weight_decay)
    spec = expert_spec(expert, backbone_name, backbone_kwargs, extra={
        "action_spec": dataclasses.asdict(source.action_spec), "frame_size": frame_size,
        "data": config.data, "train_config": dataclasses.asdict(config),
        "distributed": {"world_size": context.world_size, "grad_accum_steps": config.grad_accum_steps,
                        "micro_batch": micro_batch, "device": device.type, "precision": precision},
        **({"distillation": distillation_record(config, teacher)} if teacher is not None else {}),
        **({"shortcut": {"fraction": config.shortcut_fraction, "max_steps": config.shortcut_max_steps}}
           if config.shortcut_fraction > 0 else {}),
    })
    state_path = out / f"{config.role}_train_state.pt"
    if config.init_from and teacher is None and not state_path.is_file():  # a resumed run holds its own weights
        copied = warm_start(expert, config.init_from)
        ema = {name: p.detach().clone() for name, p in expert.backbone.state_dict().items()}
        if main:
            print(f"warm start from {config.init_from}: {copied}")
    step, elapsed, rng = 0, 0.0, np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []  # since the last row of train_log.csv
    state = _load_resume_state(state_path, context, device)
    if state is not None:
        if state["spec"]["backbone_kwargs"] != backbone_kwargs:
            raise ValueError(f"{state_path} was trained with a different model ({state['spec']['backbone_kwargs']}); "
                             f"use another out= directory")
        if state["spec"].get("distillation") != spec.get("distillation"):
            raise ValueError(f"{state_path} holds a run with distillation {state['spec'].get('distillation')}, not "
                             f"{spec.get('distillation')} (another teacher or step count); resume with the settings "
                             f"it was started with, or use another out= directory")
        expert.backbone.load_state_dict(state["model"])
        ema = {name: tensor.to(device) for name, tensor in state["ema"].items()}
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        step, elapsed = state["step"], state["elapsed"]
        rng.bit_generator.state = state["rng"]
        generator.set_state(state["generator"])
        losses = list(state.get("losses", []))
        if callable(getattr(source, "load_state_dict", None)):
            if "data" in state:
                source.load_state_dict(state["data"])
            elif main:  # a checkpoint of an older version: training goes on, on another sequence of clips
                print(f"{state_path} does not hold the online episode pool's state; the pool restarts from seed "
                      f"{config.seed}")
        if main:
            print(f"resumed {config.role} from step {step} ({elapsed / 60:.1f} min trained)")
        del state
    n_params = sum(p.numel() for p in expert.backbone.parameters())
    if config.compile:
        devices.compile_module(expert.backbone)
    network: torch.nn.Module = expert.backbone
    if context.world_size > 1:
        # find_unused_parameters: a micro-batch whose rows all drop their context (or carry no poses) leaves some
        # parameters without a gradient in that step.
        network = DistributedDataParallel(expert.backbone, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    writer = _tensorboard_writer(out, config.role, step) if main else None
    if main:
        trim_train_log(out / "train_log.csv", step)
        print(f"training {config.role} {config.model} ({n_params / 1e6:.2f}M parameters) on {device} ({precision}"
              f"{', compiled' if config.compile else ''}): effective batch {config.batch_size} = {micro_batch} clips "
              f"per micro-batch x {context.world_size} rank(s) x {config.grad_accum_steps} accumulation step(s)")
    budget = config.minutes * 60.0
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc=f"train {config.role} {config.model}",
               disable=not main)
    last_ckpt = time.time()
    expert.train()

    def save() -> None:
        ema_cpu = _cpu_state(ema)
        save_expert(out, expert, dict(spec, step=step, minutes=elapsed / 60, parameters=n_params), state_dict=ema_cpu,
                    half=config.half_weights)
        torch_save_atomic({"model": _cpu_state(expert.backbone.state_dict()), "ema": ema_cpu,
                           "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                           "rng": rng.bit_generator.state, "generator": generator.get_state(), "spec": spec,
                           "losses": losses,
                           **({"data": source.state_dict()} if callable(getattr(source, "state_dict", None)) else {})},
                          state_path)

    workers = config.data_workers if config.data_workers >= 0 else int(device.type == "cuda")
    # Every rank draws the same global batch and noise (same seeds, same order) and trains on its own rows.
    stream = BatchStream(source, rng, generator, config.batch_size, k + 2, config.pose_features,
                         lambda b, shape: draw_training_noise(b, shape, config.drop_prob, generator,
                                                              config.context_noise, expert.context_frames),
                         workers=workers,
                         pin=device.type == "cuda")
    stop = _GracefulStop()
    while elapsed < budget and step < config.steps:
        # every rank stops at the same step: a signal seen by any rank stops all (one more small all-reduce)
        if (_max_over_ranks(float(bool(stop.requested)), context, device) if context.world_size > 1
                else bool(stop.requested)):
            stop.requested = stop.requested or "a signal on another rank"
            break
        t0 = time.time()
        batch, noise = stream.next()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config) * group.get("lr_scale", 1.0)
        loss = training_step(expert, network, optimizer, batch, noise, config, context, micro_batch, device,
                             precision, step, teacher=teacher)
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for name, p in expert.backbone.state_dict().items():
                if p.is_floating_point():
                    ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    ema[name].copy_(p)
        step += 1
        losses.append(loss)
        dt = _max_over_ranks(time.time() - t0, context, device)  # every rank stops at the same step
        elapsed += dt
        bar.update(int(elapsed) - bar.n)
        if step % config.log_every == 0:
            bar.set_postfix(step=step, loss=f"{np.mean(losses):.4f}", clips_s=f"{config.batch_size / dt:.0f}")
            if main:
                with open(out / "train_log.csv", "a") as log:
                    log.write(f"{step},{elapsed:.1f},{np.mean(losses):.6f}\n")
                writer.add_scalar(f"{config.role}/loss", float(np.mean(losses)), step)
                writer.add_scalar(f"{config.role}/learning_rate", lr_at(step - 1, config), step)
                writer.add_scalar(f"{config.role}/clips_per_second", config.batch_size / max(dt, 1e-9), step)
            losses = []
        if main and time.time() - last_ckpt > config.checkpoint_seconds:
            stream.sync()  # the generators as of the next batch to train on, not of batches made ahead
            save()
            last_ckpt = time.time()
    bar.close()
    stream.sync()
    stop.restore()
    if main:
        save()
        print(f"saved {out} after {step} steps, {elapsed / 60:.1f} min, {n_params / 1e6:.2f}M parameters")
    if stop.requested:
        if main:
            writer.close()
            print(f"stopped by {stop.requested} at step {step}: the checkpoint is saved; run the same command again to "
                  f"resume from step {step}", file=sys.stderr)
        raise SystemExit(stop.exit_code or 130)
    if main:
        if config.role == "base":
            _rollout_video(out, source, config, device, writer, step)
        writer.close()
    return TrainResult(out=out, expert=expert, step=step, context=context)


class _GracefulStop:
    """SIGINT (Ctrl-C) / SIGTERM (a scheduler's preemption) during training: the current step finishes, the checkpoint
    is saved and the run exits with 128 + the signal's number and a line on how to resume. A second signal stops at
    once (KeyboardInterrupt); every file is written atomically, so nothing is torn either way."""

    def __init__(self):
        self.requested, self.exit_code, self._previous = "", 0, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the defaults
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.exit_code = signal.Signals(signum).name, 128 + signum
        print(f"\n{self.requested}: finishing this step, saving the checkpoint (again to stop at once)", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _tensorboard_writer(out: Path, role: str, step: int):
    """TensorBoard event files in ``<out>/tensorboard/<role>`` (``tensorboard --logdir <out>/tensorboard``); a resumed
    run drops the events of the steps it trains again, as train_log.csv does."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard" / role), purge_step=step + 1 if step else None)


def _rollout_video(out: Path, source, config: TrainConfig, device: torch.device, writer=None, step: int = 0) -> None:
    """Samples vs ground truth at the end of training: 16 imagined frames (EMA weights) beside the real ones."""
    wm = WorldModel.load(out, experts=["base"], device=device, precision=config.precision)
    clip = source.sample_clips(1, wm.base.context_frames + 16, np.random.default_rng(config.seed + 7))
    real, imagined = rollout_comparison(wm, clip["frames"][0], clip["actions"][0], context=wm.base.context_frames)
    path = save_rollout_gif(out / "rollout_real_vs_imagined.gif", [real, imagined])
    print(f"wrote {path} (left: real, right: imagined)")
    if writer is not None:  # the real (top) and imagined (bottom) frames, side by side, as one image
        grid = np.concatenate([np.concatenate(list(real), axis=1), np.concatenate(list(imagined), axis=1)], axis=0)
        writer.add_image("samples/real_top_imagined_bottom", grid, step, dataformats="HWC")


def main(argv: list[str] | None = None) -> None:
    config = parse_overrides(sys.argv[1:] if argv is None else argv)
    train(config)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done (checkpoint written atomically, process group destroyed) leaves
        # without the interpreter's teardown, in which gloo's C++ threads can still abort the process on a busy
        # machine and turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
