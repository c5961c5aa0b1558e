"""The layers of the video DiT (:mod:`come_rl.nets.dit`): attention with additive masks, the windowed self-attention and
MLP of a block, the adaLN-Zero block itself, and the gated temporal recurrence (the SSM-style baseline).

Module names follow the usual DiT layout (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) so that peft's LoRA can
target them by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiTMlp", "GatedTemporalRecurrence", "VideoDiTBlock", "WindowedSelfAttention", "attention", "modulate",
           "to_additive"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def to_additive(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) -> float32 additive mask (0 / -inf)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               additive_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with an additive float mask (or none); the mask follows the query's dtype under autocast."""
    if additive_mask is not None and additive_mask.dtype != query.dtype:
        additive_mask = additive_mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask)


class WindowedSelfAttention(nn.Module):
    """Multi-head attention whose keys may be extended by cached keys/values of earlier tokens."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, L, D)`` -> q, k, v each ``(B, heads, L, head_dim)``."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, heads, L, head_dim)`` -> ``(B, L, D)`` through the output projection."""
        batch, _, length, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


class DiTMlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VideoDiTBlock(nn.Module):
    """adaLN-Zero transformer block; modulation is per frame, broadcast over the frame's tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = WindowedSelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = DiTMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        tokens: torch.Tensor,
        frame_conditions: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block.

        Args:
            tokens: ``(B, F, S, D)``: F frames of S tokens.
            frame_conditions: ``(B, F, D)``.
            attend: ``attend(q, k, v) -> (B, heads, F*S, head_dim)``; it adds cached keys and applies
                the mask, so that one block serves the context pass, the target pass and the reference.

        Returns:
            new tokens ``(B, F, S, D)`` and this block's keys and values ``(B, heads, F*S, head_dim)``.
        """
        batch, frames, spatial, hidden = tokens.shape
        modulation = self.adaLN_modulation(frame_conditions)[:, :, None, :].chunk(6, dim=-1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation
        normed = modulate(self.norm1(tokens), shift_attn, scale_attn).reshape(batch, frames * spatial, hidden)
        query, key, value = self.attn.project(normed)
        attended = self.attn.merge(attend(query, key, value)).view(batch, frames, spatial, hidden)
        tokens = tokens + gate_attn * attended
        tokens = tokens + gate_mlp * self.mlp(modulate(self.norm2(tokens), shift_mlp, scale_mlp))
        return tokens, key, value


class GatedTemporalRecurrence(nn.Module):
    """A diagonal, input-gated linear recurrence over frames (the SSM-style baseline layer).

    Per spatial position and channel: ``h_f = a_f * h_{f-1} + (1 - a_f) * u_f`` with
    ``a_f = sigmoid(decay(x_f))`` in (0, 1), output ``x_f + out_proj(h_f * silu(gate(x_f)))``.
    A Python loop over frames is fine here: sequences are at most a few dozen frames.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        # Decay biased towards remembering (sigmoid(2) ~ 0.88): a recurrence meant to carry memory.
        with torch.no_grad():
            self.in_proj.bias[2 * hidden_size:].fill_(2.0)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, F, S, D)``, ``state (B, S, D)`` or None (zeros) -> new tokens, final state."""
        values, gates, decay_logits = self.in_proj(self.norm(tokens)).chunk(3, dim=-1)
        decay = torch.sigmoid(decay_logits)
        hidden = torch.zeros_like(values[:, 0]) if state is None else state
        outputs = []
        for frame in range(tokens.shape[1]):
            hidden = decay[:, frame] * hidden + (1 - decay[:, frame]) * values[:, frame]
            outputs.append(hidden)
        recurrent = torch.stack(outputs, dim=1)
        return tokens + self.out_proj(recurrent * F.silu(gates)), hidden
