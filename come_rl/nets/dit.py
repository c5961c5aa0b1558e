"""A video diffusion transformer (DiT) with block-causal cached context and windowed attention.

One sequence holds the clean context frames and the noisy future frames, each cut into ``p x p``
patches (tokens). Every token carries a learned spatial and temporal position embedding; every frame
carries a conditioning vector (noise level + the action that led to the frame + its pose, or a
learned "no pose" vector) that modulates the blocks through adaLN-Zero (Peebles & Xie 2023).

Attention mask, frame ``i`` (query) to frame ``j`` (key), positions counted from the first context
frame:

* block-causal: context frames attend only to context frames, targets attend to context and
  targets. Context tokens never see a target and always use the clean-data noise level (t = 0), so
  their keys and values at every layer are computed once in :meth:`VideoDiT.prepare` and reused by
  every :meth:`VideoDiT.denoise` call of a planning call (docs/design.md, "Where the time goes");
* sliding-window layers: ``i - W < j <= i`` (a causal window of ``W`` frames, also for targets,
  whose window is measured from the target frame itself);
* full-attention layers (``full_attention_layers``, or all layers when ``window_frames`` is None):
  context frames attend to every context frame, targets to every frame;
* rows with ``drop_context``: targets attend to targets only and the last-frame shortcut is zeroed,
  so the output does not depend on the context at all (the expert's unconditional mode).

Windows stack: after ``L`` sliding-window layers a target of position ``i`` has seen frames down
to ``i - L (W - 1)`` (:meth:`VideoDiT.receptive_field_start`); frames before that reach no output of
a pure sliding-window model.

Optional gated linear recurrences over time (``ssm_layers``, an SSM-style baseline in plain torch)
run after the listed blocks: per spatial position, ``h_f = a_f * h_{f-1} + (1 - a_f) * u_f`` over
the frames, with input-dependent decay ``a_f`` (a diagonal selective state space, Mamba-like). The
state after the last context frame is cached like the keys and values.

The layers (attention, MLP, the adaLN-Zero block, the recurrence) are in :mod:`come_rl.nets.dit_layers`; module names follow
the usual DiT layout (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) so
that peft's LoRA can target them by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from come_rl.nets.backbone import VideoBackbone, timestep_embedding
from come_rl.nets.dit_layers import GatedTemporalRecurrence, VideoDiTBlock, attention, modulate, to_additive

__all__ = ["GatedTemporalRecurrence", "VideoDiT", "VideoDiTConfig"]


@dataclass(frozen=True)
class VideoDiTConfig:
    """Size and attention pattern of a :class:`VideoDiT`."""

    frame_size: int = 64
    """Height = width of a frame in pixels (must be divisible by ``patch_size``)."""
    channels: int = 3
    """Channels of a frame."""
    patch_size: int = 4
    """Side of the square patch that becomes one token."""
    hidden_size: int = 128
    """Width of the transformer."""
    depth: int = 6
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (``hidden_size`` must be divisible by it)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to ``hidden_size``."""
    context_frames: int = 3
    """Largest number of clean context frames (fewer may be given; they are right-aligned)."""
    predicted_frames: int = 1
    """Largest number of noisy future frames denoised together (fewer may be given)."""
    action_dim: int = 6
    """Size of one action vector (one-hot for discrete action spaces)."""
    pose_dim: int = 0
    """Size of the per-frame pose features (4 = x, y, sin yaw, cos yaw); 0 = no pose conditioning."""
    window_frames: int | None = None
    """Sliding window W in frames; None = every layer attends over the whole (block-causal) sequence."""
    full_attention_layers: tuple[int, ...] = ()
    """Block indices (0-based) that use full attention although ``window_frames`` is set."""
    ssm_layers: tuple[int, ...] = ()
    """Block indices (0-based) followed by a gated linear recurrence over time (SSM-style baseline)."""
    noisy_skip: bool = True
    """Add a per-pixel, condition-gated copy of the noisy target patch to the output (zero-initialised gate). When a
    patch has more pixel values than the token has channels (patch 8 x 8 x 3 = 192 > hidden 128), the tokens cannot
    carry the noise that v-prediction must return at low noise levels; without this skip the CPU STM/SLTM stalled
    at a loss of 0.21 (the conv U-Net reaches 0.035 in as many steps)."""
    last_frame_shortcut: bool = True
    """Feed the last context frame into the target tokens (concatenated to the noisy frame before the
    patch embedding): the cheapest path to "the next frame looks like the last one" (docs/design.md probe)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_attention_layers", tuple(int(i) for i in self.full_attention_layers))
        object.__setattr__(self, "ssm_layers", tuple(int(i) for i in self.ssm_layers))
        for name in ("frame_size", "channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "context_frames", "predicted_frames", "action_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VideoDiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pose_dim < 0:
            raise ValueError(f"VideoDiTConfig.pose_dim must be >= 0 (0 = no poses), got {self.pose_dim}")
        if self.frame_size % self.patch_size:
            raise ValueError(f"frame_size {self.frame_size} is not divisible by patch_size {self.patch_size}; "
                             "pick a patch size that divides the frame size")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.window_frames is not None:
            if self.window_frames < 1:
                raise ValueError(f"window_frames must be >= 1 (or None for full attention), got {self.window_frames}")
            if self.window_frames > self.context_frames:
                raise ValueError(f"window_frames={self.window_frames} is larger than the context "
                                 f"(context_frames={self.context_frames}); use window_frames=None for full "
                                 "attention or raise context_frames")
        elif self.full_attention_layers:
            raise ValueError("full_attention_layers is set but window_frames is None (every layer is already "
                             "full attention); set window_frames or drop full_attention_layers")
        for name in ("full_attention_layers", "ssm_layers"):
            for index in getattr(self, name):
                if not 0 <= index < self.depth:
                    raise ValueError(f"{name} holds layer index {index}, outside the model's blocks "
                                     f"0..{self.depth - 1} (depth={self.depth}); indices are 0-based")

    @property
    def tokens_per_frame(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    def is_full_attention(self, layer: int) -> bool:
        return self.window_frames is None or layer in self.full_attention_layers


class VideoDiT(VideoBackbone):
    """Video DiT implementing :class:`come_rl.nets.backbone.VideoBackbone` (see the module docstring).

    ``state = prepare(context (B,k,C,H,W), actions (B,k+n,A), poses (B,k+n,P)|None, drop_context (B,)|None)``
    with ``1 <= k <= context_frames`` and ``1 <= n <= predicted_frames``; then
    ``denoise(state, noisy (B,n,C,H,W), t (B,)) -> (B,n,C,H,W)``.
    """

    def __init__(self, config: VideoDiTConfig | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = VideoDiTConfig(**overrides)
        elif overrides:
            raise ValueError("pass either a VideoDiTConfig or keyword overrides, not both")
        self.config = config
        self.context_frames = config.context_frames
        self.predicted_frames = config.predicted_frames
        self.action_dim = config.action_dim
        self.pose_dim = config.pose_dim
        hidden, patch, channels = config.hidden_size, config.patch_size, config.channels
        patch_pixels = patch * patch * channels
        self.context_patch_embed = nn.Linear(patch_pixels, hidden)
        target_inputs = 2 * patch_pixels if config.last_frame_shortcut else patch_pixels
        self.target_patch_embed = nn.Linear(target_inputs, hidden)
        self.spatial_position = nn.Parameter(torch.randn(1, 1, config.tokens_per_frame, hidden) * 0.02)
        self.temporal_position = nn.Parameter(
            torch.randn(config.context_frames + config.predicted_frames, hidden) * 0.02)
        self.time_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.action_embed = nn.Linear(config.action_dim, hidden)
        if config.pose_dim:
            self.pose_embed = nn.Linear(config.pose_dim, hidden)
            self.null_pose = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList(
            VideoDiTBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.recurrences = nn.ModuleDict({str(i): GatedTemporalRecurrence(hidden) for i in config.ssm_layers})
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_linear = nn.Linear(hidden, patch_pixels)
        self.noisy_skip_gate = nn.Linear(hidden, patch_pixels) if config.noisy_skip else None
        self._initialize_weights()

    # ------------------------------------------------------------------ setup
    def _initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero (Peebles & Xie 2023).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for recurrence in self.recurrences.values():
            nn.init.zeros_(recurrence.out_proj.weight)
            with torch.no_grad():
                recurrence.in_proj.bias[2 * self.config.hidden_size:].fill_(2.0)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)
        if self.noisy_skip_gate is not None:
            nn.init.zeros_(self.noisy_skip_gate.weight)
            nn.init.zeros_(self.noisy_skip_gate.bias)

    def config_dict(self) -> dict:
        """The config as a plain dict (for saving next to the weights)."""
        return asdict(self.config)

    def receptive_field_start(self, frame_position: int) -> int:
        """Earliest frame position that can influence frame ``frame_position`` through the stacked
        windows (ignoring full-attention layers, which see everything, and recurrences)."""
        window_layers = sum(1 for layer in range(self.config.depth) if not self.config.is_full_attention(layer))
        if self.config.window_frames is None:
            return 0
        return frame_position - window_layers * (self.config.window_frames - 1)

    # ------------------------------------------------------------ tokenising
    def _patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, H, W)`` -> ``(B, F, S, C*p*p)``."""
        batch, count, channels, height, width = frames.shape
        p = self.config.patch_size
        patches = frames.reshape(batch, count, channels, height // p, p, width // p, p)
        return patches.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, count, (height // p) * (width // p), -1)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, F, S, C*p*p)`` -> ``(B, F, C, H, W)``."""
        batch, count = tokens.shape[:2]
        p, channels, side = self.config.patch_size, self.config.channels, self.config.frame_size // self.config.patch_size
        patches = tokens.reshape(batch, count, side, side, channels, p, p)
        return patches.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, count, channels, side * p, side * p)

    # ------------------------------------------------------------ validation
    def _check_frames(self, frames: torch.Tensor, name: str, max_count: int) -> None:
        c, s = self.config.channels, self.config.frame_size
        if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or tuple(frames.shape[2:]) != (c, s, s):
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"{name} must be a tensor (batch, frames, {c}, {s}, {s}), got {shape}; "
                             f"resize frames to {s}x{s} or build the backbone with frame_size matching them")
        if not 1 <= frames.shape[1] <= max_count:
            raise ValueError(f"{name} has {frames.shape[1]} frames; this backbone takes 1..{max_count}")
        if not torch.isfinite(frames).all():
            raise ValueError(f"{name} contains NaN or Inf; frames must be finite values in [-1, 1]")

    def _validate_prepare(self, context, actions, poses, drop_context) -> tuple[int, int]:
        self._check_frames(context, "context", self.context_frames)
        batch, num_context = context.shape[:2]
        if not isinstance(actions, torch.Tensor) or actions.ndim != 3 or actions.shape[0] != batch \
                or actions.shape[2] != self.action_dim:
            shape = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
            raise ValueError(f"actions must be (batch={batch}, context + predicted frames, "
                             f"action_dim={self.action_dim}), got {shape}")
        num_targets = actions.shape[1] - num_context
        if not 1 <= num_targets <= self.predicted_frames:
            raise ValueError(f"actions cover {actions.shape[1]} frames for {num_context} context frames, i.e. "
                             f"{num_targets} predicted frames; pass one action per context frame plus 1.."
                             f"{self.predicted_frames} predicted frames")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or Inf")
        if poses is not None:
            if self.pose_dim == 0:
                raise ValueError("this backbone has no pose conditioning (pose_dim=0); pass poses=None or "
                                 "build it with pose_dim=4 (x, y, sin yaw, cos yaw)")
            expected = (batch, num_context + num_targets, self.pose_dim)
            if not isinstance(poses, torch.Tensor) or tuple(poses.shape) != expected:
                shape = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
                raise ValueError(f"poses must have shape {expected} (batch, context + predicted frames, "
                                 f"pose_dim); got {shape}. Convert (x, y, yaw) poses with "
                                 "come_rl.nets.pose_encoder.pose_features")
            if not torch.isfinite(poses).all():
                raise ValueError("poses contain NaN or Inf; pass finite pose features, or poses=None (the "
                                 "model then uses its learned 'no pose' embedding)")
        if drop_context is not None and (not isinstance(drop_context, torch.Tensor)
                                         or drop_context.shape != (batch,) or drop_context.dtype != torch.bool):
            raise ValueError(f"drop_context must be a bool tensor of shape ({batch},) or None")
        return num_context, num_targets

    # --------------------------------------------------------------- masks
    def _frame_mask(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, num_context: int,
        full_attention: bool, context_visible: torch.Tensor | None,
    ) -> torch.Tensor:
        """Frame-level boolean mask (True = may attend): ``(Fq, Fk)`` or ``(B, Fq, Fk)`` with drops.

        Positions index the (context + target) clip; positions ``< num_context`` are context.
        """
        query = query_positions[:, None]
        key = key_positions[None, :]
        query_is_context = query < num_context
        key_is_context = key < num_context
        if full_attention:
            # Context sees all context, targets see everything.
            allowed = key_is_context | ~query_is_context
        else:
            allowed = (key <= query) & (key > query - self.config.window_frames)
        if context_visible is None:
            return allowed
        # Dropped rows: a target may not see any context frame.
        hide = (~context_visible)[:, None, None] & (~query_is_context & key_is_context)[None]
        return allowed[None] & ~hide

    def _token_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Expand a frame mask to tokens and add the head axis: ``(..., Fq*S, Fk*S)`` bool."""
        spatial = self.config.tokens_per_frame
        mask = frame_mask.repeat_interleave(spatial, dim=-2).repeat_interleave(spatial, dim=-1)
        return mask[:, None] if mask.ndim == 3 else mask

    def _additive_token_mask(self, frame_mask: torch.Tensor) -> torch.Tensor | None:
        """The boolean mask as an additive one (0 / -inf), or None where every pair may attend.

        SDPA on CPU turns a boolean mask into an additive one inside every call (measured 2.2x the
        cost of the attention itself at 1024 x 1792 tokens); doing it once per call for all layers,
        and skipping an all-True mask, saves that.
        """
        if bool(frame_mask.all()):
            return None
        return to_additive(self._token_mask(frame_mask))

    # -------------------------------------------------------------- embeddings
    def _frame_conditions(
        self, actions: torch.Tensor, poses: torch.Tensor | None, context_visible: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-frame action (+ pose) embedding, without the noise level: ``(B, k+n, D)``."""
        conditions = self.action_embed(actions)
        if self.pose_dim:
            null = self.null_pose.expand_as(conditions)
            if poses is None:
                conditions = conditions + null
            else:
                pose_embedding = self.pose_embed(poses)
                if context_visible is not None:
                    pose_embedding = torch.where(context_visible[:, None, None], pose_embedding, null)
                conditions = conditions + pose_embedding
        return conditions

    def _noise_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, 256).to(self.time_embed[0].weight.dtype))

    # ------------------------------------------------------------- attention
    def _banded_context_attention(self, query, key, value, num_frames: int) -> torch.Tensor:
        """Sliding-window attention among context frames without the dense ``(F S)^2`` mask.

        Every query frame gets its own key block of the W frames ending at it (front padded), so the
        cost is ``F * S * W * S`` instead of ``(F S)^2``.
        """
        window = self.config.window_frames
        batch, heads, _, head_dim = query.shape
        spatial = self.config.tokens_per_frame

        # (heads, frames) are folded into SDPA's head axis: a 4-D call stays on the fused CPU kernel
        # (a 5-D one falls back to the unfused math path, measured 3x slower).
        query = query.reshape(batch, heads * num_frames, spatial, head_dim)

        def windows(x: torch.Tensor) -> torch.Tensor:
            x = x.view(batch, heads, num_frames, spatial, head_dim)
            x = F.pad(x, (0, 0, 0, 0, window - 1, 0))
            x = x.unfold(2, window, 1)  # (B, h, F, S, hd, W): slot w is frame f - W + 1 + w
            return x.permute(0, 1, 2, 5, 3, 4).reshape(batch, heads * num_frames, window * spatial, head_dim)

        slot_frame = torch.arange(num_frames, device=query.device)[:, None] - window + 1 \
            + torch.arange(window, device=query.device)[None, :]
        valid = (slot_frame >= 0).repeat_interleave(spatial, dim=1)  # (F, W*S)
        valid = valid[None].expand(heads, -1, -1).reshape(1, heads * num_frames, 1, window * spatial)
        out = attention(query, windows(key), windows(value), to_additive(valid))
        return out.reshape(batch, heads, num_frames * spatial, head_dim)

    # --------------------------------------------------------------- contract
    def prepare(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        poses: torch.Tensor | None = None,
        drop_context: torch.Tensor | None = None,
    ) -> dict:
        """Run the context through every block once (t = 0) and cache its keys, values and states.

        Shapes as in :mod:`come_rl.nets.backbone`; returns a dict the caller treats as opaque.
        """
        num_context, num_targets = self._validate_prepare(context, actions, poses, drop_context)
        batch = context.shape[0]
        context_visible = None if drop_context is None or not bool(drop_context.any()) else ~drop_context
        frame_conditions = self._frame_conditions(actions.to(context.dtype), poses, context_visible)
        # Context positions are right-aligned so that the last context frame always has position K-1.
        offset = self.context_frames - num_context
        tokens = self.context_patch_embed(self._patchify(context)) + self.spatial_position \
            + self.temporal_position[offset:offset + num_context][None, :, None, :]
        clean_level = self._noise_embedding(torch.zeros(1, device=context.device))
        context_conditions = frame_conditions[:, :num_context] + clean_level[:, None, :]

        positions = torch.arange(num_context, device=context.device)
        dense_masks: dict[bool, torch.Tensor | None] = {}
        context_keys, context_values, recurrent_states = [], [], []
        for layer, block in enumerate(self.blocks):
            full = self.config.is_full_attention(layer)
            if full or self.config.window_frames >= num_context:
                if full not in dense_masks:
                    # Full layers: context is bidirectional (no mask); a window covering the whole
                    # context is plain causal attention over frames.
                    dense_masks[full] = None if full else self._additive_token_mask(
                        self._frame_mask(positions, positions, num_context, False, None))

                def attend(q, k, v, mask=dense_masks[full]):
                    return attention(q, k, v, mask)
            else:
                def attend(q, k, v):
                    return self._banded_context_attention(q, k, v, num_context)
            tokens, key, value = block(tokens, context_conditions, attend)
            context_keys.append(key)
            context_values.append(value)
            if str(layer) in self.recurrences:
                tokens, state = self.recurrences[str(layer)](tokens, None)
                if context_visible is not None:
                    state = state * context_visible[:, None, None].to(state.dtype)
                recurrent_states.append(state)
            else:
                recurrent_states.append(None)

        last_frame = context[:, -1]
        if context_visible is not None:
            last_frame = last_frame * context_visible[:, None, None, None].to(last_frame.dtype)
        return {
            "context_keys": context_keys,
            "context_values": context_values,
            "recurrent_states": recurrent_states,
            "target_conditions": frame_conditions[:, num_context:],
            "last_frame": last_frame,
            "context_visible": context_visible if context_visible is not None
            else torch.ones(batch, dtype=torch.bool, device=context.device),
            "any_dropped": context_visible is not None,
            "num_context": num_context,
            "num_targets": num_targets,
        }

    def _embed_targets(self, state: dict, noisy: torch.Tensor) -> torch.Tensor:
        inputs = noisy
        if self.config.last_frame_shortcut:
            inputs = torch.cat([noisy, state["last_frame"][:, None].expand_as(noisy)], dim=2)
        start = self.context_frames
        return self.target_patch_embed(self._patchify(inputs)) + self.spatial_position \
            + self.temporal_position[start:start + noisy.shape[1]][None, :, None, :]

    def _validate_denoise(self, state: dict, noisy: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self._check_frames(noisy, "noisy", self.predicted_frames)
        batch = state["last_frame"].shape[0]
        if noisy.shape[0] != batch or noisy.shape[1] != state["num_targets"]:
            raise ValueError(f"noisy must be (batch={batch}, predicted={state['num_targets']}, ...) as fixed by "
                             f"prepare's actions, got {tuple(noisy.shape)}; expand_state the state for more rows")
        t = torch.as_tensor(t, dtype=noisy.dtype, device=noisy.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("t contains NaN or Inf; noise levels must lie in [0, 1]")
        return t

    def denoise(self, state: dict, noisy: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Predict the targets' output ``(B, n, C, H, W)`` from cached context and ``noisy (B, n, C, H, W)``."""
        t = self._validate_denoise(state, noisy, t)
        num_context, num_targets = state["num_context"], state["num_targets"]
        spatial = self.config.tokens_per_frame
        tokens = self._embed_targets(state, noisy)
        conditions = state["target_conditions"] + self._noise_embedding(t)[:, None, :]
        context_visible = state["context_visible"] if state["any_dropped"] else None

        query_positions = torch.arange(num_context, num_context + num_targets, device=noisy.device)
        # A window layer's targets see context frames from position first_target - W + 1 on only:
        # slice the cache there (exact: the mask would hide the rest anyway).
        window = self.config.window_frames
        window_start = 0 if window is None else max(0, num_context - window + 1)
        masks: dict[bool, torch.Tensor | None] = {}
        for full in {self.config.is_full_attention(layer) for layer in range(self.config.depth)}:
            start = 0 if full else window_start
            key_positions = torch.arange(start, num_context + num_targets, device=noisy.device)
            masks[full] = self._additive_token_mask(
                self._frame_mask(query_positions, key_positions, num_context, full, context_visible))

        for layer, block in enumerate(self.blocks):
            full = self.config.is_full_attention(layer)
            start_token = 0 if full else window_start * spatial
            cached_key = state["context_keys"][layer][:, :, start_token:]
            cached_value = state["context_values"][layer][:, :, start_token:]

            def attend(q, k, v, cached_key=cached_key, cached_value=cached_value, mask=masks[full]):
                keys = torch.cat([cached_key, k], dim=2)
                values = torch.cat([cached_value, v], dim=2)
                return attention(q, keys, values, mask)

            tokens, _, _ = block(tokens, conditions, attend)
            if str(layer) in self.recurrences:
                tokens, _ = self.recurrences[str(layer)](tokens, state["recurrent_states"][layer])
        return self._output(tokens, conditions, noisy)

    def _output(self, tokens: torch.Tensor, conditions: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        shift, scale = self.final_modulation(conditions)[:, :, None, :].chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(tokens), shift, scale))
        if self.noisy_skip_gate is not None:
            out = out + self.noisy_skip_gate(conditions)[:, :, None, :] * self._patchify(noisy)
        return self._unpatchify(out)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, depth={c.depth}, heads={c.num_heads}, patch={c.patch_size}, "
                f"frames={c.context_frames}+{c.predicted_frames}, window={c.window_frames}, "
                f"full_layers={list(c.full_attention_layers)}, ssm_layers={list(c.ssm_layers)}, pose_dim={c.pose_dim}")

