"""The goal-reaching protocol of Navigation World Models (NWM), open loop, on recorded trajectories.

Per case: the world model observes the context (the last ``context`` frames up to the start time ``t``;
optionally more history before them, which the long-term memory memorizes), the goal image is the
recorded frame ``goal_offset`` steps after ``t``, a planner picks ``horizon`` actions once (open loop,
scored by -LPIPS of the last imagined frame to the goal), and the plan is turned into a path:

* Memory Maze / Memory Cards (:func:`run_protocol`): the plan is executed in the real env from the
  recorded start state, reached by ``reset(seed)`` + replaying the recorded prefix actions (exact: the
  envs are deterministic for a seed; every case checks the replayed pose and frame against the
  recording and refuses to go on if they differ).
* RECON (``agents.recon_protocol.evaluate_recon``): the plan's (dx, dy, dyaw) step actions are integrated from the
  start pose (``envs.recon.step_actions_to_poses``), as NWM does.

Metrics per case: ATE and RPE of the path against the recorded one (``come_rl.metrics.trajectory``,
NWM's convention: translation RMSE, no alignment, RPE delta 1) and the final distance to the goal pose.
Memory Maze units are maze cells; RECON's are NWM's waypoint spacings (0.25 m).

CLI (writes ``results/nwm_protocol/<name>.csv`` with one row per case x planner x world model, and
``<name>.md`` with the table of means, planners x world models)::
    python -m agents.nwm_protocol checkpoint=memory_maze data=/work/data/memory_maze_val cases=10 \\
        planners=cem,random_shooting,mppi,nwm experts='base|base,ltm'
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from agents.goal_tasks import path_errors
from come_rl.checkpoint import precision_for, resolve_checkpoint
from come_rl.cli_args import parse_cli, parse_dataclass
from come_rl.data import EpisodeDataset
from come_rl.episode_records import check_records, recorded_episode, stop_with_resume_hint
from come_rl.fanout import FANOUT_KEYS, FanoutSettings, check_backend, run_tasks
from come_rl.interfaces import ActionSpec
from come_rl.results import write_protocol_results
from come_rl.seeding import derive_seed
from come_rl.targets import load_planner
from come_rl.world_model import WorldModel
from envs.memory_wrapper import observe_trajectory
from planners.objectives import LPIPSGoalObjective

PLANNER_NAMES = ("cem", "random_shooting", "mppi", "nwm")


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class TrajectoryCase:
    """One open-loop goal case cut from a recorded episode.

    Attributes:
        episode, seed: index in the data set and the env seed the episode was recorded from.
        start: frame index ``t`` of the last context frame (the plan starts there).
        observed_frames: (M, H, W, 3) uint8 frames ``t - M + 1 .. t`` the world model observes (context + history).
        observed_actions: (M - 1, A) action vectors between them.
        observed_poses: (M, 3) poses of those frames, or None.
        prefix_actions: the ``t`` env actions that lead from the reset to the start state.
        goal_frame: (H, W, 3) uint8 frame ``t + goal_offset``.
        goal_pose: (3,) its pose.
        reference_poses: (horizon + 1, 3) recorded poses ``t .. t + horizon``.
    """

    episode: int
    seed: int
    start: int
    observed_frames: np.ndarray
    observed_actions: np.ndarray
    observed_poses: np.ndarray | None
    prefix_actions: list
    goal_frame: np.ndarray
    goal_pose: np.ndarray
    reference_poses: np.ndarray


def make_cases(dataset: Any, num_cases: int, context: int = 4, goal_offset: int = 8, horizon: int = 8,
               memory_frames: int = 4, max_start: int | None = 40, seed: int = 0) -> list[TrajectoryCase]:
    """Cut ``num_cases`` cases from an ``EpisodeDataset`` (episodes in turn, start times drawn with ``seed``).

    ``memory_frames`` (>= ``context``) frames up to the start are observed; ``max_start`` bounds the start time,
    because the start state is reached by replaying the prefix in the env (~10 steps per second for Memory Maze).
    """
    if num_cases < 1 or context < 1 or goal_offset < 1 or horizon < 1:
        raise ValueError(f"cases, context, goal_offset and horizon must be >= 1, got {num_cases}, {context}, "
                         f"{goal_offset}, {horizon}")
    if memory_frames < context:
        raise ValueError(f"memory_frames ({memory_frames}) must be >= context ({context}): the context is observed too")
    if dataset.poses is None:
        raise ValueError(f"data set {getattr(dataset, 'path', '')} has no poses; ATE/RPE need them (collect with poses)")
    if any(seed_ < 0 for seed_ in dataset.seeds):
        raise ValueError("the data set has episodes without an env seed (-1), so their start states cannot be "
                         "replayed; use a data set written by python -m come_rl.collect")
    rng = np.random.default_rng(seed)
    cases = []
    earliest, reach = memory_frames - 1, max(goal_offset, horizon)
    for index in range(num_cases):
        episode = index % len(dataset)
        length = int(dataset.episode_lengths[episode])
        latest = length - reach if max_start is None else min(length - reach, int(max_start))
        if latest < earliest:
            raise ValueError(f"episode {episode} has {length} steps: too short for memory_frames={memory_frames}, "
                             f"goal_offset={goal_offset}, horizon={horizon} (and max_start={max_start})")
        start = int(rng.integers(earliest, latest + 1))
        frames, actions, poses = dataset.frames[episode], dataset.actions[episode], dataset.poses[episode]
        first = start - memory_frames + 1
        cases.append(TrajectoryCase(
            episode=episode, seed=int(dataset.seeds[episode]), start=start,
            observed_frames=np.asarray(frames[first:start + 1]), observed_actions=np.asarray(actions[first:start]),
            observed_poses=np.asarray(poses[first:start + 1], dtype=np.float64),
            prefix_actions=[decode_action(dataset.action_spec, a) for a in actions[:start]],
            goal_frame=np.asarray(frames[start + goal_offset]),
            goal_pose=np.asarray(poses[start + goal_offset], dtype=np.float64),
            reference_poses=np.asarray(poses[start:start + horizon + 1], dtype=np.float64),
        ))
    return cases


def decode_action(action_spec: ActionSpec, vector: np.ndarray) -> Any:
    """Action vector -> env action (index for discrete spaces)."""
    return action_spec.decode(np.asarray(vector, dtype=np.float32))


# ------------------------------------------------------------------------------------------------ world model
def observe_case(world_model: Any, frames: np.ndarray, actions: np.ndarray, poses: np.ndarray | None,
                 memorize_steps: int) -> dict:
    """Reset the world model, observe the frames (first without an action; the memory wrapper's replay path,
    :func:`envs.memory_wrapper.observe_trajectory`) and memorize them.

    Returns the memorize statistics ({} when nothing was memorized).
    """
    observe_trajectory(world_model, frames, actions, poses)
    if memorize_steps > 0 and "ltm" in getattr(getattr(world_model, "composition", None), "experts", ()):
        return world_model.memorize(steps=memorize_steps) or {}
    return {}


# the table's budget (population, elites, iterations) in each planner's own settings; the rest as conf/planner sets it
BUDGET_KEYS = {
    "cem": lambda population, elites, iterations: dict(population=population, elites=elites, iterations=iterations),
    "random_shooting": lambda population, elites, iterations: dict(population=population),
    "mppi": lambda population, elites, iterations: dict(population=population, iterations=iterations),
    # nwm proposes every constant action for discrete spaces; one rollout per proposal at this budget
    "nwm": lambda population, elites, iterations: dict(num_samples=population, top_k=min(elites, population),
                                                       repeats=1),
}


def build_planner(name: str, population: int, elites: int, iterations: int, seed: int) -> Any:
    """The planner ``name`` of come_rl/conf/planner at the table's budget (:data:`BUDGET_KEYS`)."""
    if name not in BUDGET_KEYS:
        raise ValueError(f"unknown planner {name!r}; choose from {', '.join(PLANNER_NAMES)}")
    return load_planner(name, seed=seed, **BUDGET_KEYS[name](population, elites, iterations))


