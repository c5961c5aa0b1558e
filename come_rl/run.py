"""Goal reaching with planners in a world model that remembers.

Usage:
    python -m come_rl.run agent=cem env=memory_maze
    python -m come_rl.run env=point_mass model=point_mass agent=mppi run.episodes=5
    python -m come_rl.run planner._target_=my_module.MyPlanner       # your own planner
    python -m come_rl.run --help                                      # groups and options

Steps: check the configuration (planner, agent, env settings) before any work; build the env from
``env._target_``; load the world model (``model._target_``: ``WorldModel.load`` of ``model.checkpoint``); build the agent
(``agent._target_``);
wrap the env with the memory wrapper (observe every frame, memorize on schedule); record one
reference trajectory per episode (the goal image and the reference path); run the MPC agent; write
``results/<run.name>/`` (see ``agents.runner``): one record per finished episode, so that the same command after a kill
resumes at the first unfinished episode. Every random source (env, reference policy, planner, imagination,
memorization, torch's global generator) is seeded from ``run.seed`` by ``come_rl.seeding``: one command, one machine,
one thread count -> the same CSVs (outside timing columns).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate, to_absolute_path
from omegaconf import MISSING, DictConfig, OmegaConf

from agents.find_object import WorldModelFindAgent, evaluate_agents
from agents.goal_tasks import record_reference_task
from agents.recon_protocol import evaluate_recon
from agents.runner import GoalEpisodePlayer, check_run_directory, run_goal_episodes, summarize
from come_rl.checkpoint import cpu_precision_of, packaged_checkpoints_dir
from come_rl.checkpoint import resolve_checkpoint as resolve_checkpoint_in
from come_rl.devices import resolve_device, resolve_precision, resolve_threads
from come_rl.episode_records import check_records, stop_with_resume_hint
from come_rl.fanout import check_backend, iter_tasks
from come_rl.results import summarize_protocol_rows, write_protocol_results
from come_rl.seeding import check_seed, derive_seed, episode_seeds
from come_rl.targets import build_planner, call_target, import_target
from envs.memory_cards import cursor_pose_model
from envs.memory_wrapper import WorldModelMemoryWrapper
from envs.recon import load_navigation_eval_tasks
from planners.base import check_repeats_and_sharing
from planners.objectives import check_share_prefixes

log = logging.getLogger("come_rl.run")

# keys of an env config that describe the task, not the env's constructor
ENV_RESERVED_KEYS = ("observation", "task", "evaluation")


def build_env(env_cfg: DictConfig) -> gym.Env:
    if "_target_" not in env_cfg:
        raise ValueError("the env config has no _target_; pick env=memory_maze|memory_cards|point_mass")
    target = import_target(env_cfg._target_, "env")
    settings = {k: v for k, v in OmegaConf.to_container(env_cfg, resolve=True).items() if k not in ENV_RESERVED_KEYS}
    return call_target(target, settings)


def resolve_checkpoint(checkpoint: str) -> Path:
    """``come_rl.checkpoint.resolve_checkpoint`` for ``model.checkpoint`` (paths relative to where the command ran)."""
    text = str(checkpoint)
    absolute = Path(to_absolute_path(text))
    return resolve_checkpoint_in(str(absolute) if absolute.exists() else text, what="model.checkpoint",
                                 packaged_dir=packaged_checkpoints_dir(),
                                 hint="train a world model first (see README) and pass model.checkpoint=PATH, or "
                                      "try the loop with env=point_mass model=point_mass")


# keys of a checkpoint model config that are WorldModel.load keyword arguments (None = the checkpoint's default)
MODEL_LOAD_KEYS = ("experts", "composition", "memorize")


def device_settings(cfg: DictConfig) -> dict:
    """The run's top-level ``device`` / ``precision`` / ``compile``, checked (a clear error for a bad device, or CUDA
    asked without it) and resolved: ``{"device": torch.device, "precision": "fp32" | "bf16", "compile": bool}``."""
    device = resolve_device(cfg.get("device", "auto"))
    compile_value = cfg.get("compile", False)
    if not isinstance(compile_value, bool):
        raise ValueError(f"compile must be true or false, got {compile_value!r}")
    model = cfg.get("model") or {}
    cpu_auto = "fp32"  # precision=auto on the CPU: the checkpoint's own (a missing one fails where it is loaded)
    if "checkpoint" in model:
        try:
            cpu_auto = cpu_precision_of(resolve_checkpoint(str(model["checkpoint"])))
        except FileNotFoundError:
            pass
    return {"device": device, "precision": resolve_precision(cfg.get("precision", "auto"), device, cpu_auto=cpu_auto),
            "compile": compile_value}


def build_world_model(model_cfg: DictConfig, placement: dict | None = None, env: gym.Env | None = None) -> Any:
    """``model._target_`` called: with a ``checkpoint`` key it is a loader (``WorldModel.load``) given the resolved
    checkpoint, ``experts=``, ``composition=``, ``memorize=`` and ``sampler=``; without one, a model built from its
    settings (the point mass).

    ``model.experts`` picks the composition (``[base]`` is the no-memory ablation, ``[base, ltm]`` CoME's
    default); ``model.sampler_steps`` the denoising steps per imagined frame. ``placement`` (:func:`device_settings`)
    go to a loader that takes ``device`` (``WorldModel.load``); a model without a checkpoint runs where it runs.
    ``env``: the bare env the agent acts in, given to a model without a checkpoint that takes ``env`` (the exact
    model ``model=memory_maze_simulator``: the simulator imagines from the env's own physics state).
    """
    if "loader" in model_cfg:
        raise ValueError("model.loader is now model._target_ (e.g. model._target_=come_rl.world_model.WorldModel.load)")
    if "_target_" not in model_cfg:
        raise ValueError("the model config needs a _target_ (with checkpoint: a loader such as "
                         "come_rl.world_model.WorldModel.load)")
    target = import_target(str(model_cfg._target_), "model")
    if "checkpoint" not in model_cfg:
        settings = OmegaConf.to_container(model_cfg, resolve=True)
        if env is not None and _takes(target, "env"):
            settings["env"] = env
        return call_target(target, settings)
    checkpoint = resolve_checkpoint(str(model_cfg.checkpoint))
    settings = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs = {key: settings[key] for key in MODEL_LOAD_KEYS if settings.get(key) is not None}
    sampler = dict(settings.get("sampler") or {})
    if settings.get("sampler_steps") is not None:
        if int(settings["sampler_steps"]) < 1:
            raise ValueError(f"model.sampler_steps must be >= 1, got {settings['sampler_steps']}")
        sampler["steps"] = int(settings["sampler_steps"])
    if sampler:
        kwargs["sampler"] = sampler
    if placement is not None and _takes(target, "device"):
        kwargs.update(placement)
    return target(str(checkpoint), **kwargs)


def build_agent(agent_cfg: DictConfig, world_model: Any, planner: Any) -> Any:
    """``agent._target_`` (``agents.mpc.MPCAgent``) with the world model, the planner, the objective factory
    (``agent.objective``) and the agent's other settings (horizon, replan_every)."""
    if "_target_" not in agent_cfg:
        raise ValueError("the agent config has no _target_; pick agent=cem|mppi|random_shooting|nwm or set "
                         "agent._target_ (e.g. agents.mpc.MPCAgent)")
    target = import_target(str(agent_cfg._target_), "agent")
    settings = OmegaConf.to_container(agent_cfg, resolve=True)
    objective_factory = build_objective_factory(agent_cfg.objective)
    settings = {key: value for key, value in settings.items() if key != "objective"}
    return call_target(target, {**settings, "world_model": world_model, "planner": planner,
                                 "objective_factory": objective_factory})


def build_objective_factory(objective: DictConfig) -> Callable:
    """``agent.objective`` instantiated (a ``_partial_`` factory); keys its ``_target_`` does not take are dropped with a
    warning, so that ``agent.objective._target_=MyObjective`` works on top of the default objective's settings."""
    objective_cfg = OmegaConf.to_container(objective, resolve=True)
    target = import_target(str(objective_cfg["_target_"]), "agent.objective")
    dropped = [key for key in objective_cfg if not key.startswith("_") and not _takes(target, key)]
    if dropped:
        log.warning("agent.objective: %s does not take %s; dropped", objective_cfg["_target_"], dropped)
    return instantiate({key: value for key, value in objective_cfg.items() if key not in dropped})


def _takes(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_compatible(env: gym.Env, world_model: Any) -> None:
    """The world model's action spec must describe the env's action space."""
    spec = getattr(world_model, "action_spec", None)
    if spec is None or getattr(world_model, "frame_shape", None) is None:
        raise TypeError(f"world model {type(world_model).__name__} needs action_spec and frame_shape (C, H, W)")
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        ok = spec.kind == "discrete" and spec.dim == space.n
    elif isinstance(space, gym.spaces.Box):
        ok = spec.kind == "continuous" and space.shape == (spec.dim,)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"the world model's actions ({spec.kind}, dim {spec.dim}) do not match the env's {space}; "
            "use a model trained on this env (model=...)"
        )


def check_run_config(cfg: DictConfig) -> None:
    """Cheap checks of everything a typo can break, before the env or the model is built."""
    for key in ("episodes", "threads"):
        if int(cfg.run[key]) < 1:
            raise ValueError(f"run.{key} must be >= 1, got {cfg.run[key]}")
    check_seed(cfg.run.seed)
    task = cfg.env.get("task")
    if task is None:
        raise ValueError("the env config needs a task section (goal_offset, max_steps, success_threshold)")
    for key in ("goal_offset", "max_steps"):
        if int(task[key]) < 1:
            raise ValueError(f"env.task.{key} must be >= 1, got {task[key]}")
    if int(task.get("memorize_steps", 0)) < 0:
        raise ValueError(f"env.task.memorize_steps must be >= 0, got {task.memorize_steps}")
    if float(task.success_threshold) <= 0:
        raise ValueError(f"env.task.success_threshold must be > 0, got {task.success_threshold}")
    if "checkpoint" in cfg.model:
        resolve_checkpoint(str(cfg.model.checkpoint))
    objective, planner = cfg.agent.get("objective") or {}, cfg.get("planner") or {}
    check_repeats_and_sharing(int(planner.get("repeats", 1) or 1), bool(objective.get("share_prefixes", False)),
                              "planner.repeats", "agent.objective.share_prefixes", "agent.objective.repeats")
    experts = cfg.model.get("experts")
    if experts is not None:
        unknown = set(experts) - {"base", "ltm", "stm", "sltm"}
        if unknown or "base" not in experts:
            raise ValueError(f"model.experts={list(experts)} must include 'base' and only name base, ltm, stm, sltm; "
                             "e.g. model.experts=[base] (no memory) or model.experts=[base,ltm] (CoME)")


def run_recon(cfg: DictConfig) -> dict:
    """``env=recon data_dir=...``: NWM's open-loop protocol on RECON (``agents.recon_protocol.evaluate_recon``).

    Writes ``results/<run.name>/recon_cases.csv`` (one row per case) and ``recon_cases.md`` (ATE / RPE / final
    distance in NWM's units: waypoint spacings of 0.25 m).
    """
    env_cfg = cfg.env
    if env_cfg.get("data_dir") in (None, "", "???"):
        raise ValueError("env=recon needs the RECON data: pass data_dir=PATH (the folder of processed trajectories "
                         "<traj_name>/{0..T-1}.jpg + traj_data.pkl; envs.recon converts the raw hdf5 files)")
    root = Path(to_absolute_path(str(env_cfg.data_dir)))
    if not root.is_dir():
        raise FileNotFoundError(f"RECON data_dir {str(root)!r} does not exist; pass data_dir=PATH to the folder of "
                                "processed RECON trajectories")
    specs = load_navigation_eval_tasks(env_cfg.get("cases_csv"))
    max_cases = env_cfg.get("max_cases")
    if max_cases is not None and int(max_cases) < 1:
        raise ValueError(f"env.max_cases must be >= 1 or null (all cases), got {max_cases}")
    memorize_steps = int(env_cfg.get("memorize_steps", 0))
    if memorize_steps < 0:
        raise ValueError(f"env.memorize_steps must be >= 0, got {memorize_steps}")
    if "checkpoint" in cfg.model:
        resolve_checkpoint(str(cfg.model.checkpoint))
    torch.set_num_threads(cfg.run.threads)
    planner = build_planner(cfg.planner)
    objective_factory = build_objective_factory(cfg.agent.objective)
    out_dir = Path(to_absolute_path(str(cfg.run.out_dir)))
    # finished cases are recorded under out_dir/episode_records: a rerun of the command skips them (a kill loses at
    # most the case in progress); env.max_cases may grow between runs, any other change is refused
    settings = resume_config(cfg)
    settings["env"].pop("max_cases", None)
    check_records(out_dir, settings, ())
    world_model = build_world_model(cfg.model, device_settings(cfg))
    rows = evaluate_recon(world_model, planner, root, specs, objective_factory, memorize_steps=memorize_steps,
                          max_cases=None if max_cases is None else int(max_cases), progress=bool(cfg.run.progress),
                          records=out_dir, seed=int(cfg.run.seed))
    choices = _choices()
    experts = getattr(getattr(world_model, "composition", None), "experts", None)
    model_label = "+".join(experts) if experts else str(choices.get("model") or type(world_model).__name__)
    planner_label = str(choices.get("planner") or str(cfg.planner._target_).rsplit(".", 1)[-1])
    rows = [{"planner": planner_label, "world_model": model_label, **row} for row in rows]
    csv_path, md_path = write_protocol_results(rows, out_dir, "recon_cases", f"RECON goal reaching (NWM protocol): {cfg.run.name}",
                                      "NWM units: waypoint spacings of 0.25 m")
    summary = {"run": cfg.run.name, **choices, "planner_target": cfg.planner._target_, **summarize_protocol_rows(rows)[0]}
    print(f"results written to {out_dir}")
    print(md_path.read_text())
    return summary


def run_find_object(cfg: DictConfig) -> dict:
    """``env=memory_cards_find``: the world-model agent uncovers the tile it imagines hides the goal object
    (``agents.find_object``); ``run.episodes`` episodes from ``run.seed``, results in ``results/<run.name>/``."""
    if int(cfg.run.episodes) < 1:
        raise ValueError(f"run.episodes must be >= 1, got {cfg.run.episodes}")
    memorize_steps = int(cfg.env.task.get("memorize_steps", 100))
    if memorize_steps < 0:
        raise ValueError(f"env.task.memorize_steps must be >= 0, got {memorize_steps}")
    samples = cfg.env.task.get("samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"env.task.samples (imagined samples per tile) must be an integer >= 1, got {samples!r}")
    share_prefixes = cfg.env.task.get("share_prefixes", True)
    check_share_prefixes(share_prefixes, "env.task.share_prefixes")
    out_dir = Path(to_absolute_path(str(cfg.run.out_dir)))
    if "checkpoint" in cfg.model:
        resolve_checkpoint(str(cfg.model.checkpoint))  # a missing checkpoint: its clear error before anything is written
    # finished episodes are recorded under out_dir/episode_records: a rerun of the command skips them; run.episodes may
    # grow between runs, any other change is refused
    check_records(out_dir, resume_config(cfg), ())
    torch.set_num_threads(cfg.run.threads)
    world_model = build_world_model(cfg.model, device_settings(cfg))
    world_model.pose_model = world_model.pose_model or cursor_pose_model
    experts = "+".join(world_model.composition.experts)
    agent = WorldModelFindAgent(world_model, memorize_steps, seed=int(cfg.run.seed), name=experts, samples=samples,
                                share_prefixes=share_prefixes)
    title = (f"Memory Cards, find the object: world model {cfg.model.checkpoint} ({experts}), {memorize_steps} "
             f"memorization steps, {samples} imagined samples per tile, {cfg.run.episodes} episodes from seed "
             f"{cfg.run.seed}; chance 2/16")
    summary = evaluate_agents([agent], int(cfg.run.episodes), int(cfg.run.seed), out_dir, title,
                              progress=bool(cfg.run.progress), make_env=lambda: build_env(cfg.env),
                              records=out_dir)[0]
    print(f"results written to {out_dir}")
    print((out_dir / "summary.md").read_text())
    return {"run": cfg.run.name, **_choices(), **summary}


# run.* keys that change no episode's numbers: a rerun into the same run.out_dir may change them and still resume
# (run.episodes raised extends the run; the directory itself says where the run is)
RESUME_FREE_RUN_KEYS = ("name", "out_dir", "episodes", "progress", "backend", "workers", "gpus_per_worker")


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint directory's JSON files (names and bytes).

    They hold the SHA-256 of every weight file (``come_rl.checkpoint``), so a retrained or re-copied world model gets
    another fingerprint even where its path stays the same.
    """
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def resume_config(cfg: DictConfig) -> dict:
    """What the episodes of a goal-reaching run depend on: the resolved configuration without
    ``RESUME_FREE_RUN_KEYS``, and the world model's checkpoint fingerprint.

    ``agents.runner`` stores it in the run directory; a rerun into that directory resumes only when it is equal, so
    that one table never mixes episodes of two configurations. ``run.threads`` stays in: other thread counts give
    other numbers (README, Reproducibility). So do other devices and precisions: the resolved ones are kept
    (``device=auto`` means another device on another machine), except the CPU in float32 without compilation, which
    is recorded as nothing, as before devices were a setting (run directories of then resume).
    """
    settings = OmegaConf.to_container(cfg, resolve=False)
    for key in RESUME_FREE_RUN_KEYS:  # run.name may use Hydra's resolvers: drop it before resolving the rest
        settings["run"].pop(key, None)
    for key in ("device", "precision", "compile"):
        settings.pop(key, None)
    resolved = OmegaConf.to_container(OmegaConf.create(settings), resolve=True)
    where = device_settings(cfg)
    if (where["device"].type, where["precision"], where["compile"]) != ("cpu", "fp32", False):
        resolved["device"] = {"device": str(where["device"]), "precision": where["precision"],
                              "compile": where["compile"]}
    if "checkpoint" in cfg.model:
        resolved["checkpoint_sha256"] = checkpoint_fingerprint(resolve_checkpoint(str(cfg.model.checkpoint)))
    return resolved


def seed_global_generators(seed: int) -> None:
    """Seed torch's global generator from ``run.seed`` before anything is built.

    torch seeds it from OS entropy in every new process; whatever still draws from it without a generator (a
    library, the find-the-object and RECON paths) would make two runs of one command differ. The goal-reaching
    episodes re-seed it per episode (``come_rl.seeding``).
    """
    torch.manual_seed(derive_seed(seed, "torch_global"))


def observation_keys(cfg: DictConfig) -> tuple[str | None, str]:
    """The env's frame key (None: the observation is the frame) and pose key, from ``env.observation``."""
    observation_cfg = cfg.env.get("observation", {})
    return observation_cfg.get("frame_key"), observation_cfg.get("pose_key", "pose")


def build_goal_player(cfg: DictConfig, settings: dict) -> tuple[GoalEpisodePlayer, gym.Env]:
    """Everything that plays goal-reaching episodes of ``cfg`` in one process: planner, objective, env, world model,
    agent, the memory wrapper, LPIPS. Returns the player and the bare env (to record the tasks, and to close)."""
    torch.set_num_threads(cfg.run.threads)
    planner = build_planner(cfg.planner)
    env = build_env(cfg.env)
    world_model = build_world_model(cfg.model, settings, env=env)
    check_compatible(env, world_model)
    agent = build_agent(cfg.agent, world_model, planner)
    frame_key, pose_key = observation_keys(cfg)
    wrapped = WorldModelMemoryWrapper(env, world_model, memorize_every=cfg.memory.memorize_every,
                                      memorize_steps=cfg.memory.memorize_steps, frame_key=frame_key, pose_key=pose_key)
    lpips = None
    if cfg.run.lpips_metric:
        from come_rl.metrics.lpips_metric import get_lpips

        lpips = get_lpips(device=getattr(world_model, "device", settings["device"]))
    task_cfg = cfg.env.task
    player = GoalEpisodePlayer(wrapped, agent, int(task_cfg.max_steps), float(task_cfg.success_threshold), lpips=lpips,
                               gif_episodes=int(cfg.run.gif_episodes), frame_key=frame_key, pose_key=pose_key,
                               preload_memory=bool(task_cfg.get("preload_memory", False)),
                               memorize_steps=int(task_cfg.get("memorize_steps", 25)))
    return player, env


class GoalEpisodeWorker:
    """A Ray worker of ``run.backend=ray``: builds its player from the resolved configuration once, then plays
    ``(index, task, seeds)`` jobs. Every episode seeds all it draws (``come_rl.seeding``), so its row is the one the
    local run writes, whichever worker plays it (tested)."""

    def __init__(self, container: dict):
        cfg = OmegaConf.create(container)
        seed_global_generators(cfg.run.seed)
        self.player, self.env = build_goal_player(cfg, device_settings(cfg))

    def run(self, job: tuple) -> Any:
        index, task, seeds = job
        return self.player.play(index, task, seeds)


EVALUATIONS = ("goal_reaching", "find_object", "recon")
"""What ``come_rl.run`` plays, chosen by the env config's ``evaluation`` key: goal-reaching episodes (the default),
Memory Cards' find-the-object episodes (:func:`run_find_object`) or NWM's open-loop RECON protocol (:func:`run_recon`)."""


def run(cfg: DictConfig) -> dict:
    """Run the configured goal-reaching evaluation; return the summary row."""
    settings = device_settings(cfg)  # a bad device= fails before any work
    # run.threads=auto becomes a count here, once: the tables and run_config.json record the count the run used
    cfg.run.threads = resolve_threads(cfg.run.threads)
    seed_global_generators(cfg.run.seed)
    evaluation = str(cfg.env.get("evaluation", "goal_reaching"))
    if evaluation not in EVALUATIONS:
        raise ValueError(f"env.evaluation={evaluation!r} is not an evaluation of come_rl.run; the env config must name one "
                         f"of {list(EVALUATIONS)} (goal_reaching when it names none)")
    special = None if evaluation == "goal_reaching" else evaluation
    if special and str(cfg.run.get("backend", "local")) != "local":
        fanned = {"recon": "python -m agents.nwm_protocol ... backend=ray workers=N",
                  "find_object": "python -m agents.find_object ... backend=ray workers=N"}[special]
        raise ValueError(f"run.backend={cfg.run.backend} fans out goal-reaching episodes only; this {special} run plays "
                         f"here (run.backend=local). To fan it out over Ray: {fanned}")
    if special == "recon":
        return run_recon(cfg)
    if special == "find_object":
        return run_find_object(cfg)
    check_run_config(cfg)
    out_dir = Path(to_absolute_path(str(cfg.run.out_dir)))
    run_config = resume_config(cfg)
    check_run_directory(out_dir, run_config)  # a rerun into a directory of another configuration fails before any work
    horizon, replan_every = cfg.agent.horizon, cfg.agent.replan_every
    if int(horizon) < 1 or not 1 <= int(replan_every) <= int(horizon):
        raise ValueError(f"agent.horizon must be >= 1 and 1 <= agent.replan_every <= horizon, got {horizon}, {replan_every}")
    backend, workers = str(cfg.run.get("backend", "local")), cfg.run.get("workers", 1)
    check_backend(backend, workers)
    task_cfg = cfg.env.task
    frame_key, pose_key = observation_keys(cfg)
    if backend == "local":
        player, env = build_goal_player(cfg, settings)
    else:  # the episodes play in Ray workers; this process records the tasks and writes the tables
        torch.set_num_threads(cfg.run.threads)
        env = build_env(cfg.env)
    policy = instantiate(task_cfg.reference_policy) if task_cfg.get("reference_policy") else None
    seeds = [episode_seeds(int(cfg.run.seed), index) for index in range(int(cfg.run.episodes))]
    tasks = [record_task(env, episode, int(task_cfg.goal_offset), policy, frame_key, pose_key,
                         float(task_cfg.get("min_goal_distance", 0.0))) for episode in seeds]
    if backend == "local":
        def play(indices):
            for index in indices:
                yield player.play(index, tasks[index], seeds[index])
    else:
        container = OmegaConf.to_container(cfg, resolve=True)
        if "checkpoint" in cfg.model:  # a worker's working directory may differ
            container["model"]["checkpoint"] = str(resolve_checkpoint(str(cfg.model.checkpoint)))

        def play(indices):
            return iter_tasks(GoalEpisodeWorker, (container,), [(i, tasks[i], seeds[i]) for i in indices],
                              backend=backend, workers=int(workers), threads=cfg.run.threads,
                              gpus_per_worker=float(cfg.run.get("gpus_per_worker", 0.0)), progress=False)
    choices = _choices()
    run_info = {"run": cfg.run.name, **choices, "planner_target": cfg.planner._target_,
                "horizon": horizon, "replan_every": replan_every}
    results = run_goal_episodes(None, None, tasks, max_steps=int(task_cfg.max_steps),
                                success_threshold=float(task_cfg.success_threshold), out_dir=out_dir,
                                gif_episodes=int(cfg.run.gif_episodes), run_info=run_info,
                                progress=bool(cfg.run.progress), seeds=seeds, run_config=run_config, play=play)
    env.close()

    summary = {**run_info, **summarize([r.episode_row for r in results])}
    log.info("results in %s: %s", out_dir, {k: summary[k] for k in ("success_rate", "final_distance", "ate", "rpe")})
    print(f"results written to {out_dir}")
    print((out_dir / "summary.md").read_text())
    print(reached_sentence(summary, float(task_cfg.success_threshold), list(cfg.model.get("experts") or [])))
    return summary


# a start whose every reference path stays near it (a dead end the policy keeps turning in) is replaced by another maze
TASK_REDRAWS = 3


def record_task(env: gym.Env, episode, goal_offset: int, policy, frame_key: str | None, pose_key: str,
                min_goal_distance: float):
    """The episode's goal task from its env seed; where no reference path from that start ends ``min_goal_distance``
    away, the start is redrawn from the episode's own seed stream (up to ``TASK_REDRAWS`` times, each logged), so one
    awkward start does not stop a run and every other episode keeps its task."""
    error = None
    for redraw in range(TASK_REDRAWS + 1):
        seed = episode.env if redraw == 0 else derive_seed(episode.env, "redraw", redraw) % 2**31
        try:
            return record_reference_task(env, seed=seed, policy_seed=episode.policy, goal_offset=goal_offset,
                                         policy=policy, frame_key=frame_key, pose_key=pose_key,
                                         min_goal_distance=min_goal_distance)
        except ValueError as failure:
            error = failure
            if redraw < TASK_REDRAWS:
                log.warning("%s; the episode starts from env seed %d instead", failure,
                            derive_seed(episode.env, "redraw", redraw + 1) % 2**31)
    raise error


def reached_sentence(summary: dict, threshold: float, experts: list[str]) -> str:
    """What the agent reached, whether memory told it where the goal is, and the command of the other side of the
    memory ablation on the same episodes (same seeds)."""
    episodes = int(summary["episodes"])
    hits = round(float(summary["success_rate"]) * episodes)
    line = (f"reached the goal (within {threshold:g}) in {hits}/{episodes} episodes; mean distance to the goal "
            f"{float(summary['start_distance']):.2f} at the start -> {float(summary['final_distance']):.2f} at the end")
    if experts:
        remembers = "ltm" in experts or "sltm" in experts
        line += f" (experts {'+'.join(experts)}: {'with' if remembers else 'without'} long-term memory"
        knows = summary.get("knows_place")
        if knows is not None and not math.isnan(float(knows)):
            line += f"; the goal's place found in memory in {round(float(knows) * episodes)}/{episodes}"
        ablation = "[base]" if remembers else "[base,ltm]"
        line += (f")\nthe same episodes {'without' if remembers else 'with'} memory: add model.experts={ablation} to "
                 f"this command")
    return line


def _choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
        return {group: choices.get(group) for group in ("env", "model", "agent", "planner")}
    except ValueError:  # run() called without Hydra (tests, notebooks)
        return {}


@dataclass
class RunSettings:
    """``run.*``: where results go and how the episodes are played. Types only: every value, with what it means, is
    written once, in ``come_rl/conf/config.yaml``."""

    name: str = MISSING
    out_dir: str = MISSING
    episodes: int = MISSING
    seed: int = MISSING
    gif_episodes: int = MISSING
    lpips_metric: bool = MISSING
    threads: Any = MISSING  # a count or "auto"
    progress: bool = MISSING
    backend: str = MISSING
    workers: int = MISSING
    gpus_per_worker: float = MISSING


@dataclass
class MemorySettings:
    """``memory.*``: the memory wrapper's streaming memorization (values in ``come_rl/conf/config.yaml``)."""

    memorize_every: int = MISSING
    memorize_steps: int = MISSING


@dataclass
class RunConfig:
    """The typed schema of ``python -m come_rl.run`` (registered in Hydra's ConfigStore as ``run_schema`` and merged
    under ``come_rl/conf/config.yaml``): the run's own settings are checked for type at composition; the groups
    (env, model, agent, planner) are open, their keys belong to their ``_target_``."""

    env: Any = MISSING
    model: Any = MISSING
    agent: Any = MISSING
    planner: Any = MISSING
    data_dir: Optional[str] = MISSING  # noqa: UP007 - OmegaConf reads typing.Optional
    device: str = MISSING
    precision: str = MISSING
    compile: Any = MISSING  # checked by device_settings, whose error says what to give
    run: RunSettings = field(default_factory=RunSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)


ConfigStore.instance().store(name="run_schema", node=RunConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with stop_with_resume_hint(cfg.run.out_dir):
        run(cfg)


if __name__ == "__main__":
    main()
