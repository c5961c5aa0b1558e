"""Memory Maze, return to a seen place: the goal is a view from earlier in the same episode, out of view now.

    python -m agents.return_to_place episodes=32 seed=9200             # all agents, 32 held-out episodes each
    python -m agents.return_to_place agents=random,oracle episodes=5   # the baselines only (no world model, fast)
    python -m agents.return_to_place agents=base,ltm episodes=20 decisions=12 population=24 sampler_steps=4

One episode (everything derives from ``seed + episode`` through ``come_rl.seeding.episode_seeds``):

1. **Exploration.** ``env.reset(seed=s)``, then ``explore_steps`` steps of ``envs.memory_maze.ExploringRandomPolicy``
   (numpy generator from the episode's ``policy`` stream). A world-model agent lives through it as the agent would:
   ``wm.observe(frame, action, pose)`` on every frame, then ``wm.memorize(memorize_steps)`` once at its end (the LTM's
   LoRA adapters; a no-op for ``experts=[base]``).
2. **The goal** is one exploration frame, picked by this rule: the *latest* frame ``k`` whose position is at least
   ``min_goal_distance`` (default 2.0 maze cells) from the position where exploration ended *and* cannot be seen from
   the final pose: it lies outside a +-60 degree cone around the final heading (the camera's field of view is 80
   degrees, +-40; 20 degrees of margin), or the straight line to it crosses a wall cell of the layout. The latest
   such frame keeps the way back as short as the rule allows (2-3 grid cells), so that the step budget suffices for
   an agent that knows where to go (the oracle) and what is measured is whether the agent does. If no frame
   qualifies, exploration is redrawn from the same start with the next policy seed (up to ``max_attempts``; the
   ``attempt`` column).
3. **Planning.** From where exploration ended (the env is not reset: the world model's context runs on), the agent
   has ``decisions`` decisions of ``replan_every`` env steps each (the same ``decisions * replan_every`` env steps for
   every agent). **Success: the final position is less than ``success_distance`` = 1.0 maze cell (one cell width) from
   the position where the goal view was recorded** (the heading is not scored).

Agents (``agents=``): ``random`` (uniform random actions, seeded); ``base`` (the CEM MPC planner of ``agent=cem``,
world model ``experts=[base]``: it memorizes nothing, so it has no places and scores by LPIPS of the imagined last frame
to the goal image, NWM's objective); ``base_places`` (the base's imagination with a place memory and no LTM:
``WorldModel.record_places``); ``ltm`` (``experts=[base, ltm]``, the shipped default composition, memorized on the
exploration); ``come`` (every expert the checkpoint has: base + LTM + STM + SLTM for the shipped maze checkpoint);
``exact`` (the same planner and objective with the simulator as the world model, ``envs.memory_maze.
MazeSimulatorModel``: imagination is exact, so its rate bounds what any learned model gives this planner and
objective); ``exact_path`` (the simulator scored along the oracle's reference path back); ``oracle`` (knows the goal
position and the layout and follows the shortest grid path: the ceiling of the task under the budget).

Objective (``objective=place``, ``agent=cem``'s default; ``planners.objectives.PlaceObjective``): the goal image is
looked up among the frames the world model memorized, which gives the goal's place; with ``scoring=graph`` (the
default) candidates score by the cost-to-go of their imagined final pose (the checkpoint's odometry head on the
imagined frames; the simulator's own poses for ``exact``) along the graph of memorized places
(``planners.place_graph``), minus ``turn_weight`` times the heading's angle off the way; ``scoring=waypoint`` scores
the distance to a waypoint ``lookahead`` cells ahead on the memorized route instead. ``objective=lpips``: LPIPS to the
goal view for every agent.

Metrics (``results/return_to_place/``: ``episodes.csv``/``.md``, ``summary.csv``/``.md``, ``success.png``, one success
and one failure GIF per agent, ``<agent>_success.gif`` / ``<agent>_failure.gif``: real | imagined | goal, exploration
first with the goal frame outlined in red): success rate with a 95 % Wilson interval, final distance, closest
distance on the way (``min_distance``) and the first step inside the success radius (``first_reach_step``, -1:
never), ATE/RPE (evo, NWM's convention: translation, RMSE, no alignment, RPE delta 1 frame) of the
executed path against the *reference return path* (the exploration path from its end back to the goal, reversed,
yaw turned by pi; over the common length). The world model imagines frames, not poses, so there is no imagined
trajectory in pose space; the image-space comparison of imagined and real is ``lpips_imagined_real``: LPIPS between
the frame the executed plan imagined for each step and the real frame of that step. ``lpips_to_goal``: the real final
frame to the goal image. ``seconds_per_decision``: the planner's wall time per decision (0 for random/oracle).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.goal_tasks import frames_to_model_tensor, path_errors
from agents.mpc import MPCAgent
from come_rl.checkpoint import precision_for, resolve_checkpoint
from come_rl.cli_args import run_evaluation_cli
from come_rl.conventions import tensor_to_frames, wrap_angle
from come_rl.episode_records import check_records, recorded_episode
from come_rl.evaluation import play_agents, summarize_successes, write_success_results
from come_rl.fanout import FANOUT_KEYS, FanoutSettings, check_backend
from come_rl.odometry import ODOMETRY_NAME
from come_rl.seeding import EpisodeSeeds, episode_seeds, torch_generator
from come_rl.targets import load_planner
from come_rl.world_model import WorldModel
from envs.memory_maze import ExploringRandomPolicy, MemoryMazeEnv
from planners.objectives import SCORINGS, LPIPSGoalObjective, PathObjective, PlaceObjective

AGENTS = ("random", "base", "base_places", "ltm", "come", "exact", "exact_path", "oracle")
DEFAULT_AGENTS = ("random", "base", "base_places", "ltm", "come", "exact", "oracle")
WORLD_MODEL_AGENTS = ("base", "base_places", "ltm", "come")
OBJECTIVES = ("place", "lpips")
# The egocentric camera's vertical field of view is 80 degrees (dm_control's jumping_ball.xml) on a square image, so
# +-40 degrees horizontally; the "in view" cone is wider by 20 degrees so that a goal at its edge counts as visible.
VIEW_HALF_ANGLE = math.radians(60.0)
NOOP, FORWARD, TURN_LEFT, TURN_RIGHT, FORWARD_LEFT, FORWARD_RIGHT = range(6)


# ------------------------------------------------------------------------------------------------------ geometry
def _free(layout: np.ndarray, x: float, y: float) -> bool:
    """Whether the point (x, y) (maze cells) lies in a free cell; outside the layout is wall."""
    column, row = math.floor(x), math.floor(y)
    return 0 <= row < layout.shape[0] and 0 <= column < layout.shape[1] and bool(layout[row, column])


def line_of_sight(layout: np.ndarray, start: np.ndarray, end: np.ndarray, clearance: float = 0.0,
                  spacing: float = 0.05) -> bool:
    """Whether the segment start -> end (and its two copies shifted sideways by ``clearance``) crosses no wall cell."""
    start, end = np.asarray(start, np.float64)[:2], np.asarray(end, np.float64)[:2]
    delta = end - start
    length = float(np.linalg.norm(delta))
    offsets = [np.zeros(2)]
    if clearance > 0 and length > 0:
        normal = np.array([-delta[1], delta[0]]) / length
        offsets += [normal * clearance, -normal * clearance]
    for t in np.linspace(0.0, 1.0, max(2, int(length / spacing) + 2)):
        point = start + t * delta
        if not all(_free(layout, *(point + offset)) for offset in offsets):
            return False
    return True


def goal_in_view(layout: np.ndarray, pose: np.ndarray, point: np.ndarray, half_angle: float = VIEW_HALF_ANGLE) -> bool:
    """Whether ``point`` could be seen from ``pose`` (x, y, yaw): inside the +-half_angle cone and not behind a wall."""
    offset = np.asarray(point, np.float64)[:2] - np.asarray(pose, np.float64)[:2]
    if np.linalg.norm(offset) < 1e-9:
        return True
    bearing = float(wrap_angle(math.atan2(offset[1], offset[0]) - float(pose[2])))
    return abs(bearing) <= half_angle and line_of_sight(layout, pose, point)


def grid_path(layout: np.ndarray, start: np.ndarray, goal: np.ndarray) -> list[tuple[int, int]]:
    """The shortest 4-connected path of free cells (row, column) from the cell of ``start`` to that of ``goal``."""
    source = (math.floor(start[1]), math.floor(start[0]))
    target = (math.floor(goal[1]), math.floor(goal[0]))
    previous: dict[tuple[int, int], tuple[int, int] | None] = {source: None}
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        if cell == target:
            break
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nxt = (cell[0] + dr, cell[1] + dc)
            inside = 0 <= nxt[0] < layout.shape[0] and 0 <= nxt[1] < layout.shape[1]
            if inside and layout[nxt] and nxt not in previous:
                previous[nxt] = cell
                queue.append(nxt)
    if target not in previous:
        raise ValueError(f"no free path from cell {source} to cell {target} in the maze layout")
    path, cell = [], target
    while cell is not None:
        path.append(cell)
        cell = previous[cell]
    return path[::-1]


# ---------------------------------------------------------------------------------------------------------- task
@dataclass
class ReturnTask:
    """One return-to-a-seen-place episode's exploration and goal (see the module docstring).

    Attributes:
        seed: the env seed (``env.reset(seed=seed)``).
        policy_seed: the exploring policy's seed (attempt 0; attempt a uses (policy_seed, a)).
        attempt: which exploration attempt gave a goal.
        frames: (explore_steps + 1, H, W, 3) uint8 exploration frames, the reset frame first.
        actions: the explore_steps env actions.
        poses: (explore_steps + 1, 3) (x, y, yaw) poses.
        goal_index: the exploration frame that is the goal.
        layout: the maze layout (1 = free, row 0 at the bottom).
    """

    seed: int
    policy_seed: int
    attempt: int
    frames: np.ndarray
    actions: list[int]
    poses: np.ndarray
    goal_index: int
    layout: np.ndarray

    @property
    def goal_frame(self) -> np.ndarray:
        return self.frames[self.goal_index]

    @property
    def goal_pose(self) -> np.ndarray:
        return self.poses[self.goal_index]

    @property
    def start_pose(self) -> np.ndarray:
        """Where the planning phase starts: the last exploration pose."""
        return self.poses[-1]

    @property
    def return_reference(self) -> np.ndarray:
        """The exploration path from its end back to the goal, reversed and turned around (ATE/RPE reference)."""
        back = self.poses[self.goal_index:][::-1].astype(np.float64).copy()
        back[:, 2] = wrap_angle(back[:, 2] + np.pi)
        return back


def pick_goal(poses: np.ndarray, layout: np.ndarray, min_goal_distance: float,
              half_angle: float = VIEW_HALF_ANGLE) -> int | None:
    """The goal rule (module docstring): the latest frame at >= min_goal_distance from the last pose and out of view."""
    final = poses[-1]
    for index in range(len(poses) - 2, -1, -1):
        if (np.linalg.norm(poses[index, :2] - final[:2]) >= min_goal_distance
                and not goal_in_view(layout, final, poses[index, :2], half_angle)):
            return index
    return None


def explore(env, seed: int, policy_seed: int, explore_steps: int, min_goal_distance: float,
            max_attempts: int = 20) -> tuple[ReturnTask, np.ndarray, dict]:
    """Reset ``env`` (a ``MemoryMazeEnv``) with ``seed``, explore, pick the goal; the env is left where exploration
    ended. Returns the task and the last (observation, info), from which the planning phase continues."""
    policy = ExploringRandomPolicy()
    for attempt in range(max(1, int(max_attempts))):
        policy.reset()
        rng = np.random.default_rng(policy_seed if attempt == 0 else (policy_seed, attempt))
        observation, info = env.reset(seed=int(seed))
        frames, poses, actions = [observation], [np.asarray(info["pose"], np.float64)], []
        for _ in range(int(explore_steps)):
            action = policy(info, rng)
            observation, _, _, truncated, info = env.step(action)
            frames.append(observation)
            poses.append(np.asarray(info["pose"], np.float64))
            actions.append(int(action))
            if truncated:
                raise ValueError(f"the env truncated the exploration after {len(actions)} steps; "
                                 f"lower explore_steps (got {explore_steps}) or raise max_episode_steps")
        poses_array = np.stack(poses)
        layout = np.asarray(info["maze_layout"]).copy()
        goal_index = pick_goal(poses_array, layout, min_goal_distance)
        if goal_index is not None:
            return (ReturnTask(int(seed), int(policy_seed), attempt, np.stack(frames), actions, poses_array, goal_index,
                               layout), observation, info)
    raise ValueError(f"no exploration of {explore_steps} steps from env seed {seed} left a frame at >= "
                     f"{min_goal_distance} cells that is out of view at its end in {max_attempts} attempts; "
                     "raise explore_steps or lower min_goal_distance")


# -------------------------------------------------------------------------------------------------------- agents
class RandomAgent:
    """Uniformly random actions from the episode's ``planner`` stream."""

    name, experts = "random", "-"

    def begin(self, task: ReturnTask, seeds: EpisodeSeeds) -> dict:
        self.rng = np.random.default_rng(seeds.planner)
        self.replanned, self.last_plan_seconds = True, 0.0
        return {}

    def act(self, observation: np.ndarray, info: dict) -> int:
        return int(self.rng.integers(6))

    def observe(self, observation: np.ndarray, action: int, info: dict) -> None:
        pass

    def imagined_frame(self) -> np.ndarray | None:
        return None