# ------------------------------------------------------------------------------------------------ env replay
def replay_to_start(env: Any, case: TrajectoryCase, pose_key: str = "pose") -> tuple[Any, dict]:
    """Reset ``env`` with the case's seed and replay the prefix; check the reached state against the recording."""
    observation, info = env.reset(seed=case.seed)
    for action in case.prefix_actions:
        observation, _, _, _, info = env.step(action)
    pose = np.asarray(info[pose_key], dtype=np.float64)[:3]
    pose_error = float(np.max(np.abs(pose - case.reference_poses[0])))
    frame_error = int(np.max(np.abs(np.asarray(observation, dtype=np.int16) - case.observed_frames[-1].astype(np.int16))))
    if pose_error > 1e-3 or frame_error > 0:
        raise RuntimeError(f"replaying episode {case.episode} (seed {case.seed}) for {case.start} steps does not reach "
                           f"the recorded state (pose error {pose_error:.3g}, frame error {frame_error}); the env or "
                           "its settings differ from the recording (check the manifest's env_kwargs)")
    return observation, info


def execute_plan(env_factory: Callable[[], Any], case: TrajectoryCase, env_actions: Sequence,
                 pose_key: str = "pose", env: Any = None) -> np.ndarray:
    """Poses (len(env_actions) + 1, 3) of executing ``env_actions`` from the case's recorded start state."""
    env = env if env is not None else env_factory()
    _, info = replay_to_start(env, case, pose_key)
    poses = [np.asarray(info[pose_key], dtype=np.float64)[:3]]
    for action in env_actions:
        _, _, _, _, info = env.step(action)
        poses.append(np.asarray(info[pose_key], dtype=np.float64)[:3])
    return np.stack(poses)


