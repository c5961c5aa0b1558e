"""The long-term memory expert p_psi(c_LT)(x | c): the base expert fine-tuned on the episode at test time.

Memorization (paper B, "Test-time adaptation of LTM") is the training step itself: the same loss
(``DiffusionExpert.loss``) and noise-level sampler (``sample_noise_levels``) as ``come_rl.train``, on clips drawn from
the episode store, with a fresh AdamW per episode. Two ways to hold the memory (``MemorizeConfig.method``):
  * ``"lora"``: low-rank adapters (peft) on the chosen layers, so the backbone keeps its general prior (the paper's
    LTM for Memory Maze);
  * ``"full"``: every weight of a copy of the base is trained (the authors' Memory Cards memory expert).
``reset()`` restores the expert bit-exactly to the base (adapters B = 0, or the copied weights), so nothing leaks from
one episode to the next.

Where the episode never shows what a context hides (a tile seen open only before it was covered), clips of the episode
teach the memory nothing about it; two clip sources beside the plain one address that: time-reversed clips for worlds
that declare their inverse actions (``reverse_fraction``), and pose-keyed revisit clips that pair a context with a view
of the same place from another time (``revisit_fraction``, any world with poses).

The noise levels memorization trains on are a first-class knob (``noise_low``, ``uniform_fraction``). Measured on
Memory Cards (results/recall/README.md): U[0.5, 1] recalls far better than U[0.95, 1] (the identity of a hidden object
is decided at middle noise levels too, and a copy trained only near pure noise forgets how to denoise below it) and
than the training distribution U[0, 1] (steps spent on low noise levels, where the noisy frame already shows the
object, teach no memory).
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from come_rl import devices
from come_rl.experts.episode_memory import EpisodeMemory
from come_rl.experts.expert import DiffusionExpert


@dataclass
class MemorizeConfig:
    """How the LTM memorizes an episode.

    Attributes:
        method: "lora" (adapters) or "full" (fine-tune every weight of a copy of the base).
        rank: LoRA rank (paper: 8-256; 16 costs ~2x sampling time at r=16 in their streaming setting).
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / rank).
        target_modules: regex over module names of the backbone that get adapters (Conv2d / Linear only).
        steps: gradient steps per ``memorize`` call (paper streaming: 25 every 50 frames).
        batch_size: clips per step.
        lr: AdamW learning rate of the adapters.
        noise_low, uniform_fraction: noise levels U[noise_low, 1], with a uniform_fraction of rows from U[0, 1].
        window: memorize the last ``window`` frames only (None = the whole episode).
        reverse_fraction: share of each batch drawn as time-reversed clips (needs ``inverse_actions``).
        inverse_actions: per discrete action, the action that undoes it (declared by reversible worlds).
        revisit_fraction: share of each batch drawn as pose-keyed revisit clips (needs poses; with a pose model every
            action is tried, without one the recorded step).
        drop_context_fraction: share of rows trained in the unconditional mode (the context dropped): the memory
            of the episode's views without their context.
        short_context_fraction: share of rows memorized as if the episode had begun at the clip's newest context
            frame (older context frames replaced by it, their actions zeroed, as ``imagine`` pads an episode's start):
            the memory is keyed on the current view, not on what happened to precede it in this episode (in a
            zig-zag, the neighbour tile just seen open), which a later query does not repeat.
        weight_decay: AdamW weight decay.
        optimizer: "adamw" (the default) or "sgd" (with ``momentum``): Adam moves every trained weight by about lr
            per step whatever its gradient, SGD in proportion to it.
        momentum: SGD's momentum (``optimizer="sgd"`` only).
    """

    method: str = "lora"
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
    reverse_fraction: float = 0.0
    reverse_pad_end: bool = False
    """reversed clips may run past the episode's end (last frame repeated, zero actions), so the last transitions of
    the episode are memorized backwards too (EpisodeMemory.sample_reversed_clips)."""
    inverse_actions: list[int] | None = None
    revisit_fraction: float = 0.0
    revisit_tolerance: float = 0.25
    drop_context_fraction: float = 0.0
    short_context_fraction: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    shortcut_fraction: float = 0.0
    """a shortcut (step-conditioned) base, ``come_rl.shortcut``: this fraction of each batch memorizes by the
    self-consistency part of that base's training loss (the copy's own two half steps as the target of one step of
    1, 2, ... ``shortcut_max_steps``), the rest by the plain loss; 0: the plain loss only."""
    shortcut_max_steps: int = 4
    full_parameters: str = ""
    """regex over parameter names of the backbone that memorization trains in full. With method "lora": trained
    beside the adapters (e.g. "pos_maps.*", the U-Net's learned positional maps); empty = adapters only (the paper's
    LTM). With method "full": the weights of the copy that are trained, the rest frozen (e.g. the U-Net's decoder,
    so the backward pass stops there); empty = every weight. reset() restores them exactly."""

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"memorize method must be 'lora' or 'full', got {self.method!r}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"memorize steps must be an integer >= 1, got {self.steps!r}")
        if self.batch_size < 1:
            raise ValueError(f"memorize batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"memorize lr must be a finite number > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"memorize optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"memorize momentum must lie in [0, 1), got {self.momentum}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"memorize weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0.0 <= self.noise_low < 1.0:
            raise ValueError(f"memorize noise_low must lie in [0, 1), got {self.noise_low}")
        if self.window is not None and self.window < 2:
            raise ValueError(f"memorize window must be None or >= 2 frames, got {self.window}")
        for name in ("reverse_fraction", "revisit_fraction", "drop_context_fraction", "uniform_fraction",
                     "change_weighting", "short_context_fraction", "shortcut_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"memorize {name} must lie in [0, 1], got {value}")
        if self.shortcut_fraction > 0:
            from come_rl.shortcut import check_max_steps

            check_max_steps(self.shortcut_max_steps)
        if self.reverse_fraction + self.revisit_fraction > 1.0:
            raise ValueError("reverse_fraction + revisit_fraction must be <= 1 (they share one batch)")
        if self.reverse_fraction > 0 and not self.inverse_actions:
            raise ValueError("reverse_fraction > 0 needs inverse_actions: only worlds that declare how to undo each "
                             "action (e.g. Memory Cards' INVERSE_ACTIONS) can be memorized backwards in time")


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
        if config.method == "lora":
            targets = lora_target_names(backbone, config.target_modules)
            lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets)
            backbone = inject_adapter_in_model(lora, backbone)
        else:
            targets = []
        super().__init__(backbone, base.schedule, name=name, uses_poses=base.uses_poses, target=base.target,
                         prediction=base.prediction)
        self.config, self.targets = config, targets
        # The trained expert it adapts (what a checkpoint saves: never episode memory); kept out of the module tree
        # so that it adds nothing to this expert's parameters or state_dict.
        object.__setattr__(self, "source", base)
        full = re.compile(config.full_parameters or (".*" if config.method == "full" else "(?!)"))
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("lora_" in name or bool(full.fullmatch(name)))
        self.adapter_parameters = [p for p in self.backbone.parameters() if p.requires_grad]
        if config.full_parameters and not any(full.fullmatch(name) for name, _ in self.backbone.named_parameters()):
            raise ValueError(f"memorize full_parameters {config.full_parameters!r} matches no parameter of the "
                             f"backbone (names look like {next(iter(dict(self.backbone.named_parameters())))!r})")
        # Fully trained parameters are restored from these copies on reset(), so episodes never leak.
        self._initial_full = {name: p.detach().clone() for name, p in self.backbone.named_parameters()
                              if p.requires_grad and "lora_" not in name}
        self._optimizer: torch.optim.Optimizer | None = None
        self.memorized_steps = 0
        # Inference runs on a plain copy of the base with W + delta_W folded in (no LoRA branches): after
        # memorization the LTM costs exactly one base forward. It is rebuilt lazily when the adapters change.
        self._merged = copy.deepcopy(base.backbone).eval() if config.method == "lora" else None
        self._merged_version = -1
        self.eval()

    def _merged_backbone(self) -> nn.Module:
        if self._merged_version != self.memorized_steps:
            merged_state = {}
            device_type = devices.module_device(self._merged).type
            # W + B A in float32 even when sampling runs under bf16 autocast: the merged weights are the model's.
            with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
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
        return self.backbone if self.training or self._merged is None else self._merged_backbone()

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

    def check_memorize(self, memory: EpisodeMemory, steps: int | None = None, pose_model=None,
                       **overrides) -> tuple[MemorizeConfig, int]:
        """Validate a memorize call (before any weight changes); returns the call's config and step count."""
        config = _replace(self.config, overrides)
        steps = config.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or steps < 1:
            raise ValueError(f"memorize steps must be an integer >= 1, got {steps!r}")
        steps = int(steps)
        clip_length = self.context_frames + 1
        if len(memory) == 0:
            raise ValueError("memorize() on an empty memory: observe frames of the episode first")
        if len(memory) < clip_length + (1 if config.reverse_fraction > 0 else 0):
            raise ValueError(f"memorize needs at least {clip_length} observed frames (context {self.context_frames} + 1); "
                             f"the episode memory holds {len(memory)}")
        if config.window is not None and config.window > len(memory):
            raise ValueError(f"memorize window={config.window} is longer than the episode ({len(memory)} frames "
                             f"observed); lower window or observe more frames")
        if config.window is not None and config.window < clip_length + (1 if config.reverse_fraction > 0 else 0):
            raise ValueError(f"memorize window={config.window} is shorter than one training clip ({clip_length} frames)")
        if config.revisit_fraction > 0 and memory.poses is None:
            raise ValueError("revisit_fraction > 0 needs poses in the memory: observe(frame, action, pose) every frame")
        return config, steps

    def memorize(self, memory: EpisodeMemory, steps: int | None = None, generator: torch.Generator | None = None,
                 pose_model=None, precision: str = "fp32", **overrides) -> dict:
        """Fine-tune on clips of ``memory`` for ``steps`` gradient steps of the training loss; returns loss statistics.

        ``overrides`` may set any :class:`MemorizeConfig` field for this call (batch_size, lr, noise_low, ...).
        ``pose_model`` (poses, actions) -> next poses is needed for revisit clips. ``precision``: "fp32", or "bf16"
        (autocast of the forward pass, on CUDA; ``come_rl.devices``).
        """
        config, steps = self.check_memorize(memory, steps, pose_model, **overrides)
        clip_length = self.context_frames + 1
        kind = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
        if not isinstance(self._optimizer, kind):  # the first call, or this call's override changed the optimizer
            self._optimizer = (torch.optim.SGD(self.adapter_parameters, lr=config.lr, momentum=config.momentum,
                                               weight_decay=config.weight_decay) if kind is torch.optim.SGD
                               else torch.optim.AdamW(self.adapter_parameters, lr=config.lr,
                                                      weight_decay=config.weight_decay))
        for group in self._optimizer.param_groups:
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
            if kind is torch.optim.SGD:
                group["momentum"] = config.momentum
        self.train()
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            frames, actions, poses = self._memorization_batch(memory, config, clip_length, pose_model, generator)
            pose_input = None
            if self.uses_poses and poses is not None:
                from come_rl.conventions import pose_features

                pose_input = pose_features(poses)
            with devices.autocast(self.device, precision):
                if config.shortcut_fraction > 0:
                    loss = self._shortcut_loss(frames, actions, pose_input, config, generator)
                else:
                    loss = self.loss(frames, actions, pose_input, drop_prob=config.drop_context_fraction,
                                     noise_low=config.noise_low, uniform_fraction=config.uniform_fraction,
                                     generator=generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"memorization loss became {loss.item()}; lower lr (now {config.lr})")
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            losses.append(loss.item())
        self.eval()
        self.memorized_steps += steps
        seconds = time.perf_counter() - start
        return {"steps": steps, "seconds": seconds, "loss_first": losses[0] if losses else float("nan"),
                "loss_last": losses[-1] if losses else float("nan"), "total_steps": self.memorized_steps}

    def _shortcut_loss(self, frames, actions, poses, config: MemorizeConfig, generator) -> torch.Tensor:
        """The shortcut base's training loss on a memorization batch (``come_rl.shortcut``): the noise drawn as
        :meth:`loss` draws it, then the step counts; the self-consistency rows' targets from this copy itself."""
        from come_rl.diffusion import sample_noise_levels
        from come_rl.shortcut import draw_step_counts, shortcut_batch

        if not self.step_conditioned:
            raise ValueError("memorize shortcut_fraction > 0 needs a shortcut base (a step-conditioned U-Net trained "
                             "with come_rl.train shortcut_fraction=...)")
        b = frames.shape[0]
        t = sample_noise_levels(b, low=config.noise_low, uniform_fraction=config.uniform_fraction, generator=generator)
        eps = devices.randn(tuple(frames[:, -1].shape), generator=generator)
        drop = (devices.rand((b,), generator=generator) < config.drop_context_fraction
                if config.drop_context_fraction > 0 else None)
        counts = draw_step_counts(b, config.shortcut_fraction, config.shortcut_max_steps,
                                  generator if generator is not None else torch.default_generator)
        t, targets, step = shortcut_batch(self, frames, actions, poses, t, eps, drop, counts, config.shortcut_max_steps)
        return self.loss(frames, actions, poses, t=t, eps=eps, drop=drop, distill_target=targets, step=step)

    @staticmethod
    def _memorization_batch(memory: EpisodeMemory, config: MemorizeConfig, clip_length: int, pose_model,
                            generator: torch.Generator | None):
        """One batch: plain clips of the episode, plus the time-reversed and revisit shares of the config."""
        n_reverse = int(round(config.reverse_fraction * config.batch_size))
        n_revisit = int(round(config.revisit_fraction * config.batch_size))
        parts = []
        if n_revisit:
            revisit = memory.sample_revisit_clips(n_revisit, clip_length, pose_model, config.revisit_tolerance,
                                                  generator=generator)
            if revisit is not None:
                parts.append(revisit)
            else:
                n_revisit = 0
        if n_reverse:
            parts.append(memory.sample_reversed_clips(n_reverse, clip_length, config.inverse_actions, config.window,
                                                      generator, pad_end=config.reverse_pad_end))
        n_plain = config.batch_size - n_reverse - n_revisit
        if n_plain > 0:
            parts.append(memory.sample_clips(n_plain, clip_length, config.window, generator,
                                             change_weighting=config.change_weighting))
        frames = torch.cat([p[0] for p in parts])
        actions = torch.cat([p[1] for p in parts])
        has_poses = all(p[2] is not None for p in parts)
        poses = torch.cat([p[2] for p in parts]) if has_poses else None
        n_short = int(round(config.short_context_fraction * config.batch_size))
        if n_short and clip_length > 2:
            rows = torch.randperm(frames.shape[0], generator=generator, device=frames.device)[:n_short]
            newest = clip_length - 2  # the newest context frame; the last frame of a clip is the target
            frames[rows, :newest] = frames[rows, newest:newest + 1]
            actions[rows, :newest] = 0.0
            if poses is not None:
                poses[rows, :newest] = poses[rows, newest:newest + 1]
        return frames, actions, poses


def _replace(config: MemorizeConfig, overrides: dict) -> MemorizeConfig:
    import dataclasses

    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"unknown memorize options {sorted(unknown)}")
    return dataclasses.replace(config, **overrides)
