"""The CoME world model: experts composed at sampling time, an episode memory, and ``imagine(actions)``.

    wm = WorldModel.load("come_rl/checkpoints/memory_cards")      # base (+ STM / SLTM if present) + LTM
    wm.reset(); wm.observe(first_frame)
    for frame, action in stream: wm.observe(frame, action)          # short-term context and long-term store
    wm.memorize(steps=25)                                            # LoRA updates on the episode (LTM)
    frames = wm.imagine(actions)                                     # (B, H, A) -> (B, H, 3, height, width)

One imagined step samples the next frame (in frame space, whatever each expert's target) with the composition of the enabled experts
(``come_rl.composition``), then appends it to a per-candidate rolling context; horizons longer than one frame roll out
autoregressively. ``imagine`` runs without gradients and leaves the episode memory and the adapters untouched.

Devices: ``WorldModel.load(..., device="auto")`` puts every expert on the GPU when torch sees one (``cpu``, ``cuda``,
``cuda:N`` pick one; ``come_rl.devices``). The episode memory stays on the CPU (it is the episode's record, read by
agents and experiments); experts move what they are given to their own device, and ``imagine`` returns its frames on
the CPU, so callers are the same for every device. ``precision="auto"`` samples and memorizes under bf16 autocast on
CUDA, and on the CPU in the checkpoint's ``cpu_precision`` (world_model.json; bf16 only where the CPU has bfloat16
kernels, else float32); ``compile=True`` runs the denoising networks through ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from come_rl import devices
from come_rl.checkpoint import cpu_precision_of, load_expert, resolve_checkpoint, save_expert, world_model_settings
from come_rl.composition import EXPERT_ROLES, CompositionConfig, Composer, build_composer  # noqa: F401 (re-exported)
from come_rl.conventions import pose_features as default_pose_features, wrap_angle_tensor
from come_rl.diffusion import SamplerConfig, sample, skip_sample
from come_rl.experts.episode_memory import EpisodeMemory, PlaceMemory, to_frame_tensor
from come_rl.experts.expert import DiffusionExpert
from come_rl.experts.long_term import LongTermMemoryExpert, MemorizeConfig
from come_rl.experts.retrieval import nearest_pose_index, paired_pose_distance
from come_rl.interfaces import ActionSpec
from come_rl.io_utils import atomic_write_text
from come_rl.odometry import load_odometry

PoseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""pose_model(poses (B, 3), actions (B, A)) -> next poses (B, 3): how imagined actions move the agent (SLTM)."""


def _pose_offsets(memory_poses: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position (B, N) in cells, |heading difference| (B, N) in radians) of the memorized poses (N, 3) from each of
    ``pose`` (B, 3)."""
    pose = pose.float().to(memory_poses.device)
    position = torch.linalg.vector_norm(memory_poses[None, :, :2] - pose[:, None, :2], dim=-1)
    turn = torch.abs(wrap_angle_tensor(memory_poses[None, :, 2] - pose[:, None, 2]))
    return position, turn


def _turn_view(view: torch.Tensor, view_pose: torch.Tensor, pose: torch.Tensor, pixels_per_degree: float) -> torch.Tensor:
    """``view`` (B, C, H, W), seen at ``view_pose`` (B, 3), turned to the heading of ``pose`` (B, 3): shifted sideways
    by ``pixels_per_degree`` x the heading difference (counter-clockwise positive: the content moves right), whole
    pixels, the uncovered columns repeating the edge column."""
    turn = wrap_angle_tensor(pose[:, 2].float() - view_pose[:, 2].float())  # (B,)
    shift = torch.round(torch.rad2deg(turn) * pixels_per_degree).long().to(view.device)  # (B,)
    width = view.shape[-1]
    columns = (torch.arange(width, device=view.device)[None] - shift[:, None]).clamp(0, width - 1)  # (B, W)
    return torch.gather(view, -1, columns[:, None, None].expand_as(view))


def _rigid_shift(track: torch.Tensor, pose: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The (B, L, 3) pose ``track`` moved by the rigid motion (rotation about ``pose``'s position by the heading
    difference, then translation) that takes ``pose`` (B, 3) to ``target`` (B, 3): relative motions are unchanged."""
    turn = wrap_angle_tensor(target[:, 2] - pose[:, 2])  # (B,)
    cos, sin = torch.cos(turn)[:, None], torch.sin(turn)[:, None]
    dx, dy = track[..., 0] - pose[:, None, 0], track[..., 1] - pose[:, None, 1]
    return torch.stack([target[:, None, 0] + cos * dx - sin * dy, target[:, None, 1] + sin * dx + cos * dy,
                        target[:, None, 2] + (track[..., 2] - pose[:, None, 2])], dim=-1)