class OracleAgent(RandomAgent):
    """Knows the goal position and the layout: steers along the shortest grid path (string-pulled to the farthest
    waypoint in clear sight) and stops within ``stop_radius`` of the goal. The ceiling of the task."""

    name, experts = "oracle", "-"

    def __init__(self, stop_radius: float = 0.35, clearance: float = 0.2):
        self.stop_radius, self.clearance = stop_radius, clearance

    def begin(self, task: ReturnTask, seeds: EpisodeSeeds) -> dict:
        self.goal, self.layout = task.goal_pose[:2].astype(np.float64), task.layout
        self.replanned, self.last_plan_seconds = True, 0.0
        return {}

    def target(self, position: np.ndarray) -> np.ndarray:
        """The farthest point of the path (cell centres, then the goal) in clear sight; else the next one."""
        cells = grid_path(self.layout, position, self.goal)
        waypoints = [np.array([c + 0.5, r + 0.5]) for r, c in cells[1:]] + [self.goal]
        for waypoint in reversed(waypoints):
            if line_of_sight(self.layout, position, waypoint, self.clearance):
                return waypoint
        row, column = cells[0]
        centre = np.array([column + 0.5, row + 0.5])
        return centre if np.linalg.norm(centre - position) > 0.15 else waypoints[0]

    def act(self, observation: np.ndarray, info: dict) -> int:
        pose = np.asarray(info["pose"], np.float64)
        if np.linalg.norm(self.goal - pose[:2]) < self.stop_radius:
            return NOOP
        offset = self.target(pose[:2]) - pose[:2]
        error = float(wrap_angle(math.atan2(offset[1], offset[0]) - pose[2]))
        if abs(error) > 0.6:
            return TURN_LEFT if error > 0 else TURN_RIGHT
        if abs(error) > 0.15:
            return FORWARD_LEFT if error > 0 else FORWARD_RIGHT
        return FORWARD


