"""The long-term memory expert p_psi(c_LT)(x | c): the base expert plus LoRA adapters fine-tuned on the episode.

Memorization (paper B, "Test-time adaptation of LTM") runs the diffusion loss on clips drawn from the episode store,
updating only low-rank adapters (peft) so that the backbone keeps its general prior; ``reset()`` re-initialises the
adapters (B = 0), which makes the expert exactly the base again, so nothing leaks from one episode to the next.

The noise levels memorization trains on are a first-class knob (``noise_low``, ``uniform_fraction``): the episode's
memory only matters near pure noise, where the base model cannot recover an object from the noisy target itself.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from come_rl.experts.episode_memory import EpisodeMemory
from come_rl.experts.expert import DiffusionExpert


@dataclass
class MemorizeConfig:
    """How the LTM memorizes an episode.

    Attributes:
        rank: LoRA rank (paper: 8-256; 16 costs ~2x sampling time at r=16 in their streaming setting).
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / rank).
        target_modules: regex over module names of the backbone that get adapters (Conv2d / Linear only).
        steps: gradient steps per ``memorize`` call (paper streaming: 25 every 50 frames).
        batch_size: clips per step.
        lr: AdamW learning rate of the adapters.
        noise_low, uniform_fraction: noise levels U[noise_low, 1], with a uniform_fraction of rows from U[0, 1].
        window: memorize the last ``window`` frames only (None = the whole episode).
    """

    rank: int = 16
    lora_alpha: float = 16.0
    # The input convolutions (in_context / in_noisy: the U-Net's only layers that see raw pixels at full detail) must
    # be among the targets: without them LoRA did not lower the loss of the episode's uncovering transitions at all
    # (Memory Cards, 100 steps: 0.0121 -> 0.0121), with them it halved it (-> 0.0060), like full fine-tuning (0.0055).
    target_modules: str = (r".*(conv1|conv2|film|qkv|proj|fc1|fc2|skip|downsamples\.\d+|upsamples\.\d+|out_conv"
                           r"|in_context|in_noisy|patch_embed)$")
    steps: int = 25
    batch_size: int = 16
    # Measured on Memory Cards (a 35-min base; error of the episode's own uncover transitions, 100 steps): lr 2e-3 with
    # t ~ U[0.9, 1] cut it 38 %; lr 5e-3 with half uniform noise, or lr 3e-3 for 200 steps, made it worse.
    lr: float = 2e-3
    noise_low: float = 0.95
    uniform_fraction: float = 0.0
    window: int | None = None
    change_weighting: float = 0.0
    full_parameters: str = ""
    """regex over parameter names of the backbone that memorization trains in full beside the adapters (e.g.
    "pos_maps.*": the U-Net's learned positional maps, the natural place for "what is at which tile"); reset()
    restores them exactly. Empty = adapters only (the paper's LTM)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("memorize needs steps >= 0, batch_size >= 1 and lr > 0")


def lora_target_names(backbone: nn.Module, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    names = [name for name, module in backbone.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear)) and regex.fullmatch(name)]
    if not names:
        raise ValueError(f"target_modules {pattern!r} matches no Conv2d/Linear of the backbone")
    return names


class LongTermMemoryExpert(DiffusionExpert):
    """A copy of the base expert with LoRA adapters; see the module docstring."""

    def __init__(self, base: DiffusionExpert, config: MemorizeConfig | None = None, name: str = "ltm"):
        from peft import LoraConfig, inject_adapter_in_model

        config = config or MemorizeConfig()
        backbone = copy.deepcopy(base.backbone)
        targets = lora_target_names(backbone, config.target_modules)
        lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets)
        backbone = inject_adapter_in_model(lora, backbone)
        super().__init__(backbone, base.schedule, name=name, uses_poses=base.uses_poses)
        self.config, self.targets = config, targets
        # The trained expert it adapts (what a checkpoint saves: never episode memory); kept out of the module tree
        # so that it adds nothing to this expert's parameters or state_dict.
        object.__setattr__(self, "source", base)
        full = re.compile(config.full_parameters) if config.full_parameters else None
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("lora_" in name or bool(full and full.fullmatch(name)))
        self.adapter_parameters = [p for p in self.backbone.parameters() if p.requires_grad]
        # Fully trained parameters are restored from these copies on reset(), so episodes never leak.
        self._initial_full = {name: p.detach().clone() for name, p in self.backbone.named_parameters()
                              if p.requires_grad and "lora_" not in name}
        self._optimizer: torch.optim.Optimizer | None = None
        self.memorized_steps = 0
        # Inference runs on a plain copy of the base with W + delta_W folded in (no LoRA branches): after
        # memorization the LTM costs exactly one base forward. It is rebuilt lazily when the adapters change.
        self._merged = copy.deepcopy(base.backbone).eval()
        self._merged_version = -1
        self.eval()

    def _merged_backbone(self) -> nn.Module:
        if self._merged_version != self.memorized_steps:
            merged_state = {}
            with torch.no_grad():
                for name, module in self.backbone.named_modules():
                    if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                        delta = sum(module.get_delta_weight(adapter) for adapter in module.lora_A.keys())
                        merged_state[f"{name}.weight"] = module.base_layer.weight + delta
                        if module.base_layer.bias is not None:
                            merged_state[f"{name}.bias"] = module.base_layer.bias
                base_state = {k.replace(".base_layer.", "."): v for k, v in self.backbone.state_dict().items()
                              if "lora_" not in k}
                base_state.update(merged_state)
                self._merged.load_state_dict(base_state)
            self._merged_version = self.memorized_steps
        return self._merged

    def inference_backbone(self) -> nn.Module:
        # Memorization (train mode) runs through the LoRA branches; sampling runs the merged copy.
        return self.backbone if self.training else self._merged_backbone()

    def reset(self) -> None:
        """Re-initialise every adapter (A random, B = 0): the expert's outputs equal the base's exactly again."""
        for module in self.backbone.modules():
            if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
                for adapter in list(module.lora_A.keys()):
                    module.reset_lora_parameters(adapter, True)
        with torch.no_grad():
            parameters = dict(self.backbone.named_parameters())
            for name, value in self._initial_full.items():
                parameters[name].copy_(value)
        self._optimizer = None
        self.memorized_steps = 0
        self._merged_version = -1

    def memorize(self, memory: EpisodeMemory, steps: int | None = None, generator: torch.Generator | None = None,
                 **overrides) -> dict:
        """Fine-tune the adapters on clips of ``memory`` for ``steps`` gradient steps; returns loss statistics.

        ``overrides`` may set any :class:`MemorizeConfig` field for this call (batch_size, lr, noise_low, ...).
        """
        config = _replace(self.config, overrides)
        steps = config.steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"memorize steps must be >= 0, got {steps}")
        clip_length = self.context_frames + 1
        if len(memory) < clip_length:
            raise ValueError(f"memorize needs at least {clip_length} observed frames (context {self.context_frames} + 1); "
                             f"the episode memory holds {len(memory)}")
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.adapter_parameters, lr=config.lr, weight_decay=0.0)
        for group in self._optimizer.param_groups:
            group["lr"] = config.lr
        self.train()
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            frames, actions, poses = memory.sample_clips(config.batch_size, clip_length, config.window, generator,
                                                               change_weighting=config.change_weighting)
            pose_input = None
            if self.uses_poses and poses is not None:
                from come_rl.data_sources import pose_features

                pose_input = pose_features(poses)
            loss = self.loss(frames, actions, pose_input, noise_low=config.noise_low,
                             uniform_fraction=config.uniform_fraction, generator=generator)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            losses.append(loss.item())
        self.eval()
        self.memorized_steps += steps
        seconds = time.perf_counter() - start
        return {"steps": steps, "seconds": seconds, "loss_first": losses[0] if losses else float("nan"),
                "loss_last": losses[-1] if losses else float("nan"), "total_steps": self.memorized_steps}


def _replace(config: MemorizeConfig, overrides: dict) -> MemorizeConfig:
    import dataclasses

    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"unknown memorize options {sorted(unknown)}")
    return dataclasses.replace(config, **overrides)
