"""A small convolutional video U-Net for pixel worlds (the paper used a U-Net for Memory Cards).

Design choices that buy world-model quality per CPU-hour (docs/design.md, measured probe):
* Context frames are concatenated with the noisy target along channels, so every pixel sees its own past directly.
* Frames are pixel-unshuffled (size/f) so the network runs at 16x16 with levels 16/8/4; for the 4x4 Memory Cards
  grid the 4x4 bottleneck has one cell per tile.
* FiLM conditioning from the noise level, the current and previous action, the pose (SLTM) and a "context dropped"
  flag (the unconditional mode used by the composition).
* A learned positional map per level: convolutions alone cannot tell where on the grid they are.
* The context's contribution to the first convolution is linear in the context, so ``prepare`` computes it once and
  every denoising step and every planner candidate reuses it (the block-causal cache of the transformer, for convs).
* Optionally (``warp_anchor``) a motion prior: a small conv net predicts a coarse flow field from the last two
  context frames and the actions, and warps the last frame by it (:class:`FlowWarp`). The warped frame is an extra
  context input and the *anchor* of a residual expert (the expert denoises the next frame minus the warped last
  frame), trained by its own photometric loss. In Memory Maze nearly every step moves the whole view (a turn shifts
  it by ~12 pixels of 64): a network of 4x4-pixel cells moves textures by whole cells only with effort, a warp does it
  exactly, leaving the diffusion model what motion cannot explain (the strip a turn reveals, what memory knows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from come_rl.nets.backbone import VideoBackbone, timestep_embedding


@dataclass
class UNetConfig:
    """Configuration of :class:`VideoUNet`.

    Attributes:
        frame_size: height = width of frames in pixels.
        channels: colour channels per frame.
        context_frames: K clean frames the prediction conditions on.
        action_dim: size of an action vector (one-hot for discrete spaces).
        pose_dim: size of per-frame pose features (0 = no pose conditioning).
        unshuffle: pixel-unshuffle factor f; the network runs at frame_size / f.
        widths: channels of each level (the first at frame_size / f, each next one at half resolution).
        blocks_per_level: residual blocks per level in the encoder (the decoder has one more, for the skip).
        cond_dim: width of the FiLM conditioning embedding.
        bottleneck_attention: one self-attention block at the lowest level (16 tokens at 4x4: global reasoning
            for almost no compute).
    """

    frame_size: int = 48
    channels: int = 3
    context_frames: int = 3
    action_dim: int = 5
    pose_dim: int = 0
    unshuffle: int = 3
    widths: list[int] = field(default_factory=lambda: [48, 96, 192])
    blocks_per_level: int = 1
    cond_dim: int = 128
    bottleneck_attention: bool = True
    warp_anchor: bool = False
    """predict the last frame warped by a learned flow (:class:`FlowWarp`): an extra input, and a residual expert's
    anchor."""
    warp_width: int = 64
    context_noise: bool = False
    """context-noise augmentation (GameNGen, Diffusion Forcing): training adds Gaussian noise of a random level to the
    context frames and the level enters the FiLM conditioning, so that an autoregressive rollout, whose context holds
    the model's own imperfect frames, is not outside what training showed (the cure for drift). Zero-initialised:
    a network warm-started from one without it predicts exactly what that one predicts at level 0."""
    context_level_at_inference: float = 0.0
    """the level sampling tells the network (no noise is added at sampling: the level only says how far to trust the
    context)."""
    retrieval: bool = False
    """the first context slot holds the memorized frame seen nearest the predicted frame's pose, not a past frame
    (``come_rl.experts.retrieval``); the difference of the two poses' features enters the FiLM conditioning
    (zero-initialised: warm-started from an expert without it, it begins as that expert with its oldest context
    frame's weights at zero). Needs pose features (``pose_dim``)."""
    retrieval_blind: bool = False
    """a retrieving expert without past frames: every context slot holds the retrieved view (training and sampling
    alike), so what it predicts depends on the memory and the poses only and cannot drift with its own frames."""
    step_conditioned: bool = False
    """a shortcut model (Frans et al. 2025, ``come_rl.shortcut``): the network is also told the DDIM step size d it is
    sampled with (a zero-initialised embedding added to the noise level's), so that one step of size d lands where
    smaller steps would; d = 0 is the ordinary denoiser (training's plain rows, memorization, many-step sampling). Warm-
    started from an expert without it, it begins as that expert."""
    staleness_levels: int = 0
    """> 0 (a retrieving expert trained with stale clips, ``retrieval_stale_fraction``): the context level
    (``context_noise``'s FiLM input) tells how many steps its past frames lag, divided by this; sampling tells it the
    number of frames imagined so far (``WorldModel.imagine``), so the expert knows when its past frames are its own
    and leans on the retrieved view. An STM with a window recall trained with told stale clips
    (``stale_recent_told``): the level is how many of its newest context frames are stale (in a rollout: imagined),
    divided by this (its context length), and the recall learns a score for those frames (``WindowRecall.stale_logit``),
    so it can prefer the window's real frames. 0: no such input."""
    window_recall: bool = False
    """an STM that recalls a view from its window (:class:`WindowRecall`): attention over the context frames keyed by
    the actions taken since each was seen, whose weighted frame is one more context input (zero-initialised: warm-
    started from an expert without it, it begins as that expert). A channel-stacked convolution cannot tell which old
    frame shows the next view (it depends on the motion since), so it learns to ignore the older frames; the recall
    can route the one that does (a turn that comes back)."""

    def __post_init__(self) -> None:
        if self.frame_size % self.unshuffle:
            raise ValueError(f"frame_size {self.frame_size} must be divisible by unshuffle {self.unshuffle}")
        base = self.frame_size // self.unshuffle
        if base % (2 ** (len(self.widths) - 1)):
            raise ValueError(f"frame_size/unshuffle = {base} must be divisible by 2^(levels-1) = {2 ** (len(self.widths) - 1)}")
        if self.context_frames < 1:
            raise ValueError(f"context_frames must be >= 1, got {self.context_frames}")
        if self.retrieval and (self.pose_dim == 0 or self.context_frames < (3 if self.warp_anchor else 2)):
            raise ValueError("retrieval needs pose features (pose_dim > 0: train with pose_features=true) and a context of the retrieved frame plus "
                             f"{2 if self.warp_anchor else 1} past frame(s) (context_frames >= "
                             f"{3 if self.warp_anchor else 2}); got pose_dim={self.pose_dim}, "
                             f"context_frames={self.context_frames}")
        if self.retrieval_blind and not self.retrieval:
            raise ValueError("retrieval_blind is for a retrieving U-Net (retrieval=true)")
        if self.staleness_levels and not ((self.retrieval or self.window_recall) and self.context_noise):
            raise ValueError("staleness_levels is for a retrieving U-Net or an STM with a window recall, with a context "
                             f"level input (retrieval=true or window_recall=true, context_noise=true); got "
                             f"retrieval={self.retrieval}, window_recall={self.window_recall}, "
                             f"context_noise={self.context_noise}")
        if self.window_recall and (self.context_frames < 2 or self.retrieval):
            raise ValueError("window_recall recalls a view among >= 2 past context frames of an STM (not a retrieving "
                             f"expert); got context_frames={self.context_frames}, retrieval={self.retrieval}")


def _groups(ch: int) -> int:
    return math.gcd(ch, 8) if ch % 8 else 8


class FiLMResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # Zero-init the last conv so every block starts as the identity: deep residual nets train from step one.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        self.heads = heads
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class FlowWarp(nn.Module):
    """The last context frame warped by a coarse flow field that a small conv net predicts from the last two context
    frames and the current and previous action. The flow lives on the pixel-unshuffled grid (frame_size / unshuffle
    cells), is upsampled bilinearly to pixels and applied with ``grid_sample`` (border padding). The last layer starts
    at zero: an untrained warp is the identity, i.e. copying the last frame."""

    max_shift: float = 16.0
    """the largest displacement it can express, in pixels (tanh-bounded)."""

    def __init__(self, channels: int, unshuffle: int, action_dim: int, width: int = 64):
        super().__init__()
        self.unshuffle = unshuffle
        in_ch = 2 * channels * unshuffle * unshuffle + 2 * action_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def flow(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W), (B, K + 1, A) -> flow (B, 2, H, W) in pixels (x right, y down)."""
        b, k, c, h, w = context.shape
        pair = context[:, -2:] if k >= 2 else context[:, -1:].expand(b, 2, c, h, w)
        x = F.pixel_unshuffle(pair.flatten(1, 2), self.unshuffle)
        act = torch.cat([actions[:, -1], actions[:, -2]], dim=-1).to(x.dtype)
        x = torch.cat([x, act[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        coarse = torch.tanh(self.net(x).float() / self.max_shift) * self.max_shift
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The last context frame warped: (B, C, H, W)."""
        last = context[:, -1].float()
        b, _, h, w = last.shape
        flow = self.flow(context, actions)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=last.device)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=last.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x + flow[:, 0] * (2.0 / w), grid_y + flow[:, 1] * (2.0 / h)], dim=-1)
        return F.grid_sample(last, grid, mode="bilinear", padding_mode="border", align_corners=False)