class WorldModelReturnAgent:
    """The CEM MPC agent (``agents.mpc.MPCAgent``, LPIPS to the goal image) on a world model that lived through the
    exploration: observe every exploration frame, memorize once (``memorize_steps``; no-op without the LTM), plan.

    Also imagines the chosen plan once more at batch 1 per decision (``rollout_gif`` stream): the imagined frame of
    every executed step, for the GIF and ``lpips_imagined_real``.
    """

    def __init__(self, name: str, world_model, horizon: int = 4, replan_every: int = 2, population: int = 24,
                 elites: int = 4, iterations: int = 1, memorize_steps: int = 25, objective: str = "place",
                 lookahead: float = 1.0, places_only: bool = False, turn_weight: float = 0.0,
                 scoring: str = "waypoint"):

        if isinstance(memorize_steps, bool) or int(memorize_steps) < 0:
            raise ValueError(f"memorize_steps must be an integer >= 0, got {memorize_steps!r}")
        self.name, self.world_model, self.memorize_steps = name, world_model, int(memorize_steps)
        composition = getattr(world_model, "composition", None)
        self.experts = "+".join(composition.experts) if composition is not None else world_model.label
        planner = load_planner("cem", replan_every=replan_every, population=population, elites=elites,
                               iterations=iterations)
        if objective not in (*OBJECTIVES, "path"):
            raise ValueError(f"objective must be 'place' (the goal's place looked up in what the world model memorized), "
                             f"'lpips' (to the goal view) or 'path' (along the oracle's reference path back), got "
                             f"{objective!r}")
        self.objective, self.places_only = objective, bool(places_only)
        if self.places_only:
            self.experts += "+places"
        factory = (functools.partial(PlaceObjective, lookahead=lookahead, repeats=1, turn_weight=turn_weight,
                                     scoring=scoring)
                   if objective == "place"
                   else functools.partial(LPIPSGoalObjective, repeats=1))
        self.mpc = MPCAgent(world_model, planner, factory, horizon=horizon, replan_every=replan_every)
        self.knows_place = math.nan
        self.replanned, self.last_plan_seconds = False, 0.0

    def begin(self, task: ReturnTask, seeds: EpisodeSeeds) -> dict:
        wm, spec = self.world_model, self.world_model.action_spec
        torch.manual_seed(seeds.torch_global)  # WorldModel.reset re-draws the LoRA adapters from torch's generator
        wm.reset()
        wm.observe(task.frames[0], None, task.poses[0].astype(np.float32))
        for frame, action, pose in zip(task.frames[1:], task.actions, task.poses[1:]):
            wm.observe(frame, spec.encode(action), pose.astype(np.float32))
        memorize_seconds = 0.0
        composition = getattr(wm, "composition", None)
        if composition is None:  # the simulator: memorize() only keeps where it saw what
            wm.memorize()
        elif self.memorize_steps and "ltm" in composition.experts:
            start = time.perf_counter()
            wm.memorize(steps=self.memorize_steps, generator=torch_generator(seeds.memorize))
            memorize_seconds = time.perf_counter() - start
        if self.places_only:  # the base_places control: a place memory without any long-term memory expert
            wm.record_places()
        if self.objective == "path":  # the memorized way back: exploration poses from here to the goal's place
            self.mpc.objective_factory = functools.partial(PathObjective, path=task.return_reference, lookahead=1.0)
        self.mpc.reset(goal_frame=task.goal_frame, planner_seed=seeds.planner, imagine_seed=seeds.imagine)
        self.knows_place = float(getattr(self.mpc.objective, "knows_place", math.nan))
        self.gif_generator = torch_generator(seeds.rollout_gif)
        self._plan_frames: list[np.ndarray] = []
        return {"memorize_seconds": memorize_seconds}

    def act(self, observation: np.ndarray, info: dict) -> int:
        action = self.mpc.act(observation, info)
        self.replanned, self.last_plan_seconds = self.mpc.replanned, self.mpc.last_plan_seconds
        if self.replanned:
            with torch.no_grad():
                plan = self.world_model.imagine(self.mpc.last_plan.unsqueeze(0), generator=self.gif_generator)[0]
            self._plan_frames = list(tensor_to_frames(plan))
        return action

    def observe(self, observation: np.ndarray, action: int, info: dict) -> None:
        self.world_model.observe(observation, self.world_model.action_spec.encode(action),
                                 np.asarray(info["pose"], np.float32))

    def imagined_frame(self) -> np.ndarray | None:
        """The frame the current plan imagined for the step just executed."""
        return self._plan_frames.pop(0) if self._plan_frames else None