# ------------------------------------------------------------------------------------------------ protocol
def run_protocol(world_models: dict[str, Any], planners: dict[str, Callable[[], Any]], cases: Sequence[TrajectoryCase],
                 env_factory: Callable[[], Any], horizon: int = 8, memorize_steps: int = 0,
                 objective_factory: Callable[..., Any] | None = None, pose_key: str = "pose",
                 progress: bool = True) -> list[dict]:
    """Every case x world model x planner: observe, plan once, execute the plan in the env, score the path.

    Args:
        world_models: label -> world model (``reset/observe/memorize/imagine``, ``action_spec``, ``frame_shape``).
        planners: label -> factory of a fresh planner (a planner keeps warm-start state).
        cases: from :func:`make_cases`.
        env_factory: builds the env the cases were recorded in (same settings).
        horizon: planned steps.
        memorize_steps: LTM gradient steps on the observed frames (world models whose composition has "ltm").
        objective_factory: ``objective_factory(world_model=..., goal_frame=...)``; default -LPIPS of the last frame.
    Returns:
        one row per case x world model x planner: ate, rpe, final_distance, start_distance, plan_seconds, ...
    """
    if objective_factory is None:
        from come_rl.metrics.lpips_metric import get_lpips

        lpips = get_lpips()

        def objective_factory(world_model, goal_frame):
            return LPIPSGoalObjective(world_model, goal_frame, lpips=lpips)
    env = env_factory()
    executed_cache: dict[tuple, np.ndarray] = {}
    rows = []
    total = len(cases) * len(world_models) * len(planners)
    bar = tqdm(total=total, desc="nwm protocol", unit="plan", disable=not progress)
    for case_index, case in enumerate(cases):
        # everything a case draws from torch's global generator (imagination, memorization) depends on the case only,
        # so cases run in any order or process (backend=ray) give the same rows
        torch.manual_seed(derive_seed(case.seed, "nwm_case", case.start))
        for model_label, world_model in world_models.items():
            spec = world_model.action_spec
            start = time.perf_counter()
            stats = observe_case(world_model, case.observed_frames, case.observed_actions, case.observed_poses,
                                 memorize_steps)
            memorize_seconds = time.perf_counter() - start
            for planner_label, make_planner in planners.items():
                planner = make_planner()
                objective = objective_factory(world_model=world_model, goal_frame=case.goal_frame)
                start = time.perf_counter()
                plan = torch.as_tensor(planner.plan(objective, spec, horizon), dtype=torch.float32)
                plan_seconds = time.perf_counter() - start
                if tuple(plan.shape) != (horizon, spec.dim):
                    raise ValueError(f"planner {planner_label} returned {tuple(plan.shape)}, expected {(horizon, spec.dim)}")
                env_actions = [spec.decode(row.numpy()) for row in plan]
                key = (case_index, repr([np.asarray(a).round(9).tolist() for a in env_actions]))
                if key not in executed_cache:
                    executed_cache[key] = execute_plan(env_factory, case, env_actions, pose_key, env=env)
                executed = executed_cache[key]
                ate, rpe = path_errors(executed, case.reference_poses)
                rows.append({
                    "case": case_index, "episode": case.episode, "seed": case.seed, "start": case.start,
                    "world_model": model_label, "planner": planner_label,
                    "ate": ate, "rpe": rpe,
                    "final_distance": float(np.linalg.norm(executed[-1, :2] - case.goal_pose[:2])),
                    "start_distance": float(np.linalg.norm(case.reference_poses[0, :2] - case.goal_pose[:2])),
                    "plan_seconds": plan_seconds, "memorize_seconds": memorize_seconds,
                    "memorize_loss": float(stats.get("loss_last", math.nan)),
                    "actions": " ".join(str(a) if np.isscalar(a) else "/".join(f"{v:.3g}" for v in np.ravel(a))
                                        for a in env_actions),
                })
                bar.update(1)
    bar.close()
    if hasattr(env, "close"):
        env.close()
    return rows