def _thumbnails(frames: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) frames -> (N, C * H / 4 * W / 4) float: each frame 4x4-average-pooled (the appearance that
    re-anchoring compares: layout and colours, not texture)."""
    return torch.nn.functional.avg_pool2d(frames.float(), 4).flatten(1)


def _row_ids(name: str, values, batch: int, low: int | None = None, high: int | None = None) -> torch.Tensor:
    """(batch,) integer-valued ``values`` as a CPU long tensor, or a ValueError that names what was wrong."""
    tensor = torch.as_tensor(np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values), device="cpu")
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one entry per row of actions, got {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or not bool(torch.isfinite(tensor.double()).all()) or not bool(
            (tensor.double() == tensor.double().round()).all()):
        raise ValueError(f"{name} must be integers, got {tensor.tolist()}")
    tensor = tensor.long()
    if (low is not None and bool((tensor < low).any())) or (high is not None and bool((tensor > high).any())):
        raise ValueError(f"{name} must lie in [{low}, {high}] (the horizon of actions), got {tensor.tolist()}")
    return tensor


def _prefix_plan(actions: torch.Tensor, streams, lengths) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each imagined step h: (computed (n,) rows sampled at h, owner (batch,) the index into ``computed`` of the row
    whose step-h results each row takes, -1 for a row already past its ``lengths``).

    Rows share step h when they share the stream and the actions up to h (with ``streams=None`` no two rows share). A
    group is computed by its first row and groups keep the rows' order, so with no shared prefix ``computed`` is every
    row still needed, in order, and the same noise is drawn as without a plan.
    """
    batch, horizon = actions.shape[:2]
    group = (_row_ids("streams", streams, batch) if streams is not None else torch.arange(batch)).double()
    needed = (_row_ids("lengths", lengths, batch, 1, horizon) if lengths is not None
              else torch.full((batch,), horizon, dtype=torch.long))
    rows, plan = torch.arange(batch), []
    for h in range(horizon):
        active = needed > h
        key = torch.cat([group[:, None], actions[:, h].double()], dim=1)[active]
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), batch, dtype=torch.long).scatter_reduce(
            0, inverse, rows[active], reduce="amin")
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        owner = torch.full((batch,), -1, dtype=torch.long)
        owner[active] = rank[inverse]
        plan.append((first[order], owner))
        group = torch.where(active, owner.double(), group)  # the group at h names the whole prefix up to h
    return plan


