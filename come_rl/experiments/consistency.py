"""Memory Maze consistency (the paper's Table 1 at CPU scale): does memory make imagination agree with what was seen?

Usage:
    python -m come_rl.experiments.consistency                                   # shipped maze model, held-out seeds
    python -m come_rl.experiments.consistency episodes=16 context=400 horizon=32 seed=40000 \\
        compositions=copy_last,base,ltm out_dir=results/consistency
    python -m come_rl.experiments.consistency episodes=8 compositions=base,come,come_tight \\
        variants='{"come_tight": {"of": "come", "anchor": 0.25, "anchor_degrees": 10}}'   # a rule variant, same memory

Per held-out episode (generated from ``seed``, ``seed + 1``, ... as ``online:memory_maze`` and ``come_rl.collect``
generate them, or read from a collected ``data=`` directory) the world model observes the first ``context`` frames
(frames, actions, poses), memorizes them when the composition has a memory expert that memorizes (the LTM; the SLTM with
``sltm_memorizes``, reading the recorded poses of the imagined frames: :class:`RecordedPoses`), then
imagines the next ``horizon`` frames open loop from the real actions. Every imagined frame is scored against the real
one by LPIPS (AlexNet), SSIM and PSNR, over all frames and over *revisit* frames: those whose real pose lies within
``revisit_distance`` cells and ``revisit_degrees`` of heading of a pose in the memorized part (what memory could know).

Rows (``compositions=``, comma-separated names of :data:`COMPOSITIONS`): ``copy_last`` (no model: the last context
frame, repeated), ``nearest_view`` (no model, pose oracle: for each imagined frame the memorized frame seen nearest its
real pose, ``come_rl.experts.retrieval``: what a memory lookup alone gives), ``base`` (no memory), ``ltm`` (base + LTM, the checkpoint's rule), ``stm``, ``sltm``, ``stm_ltm``,
``come`` (every expert, the checkpoint's rule), ``naive_poe`` (every expert, plain product of experts), and
``base_anchor`` / ``sltm_anchor`` / ``come_anchor`` (those rows re-anchored on memorized frames at revisits,
``CompositionConfig.anchor``, with the tolerances ``anchor=`` cells and ``anchor_degrees=``; the ``anchored_frames``
column counts the imagined frames replaced in the context). A row whose
expert the checkpoint lacks is refused before any work, naming the training command.

Output (``out_dir``): ``consistency.csv``, one row per (composition, episode) with ``lpips_all, lpips_revisit,
ssim_all, ssim_revisit, psnr_all, psnr_revisit, revisit_frames`` (a revisit column is empty when an episode's horizon
has no revisit frame), and per imagined frame ``lpips_per_frame``, ``revisit_per_frame`` (0/1),
``anchored_per_frame`` (0/1: re-anchored) and ``pose_error_per_frame`` (cells between the pose the model gave the frame
and its real pose; empty without a pose model), for analyses that split the scores; ``consistency.md``, the means over
episodes with 95 % intervals (t over episodes);
``lpips_revisit_pooled`` in the summary: LPIPS over all revisit frames pooled (an episode weighs by its revisit
frames) with a bootstrap interval over episodes; when ``base`` is a row, ``lpips_revisit_vs_base`` and
``lpips_all_vs_base``: each row's paired difference to the base (mean per-episode difference, its 95 % t interval,
its share of the base's mean, in how many episodes the row is lower), drawn in ``consistency_vs_base.png``;
``episode_records/`` (one atomic record per finished episode with
all its rows, ``come_rl.episode_records``: a killed run resumes where it stopped, a rerun with other settings is
refused);
``rollout.gif`` (real | base | CoME | re-anchored CoME, those that are rows, or the last row; first episode).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from come_rl.checkpoint import resolve_checkpoint
from come_rl.cli_args import parse_cli
from come_rl.composition import CompositionConfig
from come_rl.conventions import frames_to_tensor, tensor_to_frames, wrap_angle
from come_rl.data.episodes import EpisodeDataset
from come_rl.data_sources import SeededEpisodePool
from come_rl.episode_records import RECORDS_DIR, check_records, read_record, stop_with_resume_hint, write_record
from come_rl.experts.long_term import LongTermMemoryExpert
from come_rl.experts.retrieval import nearest_pose_index
from come_rl.fanout import check_backend, iter_tasks
from come_rl.metrics import psnr, ssim
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table
from come_rl.visualize import save_rollout_gif
from come_rl.world_model import WorldModel

METRICS = ("lpips", "ssim", "psnr")
SHORT_HORIZON = 8

# Named rows: which experts, and how they compose ("checkpoint": the checkpoint's world_model.json rule restricted to
# those experts; "naive": a plain product of the experts, every alpha 1, no contrast, unnormalised).
COMPOSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "copy_last": ((), "none"),
    "nearest_view": ((), "lookup"),
    "base": (("base",), "checkpoint"),
    "ltm": (("base", "ltm"), "checkpoint"),
    "stm": (("base", "stm"), "checkpoint"),
    "sltm": (("base", "sltm"), "checkpoint"),
    "stm_ltm": (("base", "ltm", "stm"), "checkpoint"),
    "come": (("base", "ltm", "stm", "sltm"), "checkpoint"),
    "naive_poe": (("base", "ltm", "stm", "sltm"), "naive"),
    # the checkpoint's rule re-anchored at revisits with the row key anchor= (CompositionConfig.anchor)
    "base_anchor": (("base",), "anchor"),
    "sltm_anchor": (("base", "sltm"), "anchor"),
    "come_anchor": (("base", "ltm", "stm", "sltm"), "anchor"),
}


@dataclass
class ConsistencyConfig:
    checkpoint: str = "memory_maze"
    """world model checkpoint (a directory, or the name of one shipped in come_rl/checkpoints)."""
    data: str = "online:memory_maze"
    """online:memory_maze (episodes from seeds seed, seed + 1, ...) or a collected Memory Maze data set directory."""
    seed: int = 40000
    """first episode seed (online data) and the sampling seed; seeds >= 40000 were never used for training or tuning."""
    episodes: int = 16
    context: int = 400
    """frames observed (and memorized) before imagining."""
    horizon: int = 32
    """frames imagined open loop after the context."""
    compositions: str = "copy_last,base,stm,ltm,sltm,stm_ltm,come,naive_poe"
    memorize_steps: int = -1
    """LTM memorization steps (-1: the checkpoint's world_model.json)."""
    memorize: dict = field(default_factory=dict)
    """overrides of the checkpoint's memorization recipe (MemorizeConfig fields), e.g. '{"lr": 1e-4}'."""
    composition: dict = field(default_factory=dict)
    """overrides of the checkpoint's composition rule (CompositionConfig fields) that the named rows start from."""
    variants: dict = field(default_factory=dict)
    """extra rows, name -> {"of": a named row, CompositionConfig field overrides}: rule variants scored on the same
    episodes and the same memorization as the named rows (one memorization per episode serves every row), e.g.
    '{"come_ltm3": {"of": "come", "alphas": {"ltm": 3.0}}}'; dict fields (alphas, weights, active_from, ...) are merged
    into the row's, others replaced. List a variant in ``compositions=`` like a named row."""
    anchor: float = 0.3
    """cells: the ``*_anchor`` rows re-anchor the rollout on a memorized frame seen within this distance and
    ``anchor_degrees`` (``CompositionConfig.anchor``; the other rows keep the checkpoint's anchor if they have the
    SLTM, none if not)."""
    anchor_degrees: float = 15.0
    sampler_steps: int = 0
    """denoising steps per frame (0: the checkpoint's)."""
    stream_chunk: int = 0
    """> 0: streaming memorization (the paper's Figure 2): the LTM memorizes each chunk of this many frames as it is
    observed (``memorize_steps`` steps per chunk, on the chunk and the frames just before it); 0: once, at the end."""
    contexts: str = ""
    """comma-separated context lengths (the paper's Figure 1): one run per length into ``out_dir/context_<n>``, then
    ``context_curve.csv`` / ``.md`` / ``.png`` in ``out_dir``; empty: one run with ``context``."""
    poses: str = "recorded"
    """where the SLTM's poses of the imagined frames come from: recorded (the real poses of the replayed actions, a
    pose oracle: :class:`RecordedPoses`) or odometry (the checkpoint's odometry head on the imagined frames, as when
    planning: no oracle)."""
    revisit_distance: float = 0.5
    revisit_degrees: float = 45.0
    require_revisits: bool = False
    """refuse an episode whose horizon has no revisit frame (otherwise its revisit columns are empty)."""
    threads: int = 2
    """torch threads (per worker with backend=ray)."""
    backend: str = "local"
    """local | ray: episodes fanned out over ``workers`` Ray actors (each loads the model once); the rows do not
    depend on the backend (every episode seeds its own adapters, memorization and sampling)."""
    workers: int = 1
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (memorization and sampling under autocast)."""
    out_dir: str = "results/consistency"
    gif: bool = True


# ------------------------------------------------------------------------------------------------------- revisits
def revisit_mask(memorized_poses: np.ndarray, query_poses: np.ndarray, distance: float = 0.5,
                 degrees: float = 45.0) -> np.ndarray:
    """For each query pose (x, y, yaw), whether some memorized pose lies within ``distance`` (maze cells) and
    ``degrees`` of heading. memorized_poses: (N, 3), query_poses: (M, 3) -> (M,) bool."""
    memorized = np.asarray(memorized_poses, dtype=np.float64).reshape(-1, 3)
    query = np.asarray(query_poses, dtype=np.float64).reshape(-1, 3)
    if len(memorized) == 0:
        return np.zeros(len(query), bool)
    if not (np.isfinite(memorized).all() and np.isfinite(query).all()):
        raise ValueError("poses contain NaN or inf")
    close = np.linalg.norm(query[:, None, :2] - memorized[None, :, :2], axis=-1) <= distance
    aligned = np.abs(wrap_angle(query[:, None, 2] - memorized[None, :, 2])) <= math.radians(degrees)
    return (close & aligned).any(axis=1)


# ------------------------------------------------------------------------------------------------------- set-up
def check_variants(variants: dict | None) -> dict:
    """The ``variants=`` rows, checked: each names the row it varies (``of``, a model row of :data:`COMPOSITIONS`) and
    overrides only CompositionConfig fields other than ``experts``."""
    variants = dict(variants or {})
    fields = ({f.name for f in dataclasses.fields(CompositionConfig)} - {"experts"}) | {"sampler_steps"}
    for name, spec in variants.items():
        if name in COMPOSITIONS:
            raise ValueError(f"variants: {name!r} is already a named row; give the variant another name")
        if not isinstance(spec, dict) or spec.get("of") not in COMPOSITIONS \
                or COMPOSITIONS[spec["of"]][1] in ("none", "lookup"):
            models = [n for n, (_, kind) in COMPOSITIONS.items() if kind not in ("none", "lookup")]
            raise ValueError(f"variants: {name!r} needs \"of\": one of {models} (the row it varies), got {spec!r}")
        unknown = sorted(set(spec) - {"of"} - fields)
        if unknown:
            raise ValueError(f"variants: {name!r} overrides {unknown}, which are not composition fields; choose from "
                             f"{sorted(fields)} (the experts come from its \"of\" row)")
        steps = spec.get("sampler_steps", 1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"variants: {name!r} has sampler_steps={steps!r}; give an integer >= 1 (denoising steps "
                             f"per imagined frame)")
    return variants


def row_spec(name: str, variants: dict | None = None) -> tuple[tuple[str, ...], str]:
    """(experts, kind) of a named row or of a variant (its ``of`` row's)."""
    return COMPOSITIONS[variants[name]["of"]] if variants and name in variants else COMPOSITIONS[name]


def row_sampler_steps(name: str, variants: dict | None = None) -> int | None:
    """The denoising steps a variant row samples with (``"sampler_steps"`` in its spec), None: the run's."""
    return (variants or {}).get(name, {}).get("sampler_steps")


def parse_compositions(text: str, variants: dict | None = None) -> list[str]:
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    known = [*COMPOSITIONS, *(variants or {})]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(f"compositions={text!r}: unknown {unknown or 'empty list'}; choose from {known} "
                         f"(or define a rule variant with variants=)")
    return names


def composition_for(name: str, checkpoint_rule: CompositionConfig, anchor: float = 0.3,
                    anchor_degrees: float = 15.0, variants: dict | None = None) -> CompositionConfig | None:
    """The composition of a named row (None for copy_last), from the checkpoint's rule; ``anchor`` / ``anchor_degrees``:
    the re-anchoring tolerances of the ``*_anchor`` rows. Re-anchoring is a spatial memory: rows without the SLTM
    leave it off. A variant (``variants``) is its ``of`` row's composition with its overrides."""
    if variants and name in variants:
        spec = dict(variants[name])
        spec.pop("sampler_steps", None)  # the row's sampler, not its rule (row_sampler_steps)
        rule = dataclasses.asdict(composition_for(spec.pop("of"), checkpoint_rule, anchor, anchor_degrees))
        for key, value in spec.items():
            rule[key] = {**(rule.get(key) or {}), **value} if isinstance(value, dict) else value
        return CompositionConfig(**rule)
    experts, kind = COMPOSITIONS[name]
    if kind in ("none", "lookup"):
        return None
    if kind == "naive":
        return CompositionConfig(experts=list(experts), alphas={role: 1.0 for role in experts},
                                 weights={role: 1.0 for role in experts}, normalize=False,
                                 ltm_baseline="unconditional")
    rule = dataclasses.asdict(checkpoint_rule)
    rule["experts"] = list(experts)
    for key in ("active_from", "active_below"):  # gates of experts this row leaves out do not apply
        rule[key] = {role: value for role, value in (rule.get(key) or {}).items() if role in experts}
    if kind == "anchor":
        rule["anchor"], rule["anchor_degrees"] = anchor, anchor_degrees
    elif "sltm" not in experts:  # off, with the options that refine it
        rule.update(anchor=0.0, anchor_seed=0.0, anchor_appearance=0.0, anchor_pose=False)
    return CompositionConfig(**rule)


def _missing_expert_error(config: ConsistencyConfig, missing: list[str], error) -> ValueError:
    return ValueError(f"checkpoint {config.checkpoint} lacks an expert these rows need ({error}); train it "
                      f"(python -m come_rl.train role={'/'.join(missing) or 'base'} ... out=<checkpoint>) or "
                      f"drop the rows that use it")


def check_experts_present(config: ConsistencyConfig, names: list[str]) -> None:
    """Refuse rows whose expert files the checkpoint lacks, without loading any network (the driver of a Ray run)."""

    directory = resolve_checkpoint(config.checkpoint)
    roles = sorted({role for name in names for role in row_spec(name, config.variants)[0]} - {"ltm"} | {"base"})
    absent = [role for role in roles if not (directory / f"{role}.json").is_file()
              or not (directory / f"{role}.safetensors").is_file()]
    if absent:
        raise _missing_expert_error(config, [role for role in absent if role != "base"],
                                    f"no {', '.join(f'{role}.json / {role}.safetensors' for role in absent)} in {directory}")


def check_config(config: ConsistencyConfig, episode_steps: int | None = None) -> list[str]:
    """Every check that needs no model: settings, and the data's length when known. Returns the row names."""
    names = parse_compositions(config.compositions, check_variants(config.variants))
    for key in ("episodes", "context", "horizon"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.poses not in ("recorded", "odometry"):
        raise ValueError(f"poses must be recorded (the real poses: a pose oracle) or odometry (the checkpoint's "
                         f"odometry head on the imagined frames), got {config.poses!r}")
    if config.stream_chunk < 0:
        raise ValueError(f"stream_chunk must be >= 0 (0: memorize once at the end), got {config.stream_chunk}")
    if not config.anchor > 0 and any(row_spec(name, config.variants)[1] == "anchor" for name in names):
        raise ValueError(f"anchor must be > 0 cells for the *_anchor rows, got {config.anchor}")
    if config.context < 3:
        raise ValueError(f"context must hold at least 3 frames (the base's context), got {config.context}")
    if episode_steps is not None and config.context + config.horizon > episode_steps + 1:
        raise ValueError(f"context + horizon = {config.context + config.horizon} frames, but the episodes have "
                         f"{episode_steps + 1}; lower context or horizon, or collect longer episodes (steps=)")
    return names


def load_episodes(config: ConsistencyConfig) -> list[dict]:
    """The held-out episodes: frames (T+1, H, W, 3) uint8, actions (T, A), poses (T+1, 3), seed."""

    steps_needed = config.context + config.horizon - 1
    if config.data == "online:memory_maze":
        dataset = SeededEpisodePool("memory_maze", episodes=config.episodes, steps=steps_needed, seed=config.seed).dataset
    elif config.data.startswith("online:"):
        raise ValueError(f"data={config.data}: the consistency experiment needs Memory Maze episodes with poses; pass "
                         "online:memory_maze or a collected Memory Maze data set directory")
    else:
        dataset = EpisodeDataset(config.data, max_episodes=config.episodes)
    if dataset.poses is None:
        raise ValueError(f"data={config.data} has no poses; the revisit frames need them (collect it with "
                         "python -m come_rl.collect env=memory_maze ...)")
    if len(dataset) < config.episodes:
        raise ValueError(f"data={config.data} holds {len(dataset)} episodes, {config.episodes} were asked for")
    shortest = int(min(len(a) for a in dataset.actions))
    check_config(config, shortest)
    return [{"frames": dataset.frames[i], "actions": dataset.actions[i], "poses": dataset.poses[i],
             "seed": dataset.seeds[i]} for i in range(config.episodes)]


# ------------------------------------------------------------------------------------------------------- scoring
def score_frames(imagined: np.ndarray, real: np.ndarray, lpips) -> dict[str, np.ndarray]:
    """Per-frame LPIPS, SSIM and PSNR of uint8 (T, H, W, 3) frames."""

    lp = lpips(frames_to_tensor(imagined), frames_to_tensor(real)).numpy()
    return {"lpips": lp, "ssim": np.asarray(ssim(imagined, real)), "psnr": np.minimum(np.asarray(psnr(imagined, real)), 100.0)}


def episode_row(name: str, index: int, seed: int, per_frame: dict[str, np.ndarray], revisit: np.ndarray) -> dict:
    row = {"composition": name, "episode": index, "seed": seed, "revisit_frames": int(revisit.sum())}
    for metric in METRICS:
        values = per_frame[metric]
        row[f"{metric}_all"] = float(values.mean())
        row[f"{metric}_revisit"] = float(values[revisit].mean()) if revisit.any() else ""
    # The first SHORT_HORIZON imagined frames alone: before an open-loop rollout drifts far from the real path.
    row[f"lpips_first{SHORT_HORIZON}"] = float(per_frame["lpips"][:SHORT_HORIZON].mean())
    return row


class RecordedPoses:
    """The SLTM's pose model here: the recorded poses of the imagined frames, in order (the paper's SLTM reads absolute
    poses that its encoder infers from the recorded relative motion; the real actions are replayed, so their real poses
    are what such an encoder would aim at). Call ``rewind()`` before each rollout."""

    def __init__(self, poses: np.ndarray):
        self.poses = torch.as_tensor(np.asarray(poses, dtype=np.float32))
        self.step = 0

    def rewind(self) -> None:
        self.step = 0

    def __call__(self, poses: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.step >= len(self.poses):
            raise IndexError(f"RecordedPoses holds {len(self.poses)} poses; the rollout asked for more")
        pose = self.poses[self.step].to(poses.device, poses.dtype)
        self.step += 1
        return pose.expand(poses.shape[0], 3).clone()


class ConsistencyWorker:
    """Loads the world model once; ``run(episode)`` scores every row on one episode (memorizing once)."""

    def __init__(self, config: ConsistencyConfig, names: list[str]):
        self.config, self.names = config, names
        experts = sorted({role for name in names for role in row_spec(name, config.variants)[0]} - {"ltm"} | {"base"})
        needs_ltm = any("ltm" in row_spec(name, config.variants)[0] for name in names)
        sampler = {"steps": config.sampler_steps} if config.sampler_steps else None
        try:
            self.wm = WorldModel.load(config.checkpoint, experts=experts + (["ltm"] if needs_ltm else []),
                                      sampler=sampler, device=config.device, precision=config.precision,
                                      memorize=dict(config.memorize) or None,
                                      composition=dict(config.composition) or None)
        except FileNotFoundError as error:
            raise _missing_expert_error(config, [role for role in ("stm", "sltm") if role in experts], error) from error
        self.rule, self.sampler = self.wm.composition, self.wm.sampler
        if config.poses == "odometry" and self.wm.pose_model is None:
            raise ValueError(f"poses=odometry, but checkpoint {config.checkpoint} has no odometry head "
                             f"(odometry.json / odometry.safetensors); train one with python -m come_rl.odometry, or "
                             f"use poses=recorded")
        self.lpips = get_lpips(device=self.wm.device)

    def run(self, task: tuple[int, dict]) -> tuple[int, list[dict], dict[str, np.ndarray]]:
        """One (index, episode) task: (index, rows, rollouts)."""
        index, episode = task
        rows, rollouts = self.run_episode(index, episode)
        return index, rows, rollouts

    def run_episode(self, index: int, episode: dict) -> tuple[list[dict], dict[str, np.ndarray]]:
        cfg, wm = self.config, self.wm
        # The adapters' re-initialisation draws from torch's global generator: seeded per episode, an episode's rows do
        # not depend on which episodes ran before it, on which worker, or whether the run was resumed.
        torch.manual_seed(cfg.seed * 1000 + index)
        self._episode_index = index
        frames, actions, poses = episode["frames"], episode["actions"], episode["poses"]
        c, h = cfg.context, cfg.horizon
        real = frames[c:c + h]
        revisit = revisit_mask(poses[:c], poses[c:c + h], cfg.revisit_distance, cfg.revisit_degrees)
        if cfg.require_revisits and not revisit.any():
            raise ValueError(f"episode {index} (seed {episode['seed']}) has no revisit frame in its horizon; use a "
                             f"longer context, another seed, or require_revisits=false")
        future = torch.from_numpy(np.ascontiguousarray(actions[c - 1:c - 1 + h], dtype=np.float32))[None]
        rows, rollouts, memorized, memorize_seconds = [], {"real": real}, False, 0.0
        for name in self.names:
            start, anchored, anchored_mask, pose_error = time.time(), 0, np.zeros(h, dtype=bool), None
            composition = composition_for(name, self.rule, cfg.anchor, cfg.anchor_degrees, cfg.variants)
            if row_spec(name, cfg.variants)[1] == "lookup":  # the memorized frame seen nearest each real pose
                imagined = frames[:c][nearest_pose_index(poses[:c], poses[c:c + h])]
            elif composition is None:
                imagined = np.repeat(frames[c - 1][None], h, axis=0)
            else:
                wm.use_composition(composition)
                if not memorized:  # observe once; memorize once (the LTM's adapters stay for every later row)
                    # reset() re-draws the adapters' initial weights from the global generator: seeded right here, the
                    # memory a row builds does not depend on how many rows reset before it.
                    torch.manual_seed(cfg.seed * 1000 + index)
                    wm.reset()
                    wm.observe(frames[0], pose=poses[0])
                    for t in range(1, c):
                        wm.observe(frames[t], actions[t - 1], pose=poses[t])
                if self._memorizes(composition) and not memorized:
                    steps = None if cfg.memorize_steps < 0 else cfg.memorize_steps
                    generator = torch.Generator().manual_seed(cfg.seed * 1000 + index)
                    if cfg.stream_chunk > 0:  # observe again, memorizing each chunk as it comes
                        memorize_seconds = self._stream(frames, actions, poses, c, steps, generator)
                    else:
                        stats = wm.memorize(steps=steps, generator=generator)
                        memorize_seconds = round(float(stats.get("seconds", 0.0))
                                                 + float(stats.get("sltm", {}).get("seconds", 0.0)), 2)  # LTM + SLTM
                    memorized = True
                    start = time.time()  # the imagination's seconds, memorization reported apart
                if cfg.poses == "recorded":
                    wm.pose_model = RecordedPoses(poses[c:c + h])
                steps = row_sampler_steps(name, cfg.variants)
                wm.sampler = self.sampler if steps is None else dataclasses.replace(self.sampler, steps=steps)
                imagined = tensor_to_frames(wm.imagine(future, seed=cfg.seed * 1000 + index)[0])
                anchored = int(wm.last_anchored.sum())
                if wm.last_anchored.numel():
                    anchored_mask = wm.last_anchored[0].numpy().astype(bool)
                if wm.last_poses is not None:  # where the model put each imagined frame, against where it was
                    imagined_xy = wm.last_poses[0, :, :2].float().cpu().numpy()
                    pose_error = np.hypot(*(imagined_xy - poses[c:c + h, :2]).T)
            per_frame = score_frames(imagined, real, self.lpips)
            row = episode_row(name, index, episode["seed"], per_frame, revisit)
            row["lpips_per_frame"] = " ".join(f"{v:.4f}" for v in per_frame["lpips"])
            row["seconds"] = round(time.time() - start, 2)
            row["anchored_frames"] = anchored
            # per imagined frame, for analyses that split the scores (e.g. revisit frames re-anchored or not):
            # real pose a revisit, frame re-anchored, distance in cells of its imagined pose to its real one
            row["revisit_per_frame"] = " ".join(str(int(v)) for v in revisit)
            row["anchored_per_frame"] = " ".join(str(int(v)) for v in anchored_mask)
            row["pose_error_per_frame"] = "" if pose_error is None else " ".join(f"{v:.3f}" for v in pose_error)
            row["memorize_seconds"] = memorize_seconds if composition is not None and self._memorizes(composition) else 0.0
            rows.append(row)
            rollouts[name] = imagined
        return rows, rollouts


    def _memorizes(self, composition: CompositionConfig) -> bool:
        """Whether a row uses an expert that memorizes the episode: the LTM, or an SLTM with ``sltm_memorizes``."""

        return "ltm" in composition.experts or ("sltm" in composition.experts
                                                and isinstance(self.wm.sltm, LongTermMemoryExpert))

    def _stream(self, frames, actions, poses, context: int, steps: int | None, generator) -> float:
        """Observe ``frames[:context]`` in chunks of ``stream_chunk``, memorizing after each; the seconds spent."""
        wm, chunk = self.wm, self.config.stream_chunk
        torch.manual_seed(self.config.seed * 1000 + self._episode_index)  # as in run_episode: rows do not change the memory
        wm.reset()
        wm.observe(frames[0], pose=poses[0])
        seconds = 0.0
        for t in range(1, context):
            wm.observe(frames[t], actions[t - 1], pose=poses[t])
            if (t + 1) % chunk == 0 or t == context - 1:
                window = min(len(wm.memory), chunk + wm.base.context_frames + 1)
                if window >= wm.base.context_frames + 1:
                    stats = wm.memorize(steps=steps, generator=generator, window=window)
                    seconds += float(stats.get("seconds", 0.0)) + float(stats.get("sltm", {}).get("seconds", 0.0))
        return round(seconds, 2)


# ------------------------------------------------------------------------------------------------------- tables
def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (nan half-width for fewer than 2 values)."""

    x = np.asarray([v for v in values if v != "" and v is not None], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def summary_rows(rows: list[dict], names: list[str]) -> list[dict]:
    out = []
    for name in names:
        mine = [r for r in rows if r["composition"] == name]
        summary = {"composition": name, "episodes": len(mine),
                   "revisit_frames": int(sum(int(r["revisit_frames"]) for r in mine))}
        for key in [f"{m}_{p}" for m in METRICS for p in ("all", "revisit")] + [f"lpips_first{SHORT_HORIZON}"]:
            mean, half = mean_interval([r.get(key, "") for r in mine])
            summary[key] = f"{mean:.4f} ± {half:.4f}" if math.isfinite(half) else f"{mean:.4f}"
        mean, low, high = pooled_revisit(mine)
        summary["lpips_revisit_pooled"] = f"{mean:.4f} [{low:.4f}, {high:.4f}]" if math.isfinite(low) else f"{mean:.4f}"
        if "base" in names:
            base = [r for r in rows if r["composition"] == "base"]
            for part in ("revisit", "all"):
                summary[f"lpips_{part}_vs_base"] = "" if name == "base" else format_paired(paired_to(mine, base, f"lpips_{part}"))
        out.append(summary)
    return out


def paired_to(rows: list[dict], reference: list[dict], key: str) -> dict:
    """The per-episode difference ``rows - reference`` in ``key`` over the episodes both have a value for (an episode
    without revisit frames has none for the revisit columns): its mean, 95 % t half-width, the reference's mean over
    the same episodes, how many episodes the rows are lower in, and how many episodes were paired."""
    theirs = {int(r["episode"]): r.get(key, "") for r in reference}
    pairs = [(float(r[key]), float(theirs[int(r["episode"])])) for r in rows
             if r.get(key, "") != "" and theirs.get(int(r["episode"]), "") != ""]
    if not pairs:
        return {"mean": float("nan"), "half": float("nan"), "reference": float("nan"), "lower": 0, "episodes": 0}
    mine, ref = np.asarray(pairs, dtype=np.float64).T
    mean, half = mean_interval(list(mine - ref))
    return {"mean": mean, "half": half, "reference": float(ref.mean()), "lower": int((mine < ref).sum()),
            "episodes": len(pairs)}


def format_paired(paired: dict) -> str:
    """``-0.0590 ± 0.0410 (-23 %, lower in 17 of 24)``: the paired difference and its share of the reference's mean."""
    if not paired["episodes"]:
        return ""
    half = f" ± {paired['half']:.4f}" if math.isfinite(paired["half"]) else ""
    share = f"{100 * paired['mean'] / paired['reference']:+.0f} %, " if paired["reference"] > 0 else ""
    return f"{paired['mean']:+.4f}{half} ({share}lower in {paired['lower']} of {paired['episodes']})"


def pooled_revisit(rows: list[dict], resamples: int = 2000) -> tuple[float, float, float]:
    """LPIPS over every revisit frame of the rows' episodes pooled (each frame counts once, so an episode with 30
    revisit frames weighs 10x one with 3, where ``lpips_revisit`` averages episodes), with a 95 % bootstrap interval
    over episodes (percentile, fixed seed: the same rows give the same interval). (nan, nan, nan) without revisits."""
    pairs = np.array([(float(r["lpips_revisit"]), int(r["revisit_frames"])) for r in rows
                      if r.get("lpips_revisit", "") != "" and int(r["revisit_frames"]) > 0], dtype=np.float64).reshape(-1, 2)
    if len(pairs) == 0:
        return float("nan"), float("nan"), float("nan")
    values, frames = pairs[:, 0], pairs[:, 1]
    mean = float((values * frames).sum() / frames.sum())
    if len(pairs) < 2:
        return mean, float("nan"), float("nan")
    picks = np.random.default_rng(0).integers(0, len(pairs), size=(resamples, len(pairs)))
    boot = (values[picks] * frames[picks]).sum(axis=1) / frames[picks].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return mean, float(low), float(high)


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically (a temporary file renamed over ``path``) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_per_frame(rows: list[dict], names: list[str], path: Path, title: str) -> None:
    """Mean LPIPS against the real frame at each imagined step, one line per row of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.get_cmap("tab20").colors  # more rows than the default cycle's 10 colours; re-anchored rows dashed
    for i, name in enumerate(names):
        curves = [np.array([float(v) for v in r["lpips_per_frame"].split()]) for r in rows if r["composition"] == name]
        if curves:
            ax.plot(np.arange(1, len(curves[0]) + 1), np.mean(curves, axis=0), label=name, color=colors[(2 * i) % 20
                    if i < 10 else (2 * i + 1) % 20], linestyle="--" if name.endswith("_anchor") else "-")
    ax.set_xlabel("imagined step after the context")
    ax.set_ylabel("LPIPS to the real frame (lower is better)")
    ax.set_title(title.split(":")[0], fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_paired(rows: list[dict], names: list[str], path: Path, title: str) -> None:
    """Each row's paired LPIPS difference to the base (mean per-episode difference with its 95 % t interval), over
    revisit frames and over all frames: below 0 is better than the base. Nothing is drawn without a base row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if r["composition"] == "base"]
    others = [n for n in names if n != "base"]
    if not base or not others:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(others) + 1.6))
    for offset, part, color in ((-0.17, "revisit", "tab:blue"), (0.17, "all", "tab:gray")):
        paired = [paired_to([r for r in rows if r["composition"] == n], base, f"lpips_{part}") for n in others]
        y = np.arange(len(others)) + offset
        means = np.array([p["mean"] for p in paired])
        halves = np.nan_to_num(np.array([p["half"] for p in paired]))
        ax.barh(y, means, height=0.34, xerr=halves, color=color, capsize=3, label=f"{part} frames")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(np.arange(len(others)), others)
    ax.invert_yaxis()
    ax.set_xlabel("LPIPS minus the base's per episode: mean, 95 % t interval (< 0: better)")
    ax.set_title(title.split(":")[0], fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def context_curve(config: ConsistencyConfig) -> list[dict]:
    """One run per context length of ``config.contexts`` (into ``out_dir/context_<n>``); the curve of every row's
    LPIPS (all frames and revisits) against the context length: ``context_curve.csv`` / ``.md`` / ``.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(x) for x in str(config.contexts).split(",") if x.strip()]
    if not lengths or min(lengths) < 3:
        raise ValueError(f"contexts={config.contexts!r}: give context lengths >= 3, e.g. contexts=50,100,200,400")
    names = check_config(dataclasses.replace(config, context=max(lengths), contexts=""))
    out = Path(config.out_dir)
    curve = []
    for length in lengths:
        rows = run(dataclasses.replace(config, context=length, contexts="", out_dir=str(out / f"context_{length}")))
        for summary in summary_rows(rows, names):
            curve.append({"context": length, **summary})
    write_table(out / "context_curve.csv", curve, md_path=out / "context_curve.md",
                title=f"Consistency against the memorized context's length ({config.episodes} episodes, seeds "
                      f"{config.seed}+, horizon {config.horizon}): `python -m come_rl.experiments.consistency "
                      f"contexts={config.contexts} ...`")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, part in zip(axes, ("all", "revisit")):
        for name in names:
            points = [(r["context"], float(str(r[f"lpips_{part}"]).split()[0])) for r in curve if r["composition"] == name]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("memorized context (frames)")
        ax.set_ylabel(f"LPIPS, {part} frames")
        ax.legend(fontsize=8)
    save_figure(fig, out / "context_curve.png")
    return curve


# settings that change no episode's rows: a rerun may change them and resume (episode i is the same episode whatever
# the count: a run may be extended, or cut short and its first episodes tabled)
RESUME_FREE_KEYS = ("threads", "gif", "backend", "workers", "episodes", "out_dir")


def run(config: ConsistencyConfig) -> list[dict]:
    if config.contexts:
        return context_curve(config)
    names = check_config(config)
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    records = out / RECORDS_DIR
    settings = dataclasses.asdict(config)
    check_backend(config.backend, config.workers)
    # a finished run (every episode recorded) rebuilds its tables from the records: its episodes are not generated
    # again (24 maze episodes take ~10 min); check_records below still refuses a rerun with other settings
    finished = all((records / f"episode_{index}.npz").exists() for index in range(config.episodes))
    episodes = [None] * config.episodes if finished else load_episodes(config)
    if config.backend == "local":
        local = ConsistencyWorker(config, names)  # a missing expert is refused here, before any work
        factory, factory_args = (lambda: local), ()
    else:  # the actors load the model; the driver only checks that the experts are there
        check_experts_present(config, names)
        factory, factory_args = ConsistencyWorker, (config, names)
    check_records(out, config, RESUME_FREE_KEYS)  # one writer; a rerun with other settings is refused here
    done = {index: read_record(records / f"episode_{index}.npz")[0] for index in range(len(episodes))
            if (records / f"episode_{index}.npz").exists()}
    todo = [(index, episode) for index, episode in enumerate(episodes) if index not in done]
    first_rollouts = None
    for index, episode_rows, rollouts in iter_tasks(factory, factory_args, todo, backend=config.backend,
                                                    workers=config.workers, threads=config.threads,
                                                    desc="consistency episodes"):
        # the first episode's record keeps its rollouts too (the GIF of a resumed run)
        write_record(records / f"episode_{index}.npz", episode_rows, **(rollouts if index == 0 else {}))
        done[index] = episode_rows
        if index == 0:
            first_rollouts = rollouts
    rows = [row for index in sorted(done) for row in done[index]]
    title = (f"Memory Maze consistency: {config.episodes} held-out episodes (seeds {config.seed}+), {config.context} "
             f"frames observed and memorized, {config.horizon} imagined open loop; mean ± 95 % t interval over "
             f"episodes; revisit = real pose within {config.revisit_distance} cell and {config.revisit_degrees:g} "
             f"degrees of a memorized pose. `python -m come_rl.experiments.consistency "
             + " ".join(f"{k}={v}" for k, v in settings.items()
                        if k == "episodes" or k not in RESUME_FREE_KEYS) + "`")
    write_table(out / "consistency.csv", rows)
    plot_per_frame(rows, names, out / "consistency_lpips.png", title)
    plot_paired(rows, names, out / "consistency_vs_base.png", title)
    write_table(out / "consistency_summary.csv", summary_rows(rows, names), md_path=out / "consistency.md", title=title)
    if config.gif:
        if first_rollouts is None and (records / "episode_0.npz").exists():
            first_rollouts = read_record(records / "episode_0.npz")[1]
        if first_rollouts:
            # real | base | CoME (and re-anchored CoME) when they are rows, else real | base | the last row
            models = [n for n in ("come", "come_anchor") if n in first_rollouts] or [names[-1]]
            shown = ["real"] + [n for n in ("base", *models) if n in first_rollouts and n != "copy_last"]
            save_rollout_gif(out / "rollout.gif", [first_rollouts[n] for n in dict.fromkeys(shown)])
    return rows


def main(argv: list[str] | None = None) -> None:
    config = parse_cli(sys.argv[1:] if argv is None else argv, ConsistencyConfig)
    with stop_with_resume_hint(config.out_dir):
        run(config)
    print((Path(config.out_dir) / ("context_curve.md" if config.contexts else "consistency.md")).read_text())


if __name__ == "__main__":
    main()