class WindowRecall(nn.Module):
    """Which frame of the window shows the next view? Attention over the K context frames whose key for frame j is the
    actions taken since it (their sum over steps j + 1 .. K, the step into the target included, divided by
    ``COUNT_SCALE``) and its age (K - j) / K; a learned "none" slot contributes nothing. The weighted frame is
    pixel-unshuffled and enters the first layer through its own convolution, zero-initialised, so an expert warm-
    started without the recall begins exactly as it was. A turn that comes back (left, left, right, right) sums to no
    turn: the key of the frame seen before it."""

    COUNT_SCALE = 4.0

    def __init__(self, action_dim: int, context_frames: int, inputs: int, width: int, unshuffle: int, hidden: int = 64,
                 told_stale: bool = False):
        super().__init__()
        self.context_frames, self.unshuffle = context_frames, unshuffle
        self.key = nn.Sequential(nn.Linear(action_dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.none_logit = nn.Parameter(torch.zeros(1))
        # Told which newest frames are stale (imagined): one learned score added to theirs, zero at the start.
        self.stale_logit = nn.Parameter(torch.zeros(1)) if told_stale else None
        self.conv = nn.Conv2d(inputs, width, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def weights(self, actions: torch.Tensor, stale: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K + 1, A) -> (B, K + 1): the attention on each context frame, oldest first, and on "none" (last).
        ``stale`` (B,): how many of the newest context frames are stale (a recall built with ``told_stale``)."""
        b, k = actions.shape[0], self.context_frames
        since = actions.flip(1).cumsum(1).flip(1)[:, 1:] / self.COUNT_SCALE  # (B, K, A): actions after frame j
        age = torch.arange(k, 0, -1, device=actions.device, dtype=since.dtype) / k
        scores = self.key(torch.cat([since, age[None, :, None].expand(b, k, 1)], dim=-1)).squeeze(-1)
        if stale is not None and self.stale_logit is not None:
            newest = torch.arange(k, device=actions.device)[None, :] >= k - stale.to(actions.device)[:, None]
            scores = scores + newest.to(scores.dtype) * self.stale_logit.to(scores.dtype)
        return torch.softmax(torch.cat([scores, self.none_logit.expand(b, 1).to(scores.dtype)], dim=1).float(), dim=1)

    def frame(self, context: torch.Tensor, actions: torch.Tensor, stale: torch.Tensor | None = None) -> torch.Tensor:
        """The recalled view (B, C, H, W): the context frames weighted by :meth:`weights` (zero for "none")."""
        w = self.weights(actions, stale)[:, :-1].to(context.dtype)
        return torch.einsum("bk,bkchw->bchw", w, context)

    def forward(self, context: torch.Tensor, actions: torch.Tensor, stale: torch.Tensor | None = None) -> torch.Tensor:
        """First-layer features of the recalled view: (B, width, H / unshuffle, W / unshuffle)."""
        return self.conv(F.pixel_unshuffle(self.frame(context, actions, stale), self.unshuffle))


class VideoUNet(VideoBackbone):
    """Predicts one future frame from K context frames; see the module docstring. Implements VideoBackbone."""

    predicted_frames = 1

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.context_frames, self.action_dim, self.pose_dim = config.context_frames, config.action_dim, config.pose_dim
        f, c, widths, d = config.unshuffle, config.channels, config.widths, config.cond_dim
        base = config.frame_size // f
        # The input convolution is split into a noisy-target part and a context part (their sum equals one conv over
        # the channel concatenation), so the context part can be cached by prepare().
        self.in_noisy = nn.Conv2d(c * f * f, widths[0], 3, padding=1)
        self.warp = FlowWarp(c, f, config.action_dim, config.warp_width) if config.warp_anchor else None
        context_inputs = config.context_frames + (1 if config.warp_anchor else 0)
        self.in_context = nn.Conv2d(context_inputs * c * f * f, widths[0], 3, padding=1, bias=False)
        self.recall = (WindowRecall(config.action_dim, config.context_frames, c * f * f, widths[0], f,
                                    told_stale=config.staleness_levels > 0)
                       if config.window_recall else None)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # Current and previous action: the previous one tells motion already under way (e.g. a turn in progress).
        self.action_embed = nn.Linear(2 * config.action_dim, d)
        self.pose_embed = nn.Linear(config.pose_dim, d) if config.pose_dim else None
        self.retrieval_pose_embed = nn.Linear(config.pose_dim, d) if config.retrieval else None
        if self.retrieval_pose_embed is not None:
            nn.init.zeros_(self.retrieval_pose_embed.weight)
            nn.init.zeros_(self.retrieval_pose_embed.bias)
        self.context_level_embed = nn.Linear(1, d) if config.context_noise else None
        if self.context_level_embed is not None:
            nn.init.zeros_(self.context_level_embed.weight)
            nn.init.zeros_(self.context_level_embed.bias)
        self.step_embed = nn.Linear(d, d) if config.step_conditioned else None
        if self.step_embed is not None:
            nn.init.zeros_(self.step_embed.weight)
            nn.init.zeros_(self.step_embed.bias)
        self.dropped_embed = nn.Parameter(torch.zeros(d))
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
        self.pos_maps = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, w, base >> i, base >> i)) for i, w in enumerate(widths)]
        )
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, w in enumerate(widths):
            self.down_blocks.append(nn.ModuleList([FiLMResBlock(w, w, d) for _ in range(config.blocks_per_level)]))
            if i < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(w, widths[i + 1], 3, stride=2, padding=1))
        self.mid_block = FiLMResBlock(widths[-1], widths[-1], d)
        self.mid_attention = AttentionBlock(widths[-1]) if config.bottleneck_attention else nn.Identity()
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up_blocks.append(FiLMResBlock(2 * w, w, d))
            if i > 0:
                self.upsamples.append(nn.Conv2d(w, widths[i - 1], 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.out_conv = nn.Conv2d(widths[0], c * f * f, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    # ------------------------------------------------------------------------------------------ contract
    def prepare(self, context, actions, poses=None, drop_context=None, context_level=None):
        cfg = self.config
        b, k = context.shape[:2]
        if context_level is not None and self.context_level_embed is None:
            raise ValueError("this U-Net was built without context_noise; it takes no context_level")
        if k != cfg.context_frames:
            raise ValueError(f"this U-Net conditions on {cfg.context_frames} context frames, got {k}")
        if actions.shape != (b, k + 1, cfg.action_dim):
            raise ValueError(f"actions must have shape ({b}, {k + 1}, {cfg.action_dim}) (context + 1 target), "
                             f"got {tuple(actions.shape)}")
        if drop_context is None:
            drop_context = torch.zeros(b, dtype=torch.bool, device=context.device)
        keep = (~drop_context).to(context.dtype)
        frames = context
        anchor = None
        if self.warp is not None:
            anchor = self.warp(context, actions)
            frames = torch.cat([context, anchor[:, None].to(context.dtype)], dim=1)
        packed = F.pixel_unshuffle(frames.flatten(1, 2), cfg.unshuffle)  # (B, K*C*f*f, h, w)
        context_features = self.in_context(packed * keep[:, None, None, None])
        if self.recall is not None:
            context_features = context_features + self.recall(
                context, actions, self.stale_count(context_level)) * keep[:, None, None, None]
        cond = self.action_embed(torch.cat([actions[:, -1], actions[:, -2]], dim=-1))
        if self.pose_embed is not None:
            if poses is None:
                raise ValueError(f"this U-Net is pose-conditioned (pose_dim={cfg.pose_dim}); pass poses (B, K+1, P)")
            if poses.shape != (b, k + 1, cfg.pose_dim):
                raise ValueError(f"poses must have shape ({b}, {k + 1}, {cfg.pose_dim}), got {tuple(poses.shape)}")
            cond = cond + self.pose_embed(poses[:, -1]) * keep[:, None]
            if self.retrieval_pose_embed is not None:  # where the retrieved frame (slot 0) was seen, from here
                cond = cond + self.retrieval_pose_embed(poses[:, 0] - poses[:, -1]) * keep[:, None]
        cond = cond + drop_context.to(cond.dtype)[:, None] * self.dropped_embed
        if self.context_level_embed is not None:
            if context_level is None:
                context_level = torch.full((b,), cfg.context_level_at_inference, device=context.device)
            cond = cond + self.context_level_embed(context_level.to(cond.dtype)[:, None]) * keep[:, None]
        state = {"context_features": context_features, "cond": cond}
        if anchor is not None:
            state["anchor"] = anchor
        return state

    def stale_count(self, context_level: torch.Tensor | None) -> torch.Tensor | None:
        """How many newest context frames a told STM's level says are stale (B,) long, or None (not told / no level)."""
        if context_level is None or self.recall is None or self.recall.stale_logit is None:
            return None
        return torch.round(context_level.float() * self.config.staleness_levels).long()

    def anchor_frame(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor | None:
        """The motion prior's prediction of the next frame (the warped last frame), or None without ``warp_anchor``."""
        return None if self.warp is None else self.warp(context, actions)

    def denoise(self, state, noisy, t):
        cfg = self.config
        if noisy.dim() != 5 or noisy.shape[1] != 1:
            raise ValueError(f"noisy must have shape (B, 1, C, H, W), got {tuple(noisy.shape)}")
        x = F.pixel_unshuffle(noisy[:, 0], cfg.unshuffle)
        cond = state["cond"] + self.time_mlp(timestep_embedding(t, cfg.cond_dim))
        step = state.get("step")
        if self.step_embed is not None:  # the DDIM step size d (B,) it is sampled with; absent: 0, the plain denoiser
            step = torch.zeros_like(t) if step is None else step.to(t.device).expand(t.shape[0])
            cond = cond + self.step_embed(timestep_embedding(step, cfg.cond_dim))
        elif step is not None and bool((step != 0).any()):
            raise ValueError("this U-Net was built without step_conditioned; it samples with any step size as the "
                             "plain denoiser and takes no step size")
        cond = self.cond_mlp(cond)
        h = self.in_noisy(x) + state["context_features"]
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            h = h + self.pos_maps[i]
            for block in blocks:
                h = block(h, cond)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid_attention(self.mid_block(h, cond))
        for j, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
            if j < len(self.upsamples):
                h = self.upsamples[j](F.interpolate(h, scale_factor=2, mode="nearest"))
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, cfg.unshuffle)[:, None]