class WorldModel:
    """See the module docstring. Build it with :meth:`load` or from experts directly."""

    def __init__(
        self,
        base: DiffusionExpert,
        action_spec: ActionSpec,
        frame_size: int,
        stm: DiffusionExpert | None = None,
        sltm: DiffusionExpert | None = None,
        composition: CompositionConfig | None = None,
        sampler: SamplerConfig | None = None,
        memorize_config: MemorizeConfig | None = None,
        pose_model: PoseModel | None = None,
        pose_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        compile: bool = False,
        cpu_precision: str = "fp32",
    ):
        if device is not None:  # None: the experts stay where they are (all on one device)
            target = devices.resolve_device(device)
            for expert in (base, stm, sltm):
                if expert is not None:
                    expert.to(target)
        self.base, self.stm, self.sltm = base, stm, sltm
        self._check_one_device()
        for expert in (base, stm, sltm):  # before the LTM copies the base: its copies keep the layout
            if expert is not None:
                devices.prefer_channels_last(expert)
        self.cpu_precision = cpu_precision  # what precision="auto" means on a CPU with bf16 kernels (world_model.json)
        self.precision = devices.resolve_precision(precision, self.device, cpu_auto=cpu_precision)
        self.action_spec, self.frame_shape = action_spec, (3, frame_size, frame_size)
        self.composition = composition or CompositionConfig()
        self.reference_composer = False  # use_composition(..., reference=True): every pass run (the benchmark's control)
        self.sampler = sampler or SamplerConfig()
        self.memorize_config = memorize_config or MemorizeConfig()
        self.pose_model = pose_model
        if pose_features is None:
            pose_features = default_pose_features
        self.pose_features = pose_features
        for role in self.composition.experts:
            if role in ("stm", "sltm") and getattr(self, role) is None:
                raise ValueError(f"composition enables {role!r} but no {role} expert was given/trained; "
                                 f"remove it from composition.experts or train it with come_rl.train role={role}")
        self.ltm = LongTermMemoryExpert(base, self.memorize_config) if "ltm" in self.composition.experts else None
        if self.composition.sltm_memorizes and self.sltm is not None and "sltm" in self.composition.experts:
            if self.sltm.retrieval:
                raise ValueError("this SLTM retrieves memorized frames by pose (come_rl.experts.retrieval): its memory is "
                                 "the episode's frames, it has no adapters to memorize; set composition "
                                 "sltm_memorizes=false")
            self.sltm = LongTermMemoryExpert(self.sltm, self.memorize_config, name="sltm")
        self.memory = EpisodeMemory(self.frame_shape, action_spec)
        # what the long-term memory memorized, by place (kept across segments); how much of this segment it holds
        self.places, self._segment_in_places = PlaceMemory(), 0
        self.last_network_calls = 0
        self.last_poses: torch.Tensor | None = None  # (B, H, 3) poses of the last imagined frames (with a pose model)
        self.last_anchored = torch.zeros(0, 0, dtype=torch.bool, device="cpu")  # (B, H): which imagined frames were re-anchored
        self.use_compile(compile)

    def use_composition(self, composition: CompositionConfig | dict, reference: bool = False) -> None:
        """Switch the rule that composes the loaded experts (e.g. one row of an ablation), keeping the episode memory and
        what the LTM memorized. Every enabled expert must be loaded: the STM / SLTM from the checkpoint, the LTM by
        loading with "ltm" among the experts. ``reference=True`` runs the same rule through
        ``come_rl.composition.ReferenceComposer`` (every network pass run anew, nothing shared or skipped: the
        benchmark's control; same numbers, more time)."""
        if isinstance(composition, dict):
            composition = CompositionConfig(**composition)
        for role in composition.experts:
            if role != "base" and getattr(self, role) is None:
                raise ValueError(f"composition enables {role!r} but this world model was loaded without it; load it "
                                 f"with experts=[..., {role!r}] (the STM / SLTM must be in the checkpoint)")
        self.composition, self.reference_composer = composition, bool(reference)

    def use_compile(self, enabled: bool) -> None:
        """Run every expert's denoising network through ``torch.compile`` (``come_rl.devices``) or not, from the next
        call on (the first compiled call pays the compilation)."""
        self.compile = bool(enabled)
        for expert in (self.base, self.ltm, self.stm, self.sltm):
            if expert is not None:
                expert.compiled = self.compile

    @property
    def device(self) -> torch.device:
        """Where the experts run (see the module docstring)."""
        return self.base.device

    def _check_one_device(self) -> None:
        where = {role: getattr(self, role).device for role in ("base", "stm", "sltm") if getattr(self, role) is not None}
        if len(set(where.values())) > 1:
            raise ValueError(f"the experts are on different devices ({ {k: str(v) for k, v in where.items()} }); "
                             f"pass device= to put them on one")

    # ------------------------------------------------------------------------------------------------ memory
    @property
    def experts(self) -> dict[str, DiffusionExpert]:
        return {role: getattr(self, role) for role in self.composition.experts}

    def reset(self) -> None:
        """Start a new episode: empty the memory and re-initialise the LTM's adapters."""
        self.memory.clear()
        self.places.clear()
        self._segment_in_places = 0
        for expert in (self.ltm, self.sltm):
            if isinstance(expert, LongTermMemoryExpert):
                expert.reset()

    def begin_segment(self) -> None:
        """Start a new stretch of observations in the same episode (e.g. the agent is put back at the start):
        the short-term context restarts, but what the LTM has memorized stays in its adapters (and its places)."""
        self.memory.clear()
        self._segment_in_places = 0

    def observe(self, frame, action=None, pose=None) -> None:
        """Append one observation: frame uint8 (H, W, 3) or float (3, H, W) in [-1, 1]; action (A,) = the action
        that led to it (None for the first frame of an episode); pose (3,) = (x, y, yaw) or None."""
        frame_t = to_frame_tensor(frame, self.frame_shape)
        if action is None:
            if len(self.memory):
                raise ValueError("only the first frame of an episode may come without an action; pass the action "
                                 "that led to this frame (a vector of size action_spec.dim)")
            action_t = torch.zeros(self.action_spec.dim, device="cpu")  # the episode memory lives on the CPU
        else:
            action_t = self._validate_actions(torch.as_tensor(np.asarray(action), dtype=torch.float32)[None, None])[0, 0]
        pose_t = None
        if pose is not None:
            pose_t = torch.as_tensor(np.asarray(pose, dtype=np.float32))
            if pose_t.shape != (3,) or not torch.isfinite(pose_t).all():
                raise ValueError(f"pose must be a finite (x, y, yaw) vector of shape (3,), got {tuple(pose_t.shape)}")
        self.memory.append(frame_t, action_t, pose_t)

    def memorize(self, steps: int | None = None, generator: torch.Generator | None = None, **overrides) -> dict:
        """Fine-tune the LTM's adapters (and the SLTM's, with ``sltm_memorizes``) on the episode memory (no-op
        statistics when the LTM is disabled). Returns the LTM's loss statistics (the SLTM's under ``"sltm"``)."""
        memorizing_sltm = isinstance(self.sltm, LongTermMemoryExpert)
        if self.ltm is None and not memorizing_sltm:
            return {"steps": 0, "seconds": 0.0, "note": "LTM disabled in composition.experts"}
        if len(self.memory) == 0:
            raise ValueError("memorize() on an empty memory: observe frames of the episode first")
        if memorizing_sltm and self.memory.poses is None:  # checked before any expert changes
            raise ValueError("the SLTM memorizes with poses: observe(frame, action, pose) every frame")
        # revisit clips ask a pose model where each action leads from a pose alone; one that reads the frame too (the
        # odometry head) is not asked: the recorded steps are used, as without a pose model
        pose_model = None if getattr(self.pose_model, "reads_context", False) else self.pose_model
        for expert in (self.ltm, self.sltm if memorizing_sltm else None):  # every check before any weight changes
            if expert is not None:
                expert.check_memorize(self.memory, steps, pose_model, **overrides)
        stats = {}
        if self.ltm is not None:
            stats = self.ltm.memorize(self.memory, steps, generator=generator, pose_model=pose_model,
                                      precision=self.precision, **overrides)
        if memorizing_sltm:
            stats = dict(stats, sltm=self.sltm.memorize(self.memory, steps, generator=generator,
                                                        pose_model=pose_model, precision=self.precision,
                                                        **overrides))
        self.record_places()
        return stats

    def record_places(self) -> int:
        """Add the frames observed since the last call (with their poses) to ``places``, where the episode saw what;
        ``memorize`` calls it. A model without long-term memory keeps no places unless this is called: the
        ``base_places`` control of ``agents.return_to_place`` (the base's imagination with a place memory). Returns
        how many places were added (0 when the frames came without poses)."""
        if self.memory.poses is None or len(self.memory) <= self._segment_in_places:
            return 0
        new = torch.arange(self._segment_in_places, len(self.memory), device="cpu")
        self.places.add(self.memory.gather(new), self.memory.poses[new])
        self._segment_in_places = len(self.memory)
        return len(new)

    # ------------------------------------------------------------------------------------------------ imagine
    def _validate_actions(self, actions) -> torch.Tensor:
        if not isinstance(actions, torch.Tensor):
            actions = torch.as_tensor(np.asarray(actions, dtype=np.float32), device="cpu")
        actions = actions.detach().cpu()  # actions are bookkeeping (and the pose model's input): CPU; experts move them
        if actions.dim() != 3 or actions.shape[-1] != self.action_spec.dim:
            raise ValueError(f"actions must have shape (batch, horizon, {self.action_spec.dim}), got "
                             f"{tuple(actions.shape)}" + (" (encode discrete actions one-hot with action_spec.encode)"
                                                          if self.action_spec.kind == "discrete" else ""))
        if actions.shape[0] < 1 or actions.shape[1] < 1:
            raise ValueError(f"actions need batch >= 1 and horizon >= 1, got {tuple(actions.shape)}")
        actions = actions.float()
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        if self.action_spec.kind == "discrete":
            if not (((actions == 0) | (actions == 1)).all() and (actions.sum(-1) == 1).all()):
                raise ValueError("discrete actions are one-hot vectors (one entry 1, the others 0); encode action "
                                 "indices with action_spec.encode")
        else:
            low, high = torch.tensor(self.action_spec.low, device="cpu"), torch.tensor(self.action_spec.high, device="cpu")
            if (actions < low - 1e-6).any() or (actions > high + 1e-6).any():
                raise ValueError(f"continuous actions must lie in [{self.action_spec.low}, {self.action_spec.high}]")
        return actions

    def _composer(self) -> Composer:
        return build_composer(self.composition, self.experts, reference=self.reference_composer)

    @property
    def context_length(self) -> int:
        """How many past frames the enabled experts read (the longest context)."""
        return max(expert.context_frames for expert in self.experts.values())

    #: ``imagine`` takes ``streams`` and ``lengths`` (objectives and agents check this before passing them: the
    #: exact simulators of ``envs`` imagine every row anew)
    shares_prefixes = True
    #: ``imagine`` takes ``last_frame=False`` (an objective that reads only the final poses checks this first)
    skips_last_frame = True

    @torch.no_grad()
    def imagine(self, actions, generator: torch.Generator | None = None, seed: int | None = None,
                history: tuple | None = None, streams=None, lengths=None, last_frame: bool = True) -> torch.Tensor:
        """Imagine the frames that ``actions`` lead to from the last observed frame.

        Args:
            actions: (batch, horizon, action_dim) float; row h is applied to the frame before imagined frame h.
            generator / seed: make sampling reproducible (bit-identical for a fixed seed on one machine).
            history: optional per-row pasts instead of the episode memory's last frames (what the LTM memorized
                stays in use): (frames (batch, L, 3, H, W) in [-1, 1], actions (batch, L, A), poses (batch, L, 3) or
                None) with L >= ``context_length``; e.g. one past per queried place, imagined in one batch.
            streams: optional (batch,) integer ids of noise streams. Rows of one stream whose actions agree up to
                step h share one sample of frames 0..h: each distinct action prefix is imagined once per stream (a
                tree of candidates, common random numbers along shared prefixes), so a planner's candidates that
                begin alike cost one row until they part. ``None`` (the default): every row is its own sample. Give
                repeated rows meant as independent samples different streams (e.g. the sample's index).
            lengths: optional (batch,) integers in [1, horizon]: row i needs only its first ``lengths[i]`` frames;
                its later frames (and ``last_poses``) repeat its last imagined one, nothing more is sampled for it.
            last_frame: False: the last step's frame is not sampled, only its pose (``last_poses``, which the pose
                model reads from the frame before it): a caller that scores final poses alone saves that step's network
                rows. The noise it would have drawn is drawn and discarded, so the other frames, every pose and the
                generator's state after the call are those of a full call.
        Returns:
            frames: (batch, horizon, 3, height, width) in [-1, 1], on the CPU whatever the model's device;
            (batch, horizon - 1, ...) with ``last_frame=False``.
        """
        if not isinstance(last_frame, bool):
            raise ValueError(f"last_frame must be true or false, got {last_frame!r}")
        actions = self._validate_actions(actions)
        plan = _prefix_plan(actions, streams, lengths) if streams is not None or lengths is not None else None
        if plan is not None and history is not None and streams is not None:
            raise ValueError("streams share the imagined frames of rows with the same actions, which needs the same "
                             "past: with per-row history pass streams=None (lengths alone is fine)")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)  # a CPU generator: the same noise on every device
        with devices.autocast(self.device, self.precision):
            return self._imagine(actions, generator, history, plan, last_frame).cpu()

    def _imagine(self, actions: torch.Tensor, generator: torch.Generator | None, history: tuple | None,
                 plan: list | None = None, last_frame: bool = True) -> torch.Tensor:
        device = self.device
        batch, horizon = actions.shape[:2]
        experts = self.experts
        longest = self.context_length
        if history is not None:
            frames, past_actions, poses = self._validate_history(history, batch, longest)
        else:
            if len(self.memory) == 0:
                raise RuntimeError("imagine() needs at least one observed frame: call reset() and observe(frame) first")
            frames, past_actions, poses = self.memory.last(longest)
            frames = frames[None].expand(batch, *frames.shape).to(device, copy=True)  # (B, L, C, H, W)
            past_actions = past_actions[None].expand(batch, *past_actions.shape).clone()  # (B, L, A)
            poses = None if poses is None else poses[None].expand(batch, *poses.shape).clone()
        needs_poses = any(expert.uses_poses for expert in experts.values())
        if needs_poses:
            if poses is None:
                raise ValueError("the SLTM needs poses: pass pose= to observe()")
            if self.pose_model is None:
                raise ValueError("the SLTM needs the poses of imagined frames: give the WorldModel a pose_model")
        # with a pose model and observed poses, every imagined frame gets its pose (last_poses), whoever reads it
        tracks_poses = self.pose_model is not None and poses is not None
        imagined_poses = []
        composer = self._composer()
        told = self.base.told_step(self.sampler)  # a shortcut (step-conditioned) base and its LTM copy hear the same
        for expert in experts.values():
            expert.step_size = told
        retrievers = [role for role, expert in experts.items() if expert.retrieval]
        memorized_poses = len(self.memory) > 0 and self.memory.poses is not None
        # re-anchoring reads poses: without memorized poses and a pose model there is nothing to anchor by (off)
        anchor = self.composition.anchor if tracks_poses and memorized_poses else 0.0
        if retrievers and not memorized_poses:
            raise ValueError(f"the {retrievers[0]} expert retrieves memorized frames by pose: observe(frame, action, "
                             f"pose) the episode first")
        if retrievers or anchor > 0:  # the frames are gathered by index: only the retrieved ones copied
            memory_poses = self.memory.poses.float()
        self.last_anchored = torch.zeros(batch, horizon, dtype=torch.bool, device="cpu")
        appearance = self.composition.anchor_appearance if anchor > 0 else 0.0
        if appearance > 0:  # every memorized view, pooled 4x4, once per call: what a sampled frame is compared with
            thumbs = _thumbnails(self.memory.frames.to(device))
        # experts told how many of their past frames are imagined (UNetConfig.staleness_levels; 0: not told)
        told_levels = {role: getattr(getattr(expert.backbone, "config", None), "staleness_levels", 0)
                       for role, expert in experts.items()}
        outputs = []
        all_actions, full_batch = actions, batch
        for h in range(horizon):
            if plan is not None:  # only one row per distinct (stream, action prefix) still needed is imagined
                computed, owner = plan[h]
                if len(computed) == 0:  # every row is past its length: each holds its last frame
                    if h < horizon - 1 or last_frame:
                        outputs.append(outputs[-1])
                    if tracks_poses:
                        imagined_poses.append(imagined_poses[-1])
                    continue
                frames, past_actions = frames[computed.to(frames.device)], past_actions[computed]
                actions = all_actions[computed]
                poses = None if poses is None else poses[computed.to(poses.device)]
                batch = len(computed)
            step_actions = torch.cat([past_actions, actions[:, h:h + 1]], dim=1)  # (B, L + 1, A)
            if tracks_poses:
                next_pose = self._next_pose(poses, actions[:, h], frames)
                recorded_pose = next_pose  # the pose head's, before any re-anchoring moves the track
            if h == horizon - 1 and not last_frame:  # its pose is all the caller reads: the noise drawn, no sample
                skip_sample((batch, *self.frame_shape), self.sampler, generator, device)
                if tracks_poses:
                    if plan is not None:
                        recorded_pose = self._rows_of_plan(recorded_pose, plan[h][1], imagined_poses)
                    imagined_poses.append(recorded_pose.float().cpu())
                break
            if needs_poses:
                step_poses = self.pose_features(torch.cat([poses, next_pose[:, None]], dim=1))
            conditions = {}
            for role, expert in experts.items():
                k = expert.context_frames
                if not expert.retrieval:
                    conditions[role] = {
                        "context": frames[:, -k:], "actions": step_actions[:, -(k + 1):],
                        "poses": step_poses[:, -(k + 1):] if needs_poses and expert.uses_poses else None,
                    }
                else:  # slot 0: the memorized frame nearest the next pose, reached by no action
                    index = nearest_pose_index(memory_poses, next_pose.float())
                    view, view_pose = self.memory.gather(index)[:, None].to(frames), self.pose_features(
                        memory_poses[index][:, None]).to(step_poses)
                    blind = getattr(expert.backbone.config, "retrieval_blind", False)  # every slot: the retrieved view
                    conditions[role] = {
                        "context": (view.expand(-1, k, *view.shape[2:]).contiguous() if blind
                                    else torch.cat([view, frames[:, -(k - 1):]], dim=1)),
                        "actions": torch.cat([torch.zeros_like(step_actions[:, :1]), step_actions[:, -k:]], dim=1),
                        "poses": torch.cat([view_pose.expand(-1, k, view_pose.shape[-1]), step_poses[:, -1:]], dim=1)
                        if blind else torch.cat([view_pose, step_poses[:, -k:]], dim=1),
                    }
                    self._gate_retrieval(conditions, role, memory_poses[index], next_pose)
                levels = told_levels[role]
                if levels:  # its h newest past frames are imagined (a stale-trained SLTM or a told STM)
                    conditions[role]["context_level"] = torch.full((batch,), min(h, levels) / levels)
            seed_x0, view = None, None
            if anchor > 0:  # a revisit: the memorized view seen nearest the next pose, gathered once for this step
                index, close = self._anchor_match(memory_poses, next_pose)
                if h < self.composition.anchor_after:  # too soon after the real context: nothing has drifted yet
                    close = torch.zeros_like(close)
                if bool(close.any()):
                    view = self.memory.gather(index).to(frames)
                    if self.composition.anchor_seed > 0:  # the frame itself is sampled from that view
                        seed_x0 = (view, close, self.composition.anchor_seed)
            # Sampling runs in frame space for every expert (a residual expert converts inside predict_eps).
            next_frame = sample(composer.bind(conditions), (batch, *self.frame_shape), self.base.schedule, self.sampler,
                                generator, device=device, seed_x0=seed_x0).clamp(-1.0, 1.0)
            sampled = next_frame  # what this step returns; re-anchoring changes only what the next steps see
            if appearance > 0 and h >= self.composition.anchor_after:  # a revisit seen in the sampled frame: a nearby
                # memorized view that looks like it
                looked, looks = self._appearance_match(memory_poses, thumbs, next_pose, next_frame, appearance)
                looks &= ~close.to(looks.device)
                if bool(looks.any()):
                    index = torch.where(looks.to(index.device), looked.to(index.device), index)
                    close = close | looks.to(close.device)
                    view = self.memory.gather(index).to(frames)
            if view is not None and self.composition.anchor_turn > 0:  # ... turned to the imagined heading
                view = _turn_view(view, memory_poses[index.to(memory_poses.device)].to(next_pose), next_pose,
                                  self.composition.anchor_turn)
            if view is not None:  # a revisit: the next steps see the memorized view instead of the sampled frame
                next_frame = torch.where(close.to(next_frame.device)[:, None, None, None], view.to(next_frame),
                                         next_frame)
                if self.composition.anchor_pose and tracks_poses:  # ... seen from its memorized pose (a loop closure)
                    target = memory_poses[index.to(memory_poses.device)].to(next_pose)
                    # the whole track moves rigidly with it, so the motion the pose model reads stays what it was
                    shifted = _rigid_shift(torch.cat([poses, next_pose[:, None].to(poses)], dim=1), next_pose, target)
                    keep = close.to(poses.device)[:, None, None]
                    poses = torch.where(keep, shifted[:, :-1].to(poses), poses)
                    next_pose = torch.where(keep[:, 0], shifted[:, -1].to(next_pose), next_pose)
            frames = torch.cat([frames[:, 1:], next_frame[:, None]], dim=1)
            past_actions = torch.cat([past_actions[:, 1:], actions[:, h:h + 1]], dim=1)
            if tracks_poses:
                poses = torch.cat([poses[:, 1:], next_pose[:, None].to(poses)], dim=1)
            if plan is not None:  # every row takes its computed row's results; a finished row holds its last frame
                batch, gather = full_batch, owner.clamp(min=0)
                active = owner >= 0
                frames, past_actions = frames[gather.to(frames.device)], past_actions[gather]
                poses = None if poses is None else poses[gather.to(poses.device)]
                sampled = sampled[gather.to(sampled.device)]
                if h > 0 and not bool(active.all()):
                    sampled = torch.where(active.to(sampled.device)[:, None, None, None], sampled, outputs[-1])
                if tracks_poses:
                    recorded_pose = self._rows_of_plan(recorded_pose, owner, imagined_poses)
                if anchor > 0:
                    close = close.cpu()[gather] & active
            outputs.append(sampled)
            if tracks_poses:
                imagined_poses.append(recorded_pose.float().cpu())
            if anchor > 0:
                self.last_anchored[:, h] = close.cpu()
        self.last_network_calls = composer.network_calls
        self.last_poses = torch.stack(imagined_poses, dim=1) if tracks_poses else None
        if not outputs:  # horizon 1 without its last frame
            return torch.zeros((full_batch, 0, *self.frame_shape), device=device)
        return torch.stack(outputs, dim=1)

    @staticmethod
    def _rows_of_plan(computed: torch.Tensor, owner: torch.Tensor, imagined_poses: list) -> torch.Tensor:
        """Every row's value of a prefix plan's step from its computed row's (``owner`` (B,): the computed row, < 0 for
        a row past its length, which holds its last pose)."""
        active = owner >= 0
        rows = computed[owner.clamp(min=0).to(computed.device)]
        if imagined_poses and not bool(active.all()):
            rows = torch.where(active[:, None].to(rows.device), rows, imagined_poses[-1].to(rows))
        return rows

    def _anchor_match(self, memory_poses: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B,), close (B,)): the memorized pose nearest ``pose`` (B, 3) within ``composition.anchor`` cells and
        ``anchor_degrees`` (not among the last ``anchor_skip_recent`` observed), and whether there is one."""
        position, turn = _pose_offsets(memory_poses, pose)
        within = (position <= self.composition.anchor) & (turn <= math.radians(self.composition.anchor_degrees))
        recent = self.composition.anchor_skip_recent
        if recent:  # the frames just observed are not candidates (CompositionConfig.anchor_skip_recent)
            within[..., max(within.shape[-1] - recent, 0):] = False
        score = torch.where(within, position / self.composition.anchor + turn / math.radians(
            self.composition.anchor_degrees), torch.full_like(position, float("inf")))
        return score.argmin(-1), within.any(-1)

    def _appearance_match(self, memory_poses: torch.Tensor, thumbs: torch.Tensor, pose: torch.Tensor,
                          frame: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B,), looks (B,)): among the memorized poses within ``anchor_search`` cells and
        ``anchor_search_degrees`` of ``pose`` (B, 3), the view whose thumbnail is nearest ``frame``'s (B, C, H, W),
        and whether its mean squared error is <= ``threshold``."""
        position, turn = _pose_offsets(memory_poses, pose)
        window = (position <= self.composition.anchor_search) & (
            turn <= math.radians(self.composition.anchor_search_degrees))
        error = (_thumbnails(frame)[:, None] - thumbs[None]).pow(2).mean(-1).to(window.device)  # (B, N)
        error = torch.where(window, error, torch.full_like(error, float("inf")))
        best, index = error.min(-1)
        return index, best <= threshold

    def _next_pose(self, poses: torch.Tensor, action: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The pose model's pose after ``action`` (B, A) from the last of ``poses`` (B, L, 3); a pose model that
        ``reads_context`` (``come_rl.odometry.OdometryPoseModel``) also gets the pose before it and the frame now."""
        if getattr(self.pose_model, "reads_context", False):
            previous = poses[:, -2] if poses.shape[1] > 1 else None
            return self.pose_model(poses[:, -1], action, previous=previous, frame=frames[:, -1])
        return self.pose_model(poses[:, -1], action)

    def current_pose(self) -> np.ndarray:
        """(x, y, yaw) of the last observed frame (what a place-aware objective plans from)."""
        poses = self.memory.poses
        if poses is None:
            raise RuntimeError("no pose observed: observe(frame, action, pose) the episode's frames with their poses")
        return poses[-1].double().numpy()

    def _gate_retrieval(self, conditions: dict, role: str, retrieved_poses: torch.Tensor, poses: torch.Tensor) -> None:
        """With ``composition.retrieval_gate[role]``: the expert takes part only in the samples whose retrieved view was
        seen within that pose distance of the imagined pose (a (B,) gate in its conditions)."""
        gate = self.composition.retrieval_gate.get(role)
        if gate is not None:
            distance = paired_pose_distance(retrieved_poses, poses.float())  # (B,)
            conditions[role]["gate"] = (distance <= gate).float()

    def _validate_history(self, history, batch: int, longest: int):
        if not isinstance(history, (tuple, list)) or len(history) != 3:
            raise ValueError("history must be a tuple (frames, actions, poses or None)")
        frames, past_actions, poses = history
        frames = torch.as_tensor(frames).float().to(self.device)
        past_actions = torch.as_tensor(past_actions).float().cpu()
        if frames.dim() != 5 or tuple(frames.shape[2:]) != self.frame_shape or frames.shape[0] != batch:
            raise ValueError(f"history frames must have shape ({batch}, L, {', '.join(map(str, self.frame_shape))}), "
                             f"got {tuple(frames.shape)}")
        if frames.shape[1] < longest:
            raise ValueError(f"history holds {frames.shape[1]} frames; the enabled experts read {longest}")
        if past_actions.shape != (batch, frames.shape[1], self.action_spec.dim):
            raise ValueError(f"history actions must have shape ({batch}, {frames.shape[1]}, {self.action_spec.dim}), "
                             f"got {tuple(past_actions.shape)}")
        if not (torch.isfinite(frames).all() and torch.isfinite(past_actions).all()):
            raise ValueError("history contains NaN or inf")
        if poses is not None:
            poses = torch.as_tensor(poses).float().cpu()
            if poses.shape != (batch, frames.shape[1], 3):
                raise ValueError(f"history poses must have shape ({batch}, {frames.shape[1]}, 3), got {tuple(poses.shape)}")
            poses = poses[:, -longest:].clone()
        return frames[:, -longest:].clone(), past_actions[:, -longest:].clone(), poses

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, half: bool = False) -> None:
        """Write every trained expert (float16 weights if ``half``) and the world model's own settings
        (world_model.json) to ``directory``."""
        directory = Path(directory)
        for role in ("base", "stm", "sltm"):
            expert = getattr(self, role)
            expert = getattr(expert, "source", expert)  # a memorizing SLTM saves the trained SLTM it adapts
            if expert is not None:
                if expert.spec is None:
                    raise ValueError(f"the {role} expert has no recipe (spec); build experts with come_rl.train or load them")
                save_expert(directory, expert, dict(expert.spec, role=role), half=half)
        settings = {
            "composition": dataclasses.asdict(self.composition), "sampler": dataclasses.asdict(self.sampler),
            "memorize": dataclasses.asdict(self.memorize_config), "action_spec": dataclasses.asdict(self.action_spec),
            "frame_size": self.frame_shape[-1], "cpu_precision": self.cpu_precision,
        }
        atomic_write_text(directory / "world_model.json", json.dumps(settings, indent=2))

    @classmethod
    def load(cls, directory: str | Path, experts: list[str] | None = None, sampler: dict | None = None,
             composition: dict | None = None, memorize: dict | None = None,
             pose_model: PoseModel | None = None, device: str | torch.device = "auto", precision: str = "auto",
             compile: bool = False) -> WorldModel:
        """Load a world model from a checkpoint directory (``base.safetensors`` + ``base.json``, optionally stm/sltm,
        and ``world_model.json`` with default settings); keyword dicts override those settings. A bare name that is
        not a directory here (``"memory_cards"``) is a checkpoint shipped in the package (come_rl/checkpoints/).

        ``device``: auto (CUDA when present) | cpu | cuda | cuda:N; ``precision``: auto (bf16 autocast on CUDA; on
        the CPU the checkpoint's ``cpu_precision`` where the CPU has bf16 kernels, else fp32) | fp32 | bf16;
        ``compile``: torch.compile the denoising networks (see ``come_rl.devices``)."""
        target_device = devices.resolve_device(device)  # a bad device fails before anything is read
        devices.resolve_precision(precision, target_device)
        directory = resolve_checkpoint(directory)  # a path, or the name of a checkpoint shipped in the package
        base, spec = load_expert(directory, "base")
        settings = world_model_settings(directory)
        comp = dict(settings.get("composition", {}), **(composition or {}))
        if experts is not None:
            comp["experts"] = list(experts)
        comp_cfg = CompositionConfig(**comp)
        optional = {}
        for role in ("stm", "sltm"):
            if role in comp_cfg.experts:
                optional[role], _ = load_expert(directory, role)
        action_spec_dict = spec.get("action_spec") or settings.get("action_spec")
        action_spec = ActionSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in action_spec_dict.items()})
        if pose_model is None and (directory / "odometry.json").is_file():  # the checkpoint's own odometry head
            pose_model = load_odometry(directory)
            pose_model.net.to(target_device)
        model = cls(
            base, action_spec, int(spec.get("frame_size") or settings["frame_size"]),
            composition=comp_cfg,
            sampler=SamplerConfig(**dict(settings.get("sampler", {}), **(sampler or {}))),
            memorize_config=MemorizeConfig(**dict(settings.get("memorize", {}), **(memorize or {}))),
            pose_model=pose_model, device=target_device, precision=precision, compile=compile,
            cpu_precision=cpu_precision_of(directory), **optional,
        )
        model.checkpoint_dir = directory
        model.base_spec = spec
        return model