# ------------------------------------------------------------------------------------------------ CLI
@dataclass
class ProtocolConfig(FanoutSettings):
    """``python -m agents.nwm_protocol key=value ...`` (the toolkit's one ``key=value`` parser: a typo names the keys)."""

    checkpoint: str = ""
    """a Memory Maze / Memory Cards world model (a shipped name or a directory); required."""
    data: str = ""
    """recorded held-out episodes (python -m come_rl.collect env=memory_maze ... out=DIR); required."""
    cases: int = 4
    planners: str = "cem,random_shooting,mppi,nwm"
    """comma-separated, from cem, random_shooting, mppi, nwm."""
    experts: str = "base|base,ltm"
    """world models to compare: expert sets separated by "|", experts by ","."""
    horizon: int = 8
    goal_offset: int = 8
    context: int = 4
    memory_frames: int = 4
    max_start: int = 40
    population: int = 24
    elites: int = 4
    iterations: int = 1
    sampler_steps: int = 4
    memorize_steps: int = 10
    seed: int = 0
    threads: int = 1
    out: str = "results/nwm_protocol"
    name: str = ""
    """results file stem (default: <checkpoint>_<cases>cases_h<horizon>)."""
    progress: bool = True
    precision: str = "auto"
    """auto: the checkpoint's (the shipped ones: bf16 on CUDA and on CPUs with bfloat16 kernels, fp32 elsewhere;
    results made before 2026-12-05 ran in fp32: add precision=fp32 to reproduce them); fp32; bf16. The resolved
    precision is what the run records."""

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.data:
            raise ValueError("give checkpoint=NAME|PATH (a Memory Maze world model) and data=DIR (recorded held-out "
                             "episodes, python -m come_rl.collect env=memory_maze ... out=DIR)")
        unknown = [name for name in self.planner_names if name not in PLANNER_NAMES]
        if unknown or not self.planner_names:
            raise ValueError(f"unknown planners {unknown}; choose from {', '.join(PLANNER_NAMES)} (comma-separated)")
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must not exceed population ({self.population})")
        check_backend(self.backend, self.workers)

    @property
    def planner_names(self) -> list[str]:
        return [name.strip() for name in str(self.planners).split(",") if name.strip()]

    @property
    def expert_sets(self) -> list[list[str]]:
        return [[e.strip() for e in group.split(",") if e.strip()] for group in str(self.experts).split("|")]


