"""The contract every video denoising network of come_rl implements (conv U-Net, video DiT, ...).

An expert (``come_rl.experts``) owns a backbone and turns its output into a noise prediction; the
backbone only maps (clean context, noisy future, noise level, per-frame conditions) to a prediction
of the future's target (``v`` of the residual to the last context frame, see ``come_rl.diffusion``).

The call is split in two so that the context is processed once per planning call and reused by every
candidate and every denoising step (docs/design.md, "Where the time goes"):

    state = backbone.prepare(context, actions, poses, drop_context)   # once
    out   = backbone.denoise(state, noisy, t)                          # every denoising step

Shapes (B batch, K context frames, N predicted frames, C channels, H x W pixels, A action_dim,
P pose_dim):
    context:      (B, K, C, H, W) clean frames in [-1, 1]
    actions:      (B, K + N, A)   the action that led to each frame of the clip (row 0 may be zeros)
    poses:        (B, K + N, P) or None; absolute pose features of each frame (SLTM)
    drop_context: (B,) bool or None; True rows see no context (and no poses): the expert's
                  unconditional mode, trained by condition dropout
    noisy:        (B, N, C, H, W)
    t:            (B,) noise level in [0, 1]
    returns:      (B, N, C, H, W)

``state`` may be expanded along the batch: ``backbone.expand_state(state, repeats)`` repeats every
row ``repeats`` times (candidates of a planner share one context).
"""

from __future__ import annotations

import math

from typing import Any

import torch
from torch import nn


class VideoBackbone(nn.Module):
    """Base class of all video denoising networks. Subclasses implement ``prepare`` and ``denoise``."""

    context_frames: int
    predicted_frames: int
    action_dim: int
    pose_dim: int

    def prepare(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        poses: torch.Tensor | None = None,
        drop_context: torch.Tensor | None = None,
    ) -> Any:
        raise NotImplementedError

    def denoise(self, state: Any, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expand_state(self, state: Any, repeats: int) -> Any:
        """Repeat each batch row of ``state`` ``repeats`` times (``repeat_interleave`` on dim 0)."""
        return _map_tensors(state, lambda x: x.repeat_interleave(repeats, dim=0))

    def forward(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        actions: torch.Tensor,
        poses: torch.Tensor | None = None,
        drop_context: torch.Tensor | None = None,
        context_level: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One-shot call (training): prepare + denoise. ``context_level`` (B,): the noise added to the context frames
        (context-noise augmentation; only backbones built with it accept a value). ``step`` (B,): the DDIM step size a
        step-conditioned (shortcut) backbone is trained for (``come_rl.shortcut``)."""
        if context_level is None:
            state = self.prepare(context, actions, poses, drop_context)
        else:
            state = self.prepare(context, actions, poses, drop_context, context_level=context_level)
        return self.denoise(state if step is None else with_step(state, step), noisy, t)


def with_step(state: Any, step: torch.Tensor) -> Any:
    """A prepared state that tells ``denoise`` the DDIM step size ``step`` (B,) (step-conditioned U-Nets only)."""
    if not isinstance(state, dict):
        raise ValueError("only a U-Net backbone takes a step size (UNetConfig.step_conditioned)")
    return {**state, "step": step}


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of noise levels: ``t (...,)`` in [0, 1] -> ``(..., dim)``.

    ``t`` is scaled by 1000 so that the frequencies resolve the levels of a 1000-step schedule.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0)[..., None] * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