# ------------------------------------------------------------------------------------------------------- episode
def run_episode(env, agent, seeds: EpisodeSeeds, config: ReturnConfig, lpips=None) -> tuple[dict, list[np.ndarray]]:
    """Explore, pick the goal, let ``agent`` act for ``decisions * replan_every`` steps; (episode row, GIF rows)."""

    task, observation, info = explore(env, seeds.env, seeds.policy, config.explore_steps, config.min_goal_distance,
                                      config.max_attempts)
    begun = agent.begin(task, seeds)
    poses, real, imagined, plan_seconds = [task.start_pose], [], [], []
    for _ in range(config.decisions * config.replan_every):
        action = agent.act(observation, info)
        if agent.replanned:
            plan_seconds.append(agent.last_plan_seconds)
        observation, _, _, truncated, info = env.step(action)
        agent.observe(observation, action, info)
        poses.append(np.asarray(info["pose"], np.float64))
        real.append(observation)
        imagined.append(agent.imagined_frame())
        if truncated:
            break
    executed = np.stack(poses)
    distances = np.linalg.norm(executed[:, :2] - task.goal_pose[:2], axis=1)
    ate, rpe = path_errors(executed, task.return_reference)
    reached = distances < config.success_distance
    row = {"agent": agent.name, "experts": agent.experts, "seed": task.seed, "attempt": task.attempt,
           "goal_index": task.goal_index, "start_distance": float(distances[0]),
           "return_cells": len(grid_path(task.layout, task.start_pose, task.goal_pose)) - 1,
           "success": int(distances[-1] < config.success_distance), "final_distance": float(distances[-1]),
           "min_distance": float(distances.min()), "steps": len(real),
           "first_reach_step": int(np.argmax(reached)) if reached.any() else -1, "ate": ate, "rpe": rpe,
           "lpips_to_goal": math.nan, "lpips_imagined_real": math.nan,
           "seconds_per_decision": float(np.mean(plan_seconds)) if plan_seconds else 0.0,
           "decisions": len(plan_seconds),
           "memorize_seconds": float(begun.get("memorize_seconds", 0.0)),
           "knows_place": float(getattr(agent, "knows_place", math.nan))}
    if lpips is not None:
        with torch.no_grad():
            goal = frames_to_model_tensor(task.goal_frame[None])
            row["lpips_to_goal"] = float(lpips(frames_to_model_tensor(real[-1][None]), goal)[0])
            pairs = [(r, i) for r, i in zip(real, imagined) if i is not None]
            if pairs:
                reals, imags = (frames_to_model_tensor(np.stack(x)) for x in zip(*pairs))
                row["lpips_imagined_real"] = float(lpips(imags, reals).mean())
    return row, _gif(task, real, imagined)