def parse_arguments(argv: Sequence[str]) -> ProtocolConfig:
    """``key=value`` arguments -> :class:`ProtocolConfig`; unknown keys, bad numbers and bad settings raise a
    ValueError that says what to give."""
    return parse_dataclass(argv, ProtocolConfig)


RESUME_FREE_KEYS = (*FANOUT_KEYS, "out", "name", "progress")
"""settings a rerun may change and still resume from the recorded cases (where and how verbosely they run)."""


class ProtocolWorker:
    """The world models, planners and env of one protocol run, built once per process (a Ray actor with
    backend=ray); ``run((index, case))`` returns that case's rows (every world model x planner), or reads them back
    from the case's record when ``records`` names the run's records directory (``come_rl.episode_records``)."""

    def __init__(self, config: ProtocolConfig, checkpoint: str, meta: dict, records: str | None = None):
        self.config, self.records = config, None if records is None else Path(records)
        self.world_models = {"+".join(experts): WorldModel.load(checkpoint, experts=experts,
                                                                sampler={"steps": config.sampler_steps},
                                                                precision=config.precision)
                             for experts in config.expert_sets}
        self.planners = {name: (lambda name=name: build_planner(name, config.population, config.elites,
                                                                config.iterations, config.seed))
                         for name in config.planner_names}
        self.env_factory = env_factory_for(meta)

    def run(self, task: tuple[int, TrajectoryCase]) -> list[dict]:
        index, case = task

        def play() -> tuple[dict, list]:
            rows = run_protocol(self.world_models, self.planners, [case], self.env_factory,
                                horizon=self.config.horizon, memorize_steps=self.config.memorize_steps, progress=False)
            return {"rows": [dict(row, case=index) for row in rows]}, []

        record, _ = recorded_episode(self.records, f"case_{index}", play)
        return record["rows"]


def env_factory_for(meta: dict) -> Callable[[], Any]:
    """The env a collected data set was recorded in, from its manifest (``env`` + ``env_kwargs``)."""
    name, kwargs = meta.get("env"), dict(meta.get("env_kwargs") or {})
    if name == "memory_maze":
        from envs.memory_maze import MemoryMazeEnv

        return lambda: MemoryMazeEnv(**kwargs)
    if name == "memory_cards":
        from envs.memory_cards import MemoryCardsEnv

        size = kwargs.get("image_size") or kwargs.get("size") or 48
        return lambda: MemoryCardsEnv(size=size)
    raise ValueError(f"the data set's manifest names env {name!r}; the protocol replays memory_maze or memory_cards")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_cli(sys.argv[1:] if argv is None else argv, ProtocolConfig)
    torch.set_num_threads(config.threads)

    checkpoint = resolve_checkpoint(config.checkpoint)
    config = dataclasses.replace(config, precision=precision_for(checkpoint, config.precision))  # recorded
    dataset = EpisodeDataset(config.data)
    cases = make_cases(dataset, config.cases, config.context, config.goal_offset, config.horizon,
                       config.memory_frames, config.max_start, config.seed)
    name = config.name or f"{checkpoint.name}_{len(cases)}cases_h{config.horizon}"
    # one record per finished case: a killed run resumes where it stopped (the same command again)
    records = Path(config.out) / "records" / name
    check_records(records, config, RESUME_FREE_KEYS)
    with stop_with_resume_hint(records):
        per_case = run_tasks(ProtocolWorker, (config, str(checkpoint), dict(dataset.meta), str(records)),
                             list(enumerate(cases)), backend=config.backend, workers=config.workers,
                             threads=config.threads, desc="nwm protocol cases", progress=config.progress)
    rows = [row for case_rows in per_case for row in case_rows]
    csv_path, md_path = write_protocol_results(rows, config.out, name, f"NWM protocol on {dataset.meta.get('env')}: {name}",
                                      "maze cells" if dataset.meta.get("env") == "memory_maze" else "grid cells")
    print(f"wrote {csv_path} and {md_path}")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
