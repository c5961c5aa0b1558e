"""An expert: one conditional denoiser p_k(x | c_k) of the next frame, with an unconditional mode p_k(x | empty).

What the network is trained to denoise is the expert's *target* (recorded in its checkpoint recipe):
  * ``"full"`` (the default, as in the paper's authors' code): the next frame itself, x_next in [-1, 1]; the last
    context frame is an input only. Content that never changes (a tile's object) is part of every target, so an
    episode's facts enter the loss and memorization can store them.
  * ``"residual"``: r = x_next - x_last, the change to the last frame seen. A strong bias for small models (most pixels
    do not change), but unchanged content never enters the loss: a memory expert cannot learn what a hidden tile holds
    from clips in which it does not change.

Whatever its target, every expert speaks *frame space* to the sampler and the composer: ``predict_eps`` takes the
noisy next frame z = alpha x_next + sigma eps and returns eps. For a residual expert z - alpha x_last is exactly its
noisy residual with the same eps, so experts of both targets compose by the same rule (paper eq. 6) without change.

What the network *outputs* is the expert's *prediction* (also recorded in its recipe):
  * ``"v"`` (the default): v = alpha eps - sigma x_0 (see ``come_rl.diffusion.parametrization``), trained with the plain
    v-MSE.
  * ``"x0"``: the clean target itself; eps = (z - alpha x0_hat) / sigma is then exact arithmetic. At low noise a v- or
    eps-network has to reproduce the per-pixel noise of its input to remove it, which a network that works on
    pixel-unshuffled cells (16x16 cells of 4x4 pixels on the maze) does poorly: its samples keep grain. An x0-network
    never outputs noise; the sampler subtracts it. Trained with the v-loss written in x0 terms,
    ||x0 - x0_hat||^2 / sigma^2, whose weight 1 / sigma^2 = SNR + 1 is capped at ``X0_LOSS_CAP`` (min-SNR weighting,
    Hang et al. 2023): the same loss as v near pure noise (where the long-term memory acts), a bounded one near clean.

``predict_eps`` turns either into the noise estimate that the composition rule sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from come_rl import devices
from come_rl.diffusion import NoiseSchedule, add_noise, sample_noise_levels, v_target, v_to_eps
from come_rl.diffusion.parametrization import _bcast
from come_rl.nets.backbone import VideoBackbone, with_step

TARGETS = ("full", "residual")
PREDICTIONS = ("v", "x0")
X0_LOSS_CAP = 5.0
"""the cap on the x0-loss weight 1 / sigma^2 (reached at sigma < 0.45)."""


class PreparedContext:
    """What ``DiffusionExpert.prepare`` returns: the backbone's processed context, plus the anchor (the last context
    frame, (B, C, H, W)) that a residual expert subtracts from the noisy frame; None for full-frame experts."""

    __slots__ = ("state", "anchor")

    def __init__(self, state, anchor: torch.Tensor | None):
        self.state, self.anchor = state, anchor


class DiffusionExpert(nn.Module):
    """A backbone plus the v-parametrisation of its target; the base, STM and SLTM experts are all of this class.

    Args:
        backbone: any :class:`VideoBackbone` predicting one frame.
        schedule: the noise schedule it trains and samples with.
        name: a label for logs and the composer ("base", "stm", "sltm", ...).
        uses_poses: whether the backbone takes per-frame pose features (SLTM).
        target: "full" (the next frame) or "residual" (its change to the last context frame); see the module docstring.
        prediction: what the network outputs, "v" or "x0"; see the module docstring.
    """

    def __init__(self, backbone: VideoBackbone, schedule: NoiseSchedule, name: str = "base", uses_poses: bool = False,
                 target: str = "full", prediction: str = "v"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown expert target {target!r}; choose one of {TARGETS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown expert prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.backbone, self.schedule, self.name, self.uses_poses = backbone, schedule, name, uses_poses
        self.target, self.prediction = target, prediction
        self.spec: dict | None = None  # the recipe it was loaded from (come_rl.checkpoint), needed to save it
        self.compiled = False
        """run the denoising network through torch.compile (``WorldModel(compile=True)``)."""
        self.step_size = 0.0
        """the DDIM step size a step-conditioned (shortcut) backbone is told at sampling (``WorldModel`` sets 1 /
        steps); 0: the plain denoiser. Ignored by other backbones."""

    @property
    def step_conditioned(self) -> bool:
        """Whether the backbone takes the sampler's step size (a shortcut model, ``come_rl.shortcut``)."""
        return getattr(self.backbone, "step_embed", None) is not None  # (not the LTM's merged copy: no merge here)

    def told_step(self, sampler) -> float:
        """The step size to tell this (step-conditioned) expert when it samples with ``sampler``: 1 / steps when that
        step count was trained (a power of two up to the recipe's ``shortcut.max_steps``), else 0, the plain denoiser
        (a step count it never learned, or an euler / heun sampler, whose steps are uneven)."""
        size = sampler.step_size
        largest = ((self.spec or {}).get("shortcut") or {}).get("max_steps")
        if size <= 0 or largest is None:
            return size
        steps = round(1 / size)
        return size if steps <= largest and steps & (steps - 1) == 0 else 0.0

    @property
    def context_frames(self) -> int:
        return self.backbone.context_frames

    @property
    def retrieval(self) -> bool:
        """Whether the first context slot is the pose-retrieved memorized frame (``come_rl.experts.retrieval``)."""
        return bool(getattr(getattr(self.backbone, "config", None), "retrieval", False))

    @property
    def device(self) -> torch.device:
        """Where the expert's weights are; its inputs are moved there (callers may keep theirs on the CPU)."""
        return devices.module_device(self.backbone)

    def prepare(self, context: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None = None,
                drop_context: torch.Tensor | None = None, context_level: torch.Tensor | None = None):
        """Process the clean context once.

        context: (B, K, C, H, W) in [-1, 1]; actions: (B, K + 1, A), the action that led to each frame, the last row
        being the action taken from the last context frame; poses: (B, K + 1, P) or None; drop_context: (B,) bool.
        """
        device = self.device
        context, actions = devices.to_device(context, device), devices.to_device(actions, device)
        poses = devices.to_device(poses, device) if self.uses_poses else None
        drop_context = devices.to_device(drop_context, device)
        backbone = self.inference_backbone()
        state = (backbone.prepare(context, actions, poses, drop_context) if context_level is None  # (B,): a U-Net's
                 else backbone.prepare(context, actions, poses, drop_context, context_level=devices.to_device(
                     context_level, device)))  # context level input (UNetConfig.context_noise / staleness_levels)
        anchor = None
        if self.target == "residual":  # the backbone's motion prior when it has one, else the last frame
            anchor = state["anchor"] if isinstance(state, dict) and "anchor" in state else context[:, -1]
        return PreparedContext(state, None if anchor is None else anchor.float())

    def inference_backbone(self):
        """The network that sampling runs (the LTM substitutes its adapter-merged copy)."""
        return self.backbone

    def predict_eps(self, prepared: PreparedContext, x_t: torch.Tensor, t: torch.Tensor,
                    step: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy next frame (frame space, whatever the target), t: (B,) -> eps: (B, C, H, W).
        step (B,): the DDIM step size told to a step-conditioned backbone (default ``self.step_size``)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        if prepared.anchor is not None:  # residual target: z_residual = z_frame - alpha * x_last, the same eps
            x_t = x_t - _bcast(alpha, x_t) * prepared.anchor
        backbone = self.inference_backbone()
        denoise = type(backbone).denoise
        if self.compiled:
            denoise = devices.compiled_function(denoise, devices.COMPILE_BACKEND)
        state = prepared.state
        if getattr(backbone, "step_embed", None) is not None:
            if step is None:
                step = torch.full_like(t, float(self.step_size))
            state = with_step(state, step.to(t))
        out = denoise(backbone, state, x_t[:, None], t)[:, 0].float()
        if self.prediction == "x0":
            return (x_t - _bcast(alpha, x_t) * out) / _bcast(sigma, x_t)
        return v_to_eps(out, x_t, alpha, sigma)

    def clean_target(self, frames: torch.Tensor) -> torch.Tensor:
        """The variable this expert denoises for clips ``frames`` (B, K + 1, C, H, W): the last frame, or its change."""
        target = frames[:, -1]
        return target - frames[:, -2] if self.target == "residual" else target

    def loss(self, frames: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None = None,
             drop_prob: float = 0.0, t: torch.Tensor | None = None, noise_low: float = 0.0,
             uniform_fraction: float = 0.0, generator: torch.Generator | None = None,
             eps: torch.Tensor | None = None, drop: torch.Tensor | None = None,
             network: nn.Module | None = None, context_noise: float = 0.0,
             context_level: torch.Tensor | None = None, context_eps: torch.Tensor | None = None,
             distill_target: torch.Tensor | None = None, step: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss (paper eq. 1, in v-form) of predicting the last frame of each clip.

        frames: (B, K + 1, C, H, W) in [-1, 1]; actions: (B, K + 1, A); poses: (B, K + 1, P) or None (any device:
        they are moved to the expert's).
        drop_prob: probability of training a row in the unconditional mode (condition dropout).
        t / noise_low / uniform_fraction: the noise levels (see ``sample_noise_levels``).
        eps (B, C, H, W) / drop (B,) bool: given noise and dropped rows instead of drawing them (``t``, ``eps`` and
        ``drop`` are drawn in this order from ``generator`` otherwise; distributed training draws them for the global
        batch and hands each rank its rows).
        network: the module to run instead of ``self.backbone`` (its DistributedDataParallel wrapper).
        context_noise: > 0: context-noise augmentation (a backbone built with ``context_noise``): each row's context
        frames get Gaussian noise of a level drawn uniformly from [0, context_noise] (after t, eps and drop, from
        ``generator``), and the network is told the level. The motion prior warps the noisy context, as it warps the
        model's own imperfect frames in a rollout. context_level (B,) / context_eps (B, K, C, H, W): given instead.
        distill_target: (B, C, H, W) frame-space clean frame to regress instead of the clip's (``come_rl.distill``:
        the teacher's two-step target); the noisy input is still the clip's frame noised by ``eps`` at ``t``.
        step: (B,) the DDIM step size each row is trained for (a step-conditioned backbone, ``come_rl.shortcut``).
        """
        device = self.device
        b = frames.shape[0]
        frames, actions = devices.to_device(frames, device), devices.to_device(actions, device)
        poses = devices.to_device(poses, device) if self.uses_poses else None
        context, x0 = frames[:, :-1], self.clean_target(frames)
        backbone = self.backbone if network is None else getattr(network, "module", network)  # DDP wraps it
        if t is None:
            t = sample_noise_levels(b, low=noise_low, uniform_fraction=uniform_fraction, generator=generator)
        if eps is None:
            eps = devices.randn(x0.shape, generator=generator)
        if drop is None and drop_prob > 0:
            drop = devices.rand((b,), generator=generator) < drop_prob
        level = None
        if context_noise > 0 or context_level is not None:
            if getattr(backbone, "context_level_embed", None) is None:
                raise ValueError("context_noise > 0 needs a backbone built with context_noise (UNetConfig.context_noise)")
            if context_level is None:  # drawn after t, eps and drop, the order draw_training_noise keeps
                context_level = devices.rand((b,), generator=generator) * context_noise
                context_eps = devices.randn(tuple(context.shape), generator=generator)
            level = devices.to_device(context_level, device).float()
            if context_eps is not None:  # None: the level is told, nothing added (a staleness, UNetConfig.staleness_levels)
                noise = devices.to_device(context_eps, device)
                context = context + (level[:, None, None, None, None] * noise.float()).to(context.dtype)
        anchor = backbone.anchor_frame(context, actions) if hasattr(backbone, "anchor_frame") else None
        motion_loss = None
        if anchor is not None:  # a motion prior: its own photometric loss, and the residual is taken to it
            motion_loss = F.mse_loss(anchor.float(), frames[:, -1].float())
            if self.target == "residual":
                x0 = frames[:, -1] - anchor.detach().to(frames.dtype)
        recall = getattr(backbone, "recall", None)
        if recall is not None:  # a window recall (UNetConfig.window_recall): its keys learn from its own loss too,
            # the recalled view against the next frame, as the motion prior's warp does (through the zero-initialised
            # input alone their gradient starts at zero)
            stale = backbone.stale_count(level) if hasattr(backbone, "stale_count") else None
            recall_loss = F.mse_loss(recall.frame(context, actions, stale).float(), frames[:, -1].float())
            motion_loss = recall_loss if motion_loss is None else motion_loss + recall_loss
        t, eps, drop = devices.to_device(t, device), devices.to_device(eps, device), devices.to_device(drop, device)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = add_noise(x0, eps, alpha, sigma)
        if distill_target is not None:  # regress the teacher's frame, in this expert's target space, from the same x_t
            goal = devices.to_device(distill_target, device).to(x0.dtype)
            x0 = goal if self.target == "full" else goal - (frames[:, -1] - x0)  # a residual: minus its anchor
            eps = (x_t - _bcast(alpha, x_t) * x0) / _bcast(sigma, x_t)
        call = network or self.backbone
        extra = {} if step is None else {"step": devices.to_device(step, device).float()}
        out = (call(x_t[:, None], t, context, actions, poses, drop, **extra) if level is None
               else call(x_t[:, None], t, context, actions, poses, drop, context_level=level, **extra))[:, 0].float()
        if self.prediction == "x0":
            weight = sigma.float().pow(-2).clamp(max=X0_LOSS_CAP)
            loss = (_bcast(weight, x0) * (out - x0.float()).pow(2)).mean()
        else:
            loss = F.mse_loss(out, v_target(x0, eps, alpha, sigma))
        return loss if motion_loss is None else loss + motion_loss