def _gif(task: ReturnTask, real: list[np.ndarray], imagined: list[np.ndarray | None]) -> list[np.ndarray]:
    """Three sequences (real, imagined, goal): exploration (imagined black, goal frame outlined red), then planning."""
    blank = np.zeros_like(task.goal_frame)
    explored = [frame.copy() for frame in task.frames]
    outlined = explored[task.goal_index]
    outlined[:2], outlined[-2:], outlined[:, :2], outlined[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    reals = explored + list(real)
    imags = [blank] * len(explored) + [blank if i is None else i for i in imagined]
    return [np.stack(reals), np.stack(imags), np.stack([task.goal_frame] * len(reals))]


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class ReturnConfig(FanoutSettings):
    """The evaluation's settings; every field is a ``key=value`` argument of ``python -m agents.return_to_place``.

    The planner settings are ``agent=cem``'s (``come_rl/conf/agent/cem.yaml``, ``planner/cem.yaml``) and the DDIM
    steps ``model/memory_maze.yaml``'s, so that this task measures the planner the main command runs.
    """

    checkpoint: str = "memory_maze"
    agents: str = ",".join(DEFAULT_AGENTS)
    episodes: int = 20
    seed: int = 9000
    """episode i: env seed seed + i, other streams from come_rl.seeding (9000+: never used for tuning)."""
    explore_steps: int = 60
    """60 steps leave a goal by the rule on the first try in ~78 % of starts (18 tuning seeds); redraws cost a build."""
    min_goal_distance: float = 2.0
    success_distance: float = 1.0
    """one cell width: near enough to see the goal view again by turning, far enough to tell a return from staying."""
    decisions: int = 12
    """x replan_every = 24 env steps: the oracle first gets within 1 cell after 11-16 (8 tuning seeds; 2-3 cells at
    0.25 cells/step, turns at 18 deg/step)."""
    horizon: int = 4
    replan_every: int = 2
    population: int = 24
    elites: int = 4
    iterations: int = 1
    sampler_steps: int = 4
    memorize_steps: int = 25
    objective: str = "place"
    """place: agent=cem's default (planners.objectives.PlaceObjective: the goal's place looked up in the places the
    world model memorized, scored by imagined poses along the memorized way there; LPIPS to the goal view when nothing
    is memorized, as for ``base``); lpips: NWM's LPIPS to the goal view for every agent."""
    lookahead: float = 1.0
    """the place objective's waypoint distance ahead along the memorized route (maze cells), agent=cem's."""
    turn_weight: float = 0.6
    """the place objective's price of the final heading's angle off the waypoint (cells per radian), agent=cem's."""
    scoring: str = "graph"
    """the place objective's scoring (planners.objectives.PathObjective): waypoint (the distance to a waypoint
    ``lookahead`` ahead on the memorized route) or graph (the cost-to-go along the graph of memorized places)."""
    max_attempts: int = 20
    lpips_metric: bool = True
    gifs: bool = True
    out_dir: str = "results/return_to_place"
    precision: str = "auto"
    """auto: the checkpoint's (Memory Maze: bf16 on CUDA and on CPUs with bfloat16 kernels, fp32 elsewhere; results
    made before 2026-12-05 ran in fp32: add precision=fp32 to reproduce them); fp32; bf16. The resolved precision is
    what the run records."""


def checkpoint_experts(checkpoint: str) -> list[str]:
    """Every expert the checkpoint can compose: base + ltm (the LTM is the base's LoRA copy), stm/sltm if trained."""

    directory = resolve_checkpoint(checkpoint)
    if not (directory / "base.safetensors").exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} has no base.safetensors (looked in {directory})")
    return ["base", "ltm"] + [role for role in ("stm", "sltm") if (directory / f"{role}.safetensors").exists()]


