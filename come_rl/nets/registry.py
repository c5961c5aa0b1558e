"""The one registry of backbones and training presets: ``build_backbone("stm_cpu", frame_size=32, action_dim=5)``.

``BACKBONES`` maps a name to a factory ``(**overrides) -> VideoBackbone``: ``unet`` (the conv U-Net; overrides are
fields of :class:`come_rl.nets.unet.UNetConfig`) and the transformer entries below; add yours with
:func:`register_backbone`. ``MODEL_PRESETS`` names the recipes the project trains (``python -m come_rl.train
model=unet_cards``): a backbone name and its settings. A checkpoint records the backbone name and settings it was
built with, and is rebuilt through this registry.

The transformer entries (all :class:`come_rl.nets.dit.VideoDiT`; overrides are fields of
:class:`come_rl.nets.dit.VideoDiTConfig`):

| name | size | attention | frames (context -> predicted) |
|---|---|---|---|
| ``dit_cpu`` | hidden 128, 6 blocks, 4 heads, patch 4 | full | 3 -> 4 |
| ``dit_s`` | hidden 384, 12 blocks, 6 heads, patch 4 | full | 3 -> 17 (paper's base) |
| ``dit_b`` | hidden 768, 12 blocks, 12 heads, patch 4 | full | 3 -> 17 |
| ``stm_cpu`` | hidden 128, 4 blocks, 4 heads, patch 4 | window 4, full at [1] | 16 -> 4 |
| ``stm_paper`` | DiT-S | window 20, full at [2, 6] | 33 -> 17 (paper E.1) |
| ``sltm_cpu`` | hidden 128, 4 blocks, patch 8, poses (4) | full | 3 -> 4 |
| ``sltm_paper`` | DiT-B, patch 8, poses (4) | full | 3 -> 17 |
| ``full_attention_cpu`` | as ``stm_cpu`` | full | 16 -> 4 (baseline) |
| ``sliding_window_cpu`` | as ``stm_cpu`` | window 4 only | 16 -> 4 (baseline) |
| ``ssm_cpu`` | as ``stm_cpu`` | window 4 + gated recurrences after blocks 1, 3 | 16 -> 4 (baseline) |

Frame size defaults to 64 (Memory Maze); pass ``frame_size`` for other worlds. The paper works on
the 32x32 latents of a 2x VAE with patch 2 (SLTM: patch 4); on 64x64 pixels we use patch 4 (SLTM:
8), the same number of tokens per frame. The STM scales from the paper's 33 -> 17 frames with window
20 to 16 -> 4 frames with window 4 for CPU: the window keeps the same fraction of the context (~1/8
to 1/4) with few enough tokens to run on two cores, and full layer [1] of 4 mirrors [2, 6] of 12.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from come_rl.nets.backbone import VideoBackbone
from come_rl.nets.dit import VideoDiT, VideoDiTConfig
from come_rl.nets.unet import UNetConfig, VideoUNet

__all__ = ["BACKBONES", "DIT_CONFIGS", "MODEL_PRESETS", "PAPER_PRESETS", "build_backbone", "register_backbone"]

_CPU = {"frame_size": 64, "patch_size": 4, "hidden_size": 128, "num_heads": 4, "mlp_ratio": 4.0}
_LONG_CONTEXT_CPU = dict(_CPU, depth=4, context_frames=16, predicted_frames=4)
_DIT_S = {"frame_size": 64, "patch_size": 4, "hidden_size": 384, "depth": 12, "num_heads": 6}
_DIT_B = {"frame_size": 64, "patch_size": 4, "hidden_size": 768, "depth": 12, "num_heads": 12}

DIT_CONFIGS: dict[str, VideoDiTConfig] = {
    "dit_cpu": VideoDiTConfig(**_CPU, depth=6, context_frames=3, predicted_frames=4),
    "dit_s": VideoDiTConfig(**_DIT_S, context_frames=3, predicted_frames=17),
    "dit_b": VideoDiTConfig(**_DIT_B, context_frames=3, predicted_frames=17),
    "stm_cpu": VideoDiTConfig(**_LONG_CONTEXT_CPU, window_frames=4, full_attention_layers=(1,)),
    "stm_paper": VideoDiTConfig(**_DIT_S, context_frames=33, predicted_frames=17, window_frames=20,
                                full_attention_layers=(2, 6)),
    "sltm_cpu": VideoDiTConfig(**dict(_CPU, patch_size=8), depth=4, context_frames=3, predicted_frames=4,
                               pose_dim=4),
    "sltm_paper": VideoDiTConfig(**dict(_DIT_B, patch_size=8), context_frames=3, predicted_frames=17, pose_dim=4),
    "full_attention_cpu": VideoDiTConfig(**_LONG_CONTEXT_CPU),
    "sliding_window_cpu": VideoDiTConfig(**_LONG_CONTEXT_CPU, window_frames=4),
    "ssm_cpu": VideoDiTConfig(**_LONG_CONTEXT_CPU, window_frames=4, ssm_layers=(1, 3)),
}


def _check_options(config_cls: type, overrides: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options are {sorted(known)}")


def _dit_factory(base: VideoDiTConfig) -> Callable[..., VideoBackbone]:
    def build(**overrides: Any) -> VideoBackbone:
        _check_options(VideoDiTConfig, overrides, "VideoDiT")
        return VideoDiT(dataclasses.replace(base, **overrides))

    return build


def _build_unet(**settings: Any) -> VideoBackbone:
    _check_options(UNetConfig, settings, "VideoUNet")
    return VideoUNet(UNetConfig(**settings))


BACKBONES: dict[str, Callable[..., VideoBackbone]] = {"unet": _build_unet,
                                                      **{name: _dit_factory(cfg) for name, cfg in DIT_CONFIGS.items()}}

# Backbone recipes by preset name: (registry name, kwargs). CPU sizes train in minutes on 2 cores.
MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    # Memory Cards at 48x48: unshuffle 3 -> 16x16, levels 16/8/4 (one bottleneck cell per tile); 3.9M parameters.
    "unet_cards": ("unet", dict(frame_size=48, unshuffle=3, action_dim=5, context_frames=3, widths=[48, 96, 192])),
    # Memory Maze at 64x64: unshuffle 4 -> 16x16, levels 16/8/4.
    "unet_maze": ("unet", dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[64, 128, 256])),
    # Memory Maze with a motion prior: the last frame warped by a learned coarse flow is an input and the residual's
    # anchor (come_rl.nets.unet.FlowWarp); train it with target=residual.
    "unet_maze_warp": ("unet", dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=3, widths=[64, 128, 256],
                                    warp_anchor=True)),
    # Memory Maze spatial expert that retrieves: the motion-prior U-Net whose first context slot is the memorized frame
    # seen nearest the predicted pose (come_rl.experts.retrieval), then 3 past frames; train it with role=sltm
    # pose_features=true (init_from an SLTM of unet_maze_warp: it begins as that expert).
    "unet_maze_retrieval": ("unet", dict(frame_size=64, unshuffle=4, action_dim=6, context_frames=4,
                                         widths=[64, 128, 256], warp_anchor=True, retrieval=True)),
    # Short-term memory expert for Memory Cards: the sliding-window DiT (window 4 frames, full attention in block 1)
    # over 8 context frames; patch 8 on 48x48 = 36 tokens per frame keeps it CPU-sized.
    "stm_cards": ("stm_cpu", dict(frame_size=48, patch_size=8, context_frames=8, predicted_frames=1, action_dim=5,
                                  window_frames=4, full_attention_layers=[1])),
    # Spatial expert for Memory Cards: conditioned on the absolute cursor pose (x, y, sin, cos), 3 context frames.
    "sltm_cards": ("sltm_cpu", dict(frame_size=48, patch_size=8, context_frames=3, predicted_frames=1, action_dim=5,
                                    pose_dim=4)),
    # ---- The paper's expert sizes (paper E.1 / docs/design.md), for GPU users; the same command trains them. ----
    # The paper's Memory Cards U-Net size (paper Table 7: encoder channels 64/128/256/512, 8 resnets per level), 48x48.
    "unet_paper": ("unet", dict(frame_size=48, unshuffle=1, action_dim=5, context_frames=3,
                                widths=[64, 128, 256, 512], blocks_per_level=8)),
    # Memory Maze base image-to-video model: DiT-B (hidden 768, 12 blocks, 12 heads), 3 context -> 17 frames; patch 4
    # on 64x64 pixels gives the 16x16 tokens per frame of the paper's 32x32 VAE latents with patch 2. ~130M parameters.
    "dit_b_maze": ("dit_b", dict(frame_size=64, action_dim=6)),
    # Memory Maze STM: DiT-S, sliding window of 20 frames with full attention in blocks 2 and 6, 33 -> 17 frames.
    "stm_paper_maze": ("stm_paper", dict(frame_size=64, action_dim=6)),
    # Memory Maze SLTM: DiT-B with the patch doubled (8 on pixels = 4 on latents) and absolute poses (x, y, sin, cos);
    # train it with role=sltm pose_features=true.
    "sltm_paper_maze": ("sltm_paper", dict(frame_size=64, action_dim=6)),
}
PAPER_PRESETS = ("unet_paper", "dit_b_maze", "stm_paper_maze", "sltm_paper_maze")
"""the presets of the paper's expert sizes (too large to train on these CPUs; tests run one step of each)."""


def register_backbone(name: str, factory: Callable[..., VideoBackbone]) -> None:
    """Add ``factory`` under ``name`` (``BACKBONES[name] = factory`` with a duplicate check)."""
    if name in BACKBONES:
        raise ValueError(f"a backbone named {name!r} is already registered; pick another name")
    BACKBONES[name] = factory


def build_backbone(name: str, **overrides: Any) -> VideoBackbone:
    """Build the backbone registered as ``name`` with config fields replaced by ``overrides``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or register yours "
                         "with come_rl.nets.registry.register_backbone")
    return BACKBONES[name](**overrides)
