"""An expert: one conditional denoiser p_k(x | c_k) of the next frame, with an unconditional mode p_k(x | empty).

All experts of a world model denoise the same variable: the *residual* r = x_next - x_last of the next frame to the
last frame seen (observed or imagined). Predicting the residual is the strongest inductive bias a small model can get
in these worlds (most pixels do not change between frames), and sharing it keeps the composition well defined: the
anchor x_last is common to every expert, so a product of experts over r is a product over x shifted by a constant.

The network predicts v (see ``come_rl.diffusion.parametrization``); ``predict_eps`` turns it into the noise estimate
that the composition rule (paper eq. 6) sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from come_rl.diffusion import NoiseSchedule, add_noise, sample_noise_levels, v_target, v_to_eps
from come_rl.nets.backbone import VideoBackbone


class DiffusionExpert(nn.Module):
    """A backbone plus the residual-v parametrisation; the base, STM and SLTM experts are all of this class.

    Args:
        backbone: any :class:`VideoBackbone` predicting one frame.
        schedule: the noise schedule it trains and samples with.
        name: a label for logs and the composer ("base", "stm", "sltm", ...).
        uses_poses: whether the backbone takes per-frame pose features (SLTM).
    """

    def __init__(self, backbone: VideoBackbone, schedule: NoiseSchedule, name: str = "base", uses_poses: bool = False):
        super().__init__()
        self.backbone, self.schedule, self.name, self.uses_poses = backbone, schedule, name, uses_poses
        self.spec: dict | None = None  # the recipe it was loaded from (come_rl.checkpoint), needed to save it

    @property
    def context_frames(self) -> int:
        return self.backbone.context_frames

    def prepare(self, context: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None = None,
                drop_context: torch.Tensor | None = None):
        """Process the clean context once.

        context: (B, K, C, H, W) in [-1, 1]; actions: (B, K + 1, A), the action that led to each frame, the last row
        being the action taken from the last context frame; poses: (B, K + 1, P) or None; drop_context: (B,) bool.
        """
        return self.inference_backbone().prepare(context, actions, poses if self.uses_poses else None, drop_context)

    def inference_backbone(self):
        """The network that sampling runs (the LTM substitutes its adapter-merged copy)."""
        return self.backbone

    def predict_eps(self, state, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy residual, t: (B,) -> eps: (B, C, H, W)."""
        v = self.inference_backbone().denoise(state, x_t[:, None], t)[:, 0]
        alpha, sigma = self.schedule.alpha_sigma(t)
        return v_to_eps(v.float(), x_t, alpha, sigma)

    def loss(self, frames: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None = None,
             drop_prob: float = 0.0, t: torch.Tensor | None = None, noise_low: float = 0.0,
             uniform_fraction: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion loss (paper eq. 1, in v-form) of predicting the last frame of each clip.

        frames: (B, K + 1, C, H, W) in [-1, 1]; actions: (B, K + 1, A); poses: (B, K + 1, P) or None.
        drop_prob: probability of training a row in the unconditional mode (condition dropout).
        t / noise_low / uniform_fraction: the noise levels (see ``sample_noise_levels``).
        """
        b = frames.shape[0]
        context, target = frames[:, :-1], frames[:, -1]
        residual = target - context[:, -1]
        if t is None:
            t = sample_noise_levels(b, low=noise_low, uniform_fraction=uniform_fraction, generator=generator)
        eps = torch.randn(residual.shape, generator=generator)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = add_noise(residual, eps, alpha, sigma)
        drop = torch.rand(b, generator=generator) < drop_prob if drop_prob > 0 else None
        v = self.backbone(x_t[:, None], t, context, actions, poses if self.uses_poses else None, drop)[:, 0]
        return F.mse_loss(v.float(), v_target(residual, eps, alpha, sigma))