def check_config(config: ReturnConfig) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Validate everything before any episode: (agents to run, their experts, notes for the title)."""
    names = [n.strip() for n in config.agents.split(",") if n.strip()]
    unknown = [n for n in names if n not in AGENTS]
    if unknown or not names:
        raise ValueError(f"unknown agents {unknown or names}; choose from {AGENTS}")
    if len(set(names)) != len(names):
        raise ValueError(f"agents {names} name one agent twice")
    for key in ("episodes", "explore_steps", "decisions", "horizon", "replan_every", "population", "elites",
                "iterations", "sampler_steps", "max_attempts", "threads"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if config.replan_every > config.horizon or config.elites > config.population:
        raise ValueError(f"need replan_every <= horizon and elites <= population, got {config.replan_every} > "
                         f"{config.horizon} or {config.elites} > {config.population}")
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0 (env seeds are seed + episode), got {config.seed}")
    if config.memorize_steps < 0:
        raise ValueError(f"memorize_steps must be >= 0, got {config.memorize_steps}")

    check_backend(config.backend, config.workers)
    if not 0 < config.success_distance <= config.min_goal_distance:
        raise ValueError(f"need 0 < success_distance <= min_goal_distance (a goal inside the success radius at the "
                         f"start is no task), got {config.success_distance} and {config.min_goal_distance}")
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}")

    if config.scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS} (graph: the cost-to-go along the graph of memorized "
                         f"places; waypoint: the distance to a waypoint ahead on the memorized route), got "
                         f"{config.scoring!r}")
    if isinstance(config.lookahead, bool) or not float(config.lookahead) > 0:
        raise ValueError(f"lookahead must be a distance > 0 (maze cells), got {config.lookahead!r}")
    experts: dict[str, list[str]] = {"base": ["base"], "base_places": ["base"], "ltm": ["base", "ltm"]}
    notes = []
    if any(n in WORLD_MODEL_AGENTS for n in names):
        experts["come"] = checkpoint_experts(config.checkpoint)
        placed = [n for n in names if n in ("base_places", "ltm", "come")]
        if config.objective == "place" and placed:
            directory = resolve_checkpoint(config.checkpoint)
            if not (directory / f"{ODOMETRY_NAME}.json").exists():
                raise ValueError(f"agents {placed} score by the places they memorized, which needs poses of imagined "
                                 f"frames, but checkpoint {config.checkpoint!r} ({directory}) has no odometry head: "
                                 f"train one (python -m come_rl.odometry data=<collected maze data> out={directory}) "
                                 f"or pass objective=lpips")
        if "come" in names and "ltm" in names and experts["come"] == experts["ltm"]:
            names.remove("come")
            notes.append(f"come = {'+'.join(experts['come'])} on checkpoint {config.checkpoint} (no stm/sltm trained): "
                         "its row is the ltm row")
    return names, experts, notes


def build_agent(name: str, experts: list[str] | None, config: ReturnConfig, env=None):
    if name == "random":
        return RandomAgent()
    if name == "oracle":
        return OracleAgent()
    if name in ("exact", "exact_path"):  # the same planner on the simulator (envs.memory_maze.MazeSimulatorModel)
        from envs.memory_maze import MazeSimulatorModel

        if env is None:
            raise ValueError("the exact-model agent imagines with the env it acts in: pass env=")
        return WorldModelReturnAgent(name, MazeSimulatorModel(env), config.horizon, config.replan_every,
                                     config.population, config.elites, config.iterations, 0,
                                     objective="path" if name == "exact_path" else config.objective,
                                     lookahead=config.lookahead, turn_weight=config.turn_weight,
                                     scoring=config.scoring)

    wm = WorldModel.load(config.checkpoint, experts=experts, sampler={"steps": config.sampler_steps},
                         precision=config.precision)
    return WorldModelReturnAgent(name, wm, config.horizon, config.replan_every, config.population, config.elites,
                                 config.iterations, config.memorize_steps if "ltm" in experts else 0,
                                 objective=config.objective, lookahead=config.lookahead, turn_weight=config.turn_weight,
                                 places_only=name == "base_places", scoring=config.scoring)


# the summary's means over each agent's episodes (NaN-aware)
SUMMARY_MEANS = ("final_distance", "min_distance", "start_distance", "ate", "rpe", "lpips_to_goal",
                 "lpips_imagined_real", "seconds_per_decision", "memorize_seconds", "knows_place")

# settings that change no episode's numbers: a rerun into the same out_dir may change them and still resume
RESUME_FREE_KEYS = ("agents", "episodes", *FANOUT_KEYS, "out_dir", "gifs")


class ReturnWorker:
    """One agent with its Memory Maze env (and LPIPS), built once per process (a Ray actor with backend=ray);
    ``run(episode)`` plays episode ``episode`` (seeds from ``come_rl.seeding.episode_seeds(config.seed, episode)``)."""

    def __init__(self, name: str, experts: list[str] | None, config: ReturnConfig, records: str | None = None):
        self.env = MemoryMazeEnv(maze_size=9)
        self.agent, self.config = build_agent(name, experts, config, self.env), config
        self.records = None if records is None else Path(records)
        self.lpips = None
        if config.lpips_metric:
            from come_rl.metrics.lpips_metric import get_lpips

            self.lpips = get_lpips()

    def run(self, episode: int) -> tuple[dict, list]:
        """One episode, or its record when an earlier run into ``records`` finished it (``come_rl.episode_records``)."""
        def play():
            row, gif = run_episode(self.env, self.agent, episode_seeds(self.config.seed, episode), self.config,
                                   self.lpips)
            return {"episode": episode, **row}, gif

        return recorded_episode(self.records, f"{self.agent.name}_{episode:06d}", play)

    def close(self) -> None:
        self.env.close()


def evaluate(config: ReturnConfig, progress: bool = True) -> list[dict]:
    """Check the config, build every agent (checkpoints load before any episode), run, write; the summary rows."""

    names, experts, notes = check_config(config)
    if any(experts.get(name) for name in names):  # the precision world-model agents run in is recorded
        config = dataclasses.replace(config, precision=precision_for(config.checkpoint, config.precision))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    torch.set_num_threads(config.threads)
    command = "python -m agents.return_to_place " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    title = (f"Memory Maze 9x9, return to a seen place ({config.episodes} episodes per agent, "
             f"env seeds {config.seed}+; "
             f"goal >= {config.min_goal_distance} cells away and out of view after {config.explore_steps} exploration "
             f"steps; success: final position < {config.success_distance} cell from the goal's; "
             f"{config.decisions} decisions x {config.replan_every} steps; CEM {config.population}x{config.horizon}, "
             f"{config.sampler_steps}-step DDIM, {config.memorize_steps} memorization steps"
             + "".join(f"; {note}" for note in notes) + f"): `{command}`")
    out = Path(config.out_dir)
    check_records(out, config, RESUME_FREE_KEYS)
    results = play_agents(ReturnWorker, lambda name: (name, experts.get(name), config, str(out)), names,
                          range(config.episodes), config, desc="return to a seen place", progress=progress)
    return write_results(results, config, out, title)


def write_results(results: dict[str, list[tuple[dict, list]]], config: ReturnConfig, out: Path,
                  title: str) -> list[dict]:
    """{agent name: [(episode row, GIF sequences) per episode]} -> tables, plot, GIFs (``come_rl.evaluation``)."""
    return write_success_results(results, out, title, mean_keys=SUMMARY_MEANS, label_keys=("experts",),
                                 gifs=config.gifs, plot_title="return to a seen place",
                                 extra_panel=functools.partial(_distance_panel, success_distance=config.success_distance))


def summarize(rows: list[dict]) -> dict:
    """One agent's episodes -> success rate with its Wilson 95 % interval and the (NaN-aware) means."""
    return summarize_successes(rows[0]["agent"], rows, SUMMARY_MEANS, ("experts",))


def _distance_panel(ax, summaries: list[dict], success_distance: float) -> None:
    """Mean start vs final distance to the goal per agent, and the success radius."""
    x, labels = np.arange(len(summaries)), [s["agent"] for s in summaries]
    ax.bar(x - 0.2, [s["start_distance"] for s in summaries], 0.4, color="0.7", label="start")
    ax.bar(x + 0.2, [s["final_distance"] for s in summaries], 0.4, color="tab:orange", label="final")
    ax.axhline(success_distance, color="k", ls=":", lw=1, label="success radius")
    ax.set_xticks(x, labels)
    ax.set_ylabel("distance to goal (maze cells)")
    ax.set_ylim(0, 1.3 * max([s["start_distance"] for s in summaries] + [s["final_distance"] for s in summaries]))
    ax.legend(fontsize=8, loc="upper center", ncol=3)


def main(argv: list[str] | None = None) -> None:
    config = run_evaluation_cli(sys.argv[1:] if argv is None else argv, ReturnConfig, evaluate)
    print(f"results written to {config.out_dir}")


if __name__ == "__main__":
    main()
