"""Objectives: ``objective(actions (batch, horizon, action_dim)) -> scores (batch,)``, higher is better.

An objective is where the world model meets the planner: it imagines the candidates' futures and
scores them. The planner only sees the callable.

* :class:`LPIPSGoalObjective`: -LPIPS (AlexNet) between the last imagined frame and a goal image,
  averaged over ``repeats`` stochastic rollouts (NWM's goal-reaching objective).
* :class:`PixelGoalObjective`: -mean squared pixel error to the goal (cheap; for tests and toy worlds).
* :class:`CallableObjective`: any user callable, with its output checked.

Each objective keeps ``timings`` (seconds spent imagining and scoring, number of calls), so a
benchmark can tell how much of a planning call the world model takes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from come_rl.conventions import frames_to_tensor
from come_rl.interfaces import WorldModelProtocol
from planners.place_graph import PlaceGraph

SCORINGS = ("waypoint", "graph")


def imagine_candidates(world_model, actions: torch.Tensor, generator: torch.Generator | None = None,
                       share_prefixes: bool = False, repeats: int = 1, last_frame: bool = True) -> torch.Tensor:
    """Imagine ``repeats`` rollouts of every candidate in one batch, rows ordered (repeat, candidate).

    ``share_prefixes``: candidates that begin with the same actions share one sample until they part (each distinct
    action prefix imagined once per repeat; ``WorldModel.imagine``'s ``streams``, one stream per repeat), so a
    population that agrees on its first steps costs fewer network rows. A world model without ``shares_prefixes``
    (the exact simulators) imagines every row as before.

    ``last_frame=False``: the caller reads the final poses (``last_poses``) and no frame of the last step; a world
    model with ``skips_last_frame`` then samples no frame there (``WorldModel.imagine``: the same poses and generator
    state, one step's network rows fewer) and returns one frame fewer per row; others imagine it anyway.
    """
    batch = actions.repeat(repeats, 1, 1) if repeats > 1 else actions
    extra = {} if last_frame or not getattr(world_model, "skips_last_frame", False) else {"last_frame": False}
    if share_prefixes and getattr(world_model, "shares_prefixes", False):
        streams = torch.arange(repeats).repeat_interleave(actions.shape[0])
        return world_model.imagine(batch, generator=generator, streams=streams, **extra)
    return world_model.imagine(batch, generator=generator, **extra)


def check_share_prefixes(share_prefixes, name: str = "share_prefixes") -> bool:
    """``share_prefixes`` (of an objective, the find agent or ``env.task``) as a bool; anything else is refused."""
    if not isinstance(share_prefixes, bool):
        raise ValueError(f"{name} must be true or false, got {share_prefixes!r}")
    return share_prefixes


def frame_to_tensor(frame: Any) -> torch.Tensor:
    """An env frame (uint8 (H, W, 3)) or a model frame (float (3, H, W) in [-1, 1]) -> float32 (3, H, W) in [-1, 1]."""
    if isinstance(frame, torch.Tensor) and frame.dtype.is_floating_point:
        tensor = frame.detach().to(torch.float32).cpu()
        if tensor.ndim != 3:
            raise ValueError(f"a float goal frame must have shape (3, H, W), got {tuple(tensor.shape)}")
        if tensor.min() < -1.0 - 1e-4 or tensor.max() > 1.0 + 1e-4:
            raise ValueError("a float goal frame must lie in [-1, 1]; pass a uint8 (H, W, 3) frame or rescale")
        return tensor
    array = np.asarray(frame.cpu() if isinstance(frame, torch.Tensor) else frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"a goal frame must be uint8 (H, W, 3) or float (3, H, W) in [-1, 1], got {array.dtype} {array.shape}"
        )
    return frames_to_tensor(array)


class _GoalObjective:
    """Shared part of the goal objectives: goal validation, repeats, imagining, timings."""

    def __init__(self, world_model: WorldModelProtocol, goal_frame: Any, repeats: int = 1,
                 generator: torch.Generator | None = None, frames: str = "last", share_prefixes: bool = False) -> None:
        self.share_prefixes = check_share_prefixes(share_prefixes)
        if isinstance(repeats, bool) or int(repeats) != repeats or int(repeats) < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if frames not in ("last", "all"):
            raise ValueError(f"frames must be 'last' (NWM: the last imagined frame) or 'all' (mean over the horizon), got {frames!r}")
        self.frames = frames
        frame_shape = getattr(world_model, "frame_shape", None)
        if frame_shape is None:
            raise ValueError(
                f"{type(world_model).__name__} has no frame_shape (C, H, W); a goal objective needs it to check the goal"
            )
        goal = frame_to_tensor(goal_frame)
        if tuple(goal.shape) != tuple(frame_shape):
            raise ValueError(
                f"the goal image has shape (C, H, W) = {tuple(goal.shape)} but the world model imagines frames of "
                f"{tuple(frame_shape)}; resize the goal to {frame_shape[1]}x{frame_shape[2]} or use a matching model"
            )
        self.world_model = world_model
        self.goal = goal
        self.repeats = int(repeats)
        self.generator = generator
        self.timings = {"imagine_s": 0.0, "score_s": 0.0, "calls": 0, "candidates": 0}

    def scored_frames(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, horizon, A) -> frames to score (repeats * B * F, C, H, W), F = 1 ("last") or horizon ("all").

        Rows are ordered (repeat, candidate, frame).
        """
        if actions.ndim != 3:
            raise ValueError(f"actions must have shape (batch, horizon, action_dim), got {tuple(actions.shape)}")
        start = time.perf_counter()
        with torch.no_grad():
            frames = imagine_candidates(self.world_model, actions, self.generator, self.share_prefixes, self.repeats)
        self.timings["imagine_s"] += time.perf_counter() - start
        self.timings["calls"] += 1
        self.timings["candidates"] += int(actions.shape[0]) * self.repeats
        if self.frames == "last":
            return frames[:, -1].to(torch.float32)
        return frames.flatten(0, 1).to(torch.float32)

    def _average_repeats(self, distances: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(repeats * B * F,) distances -> (B,) scores = -mean over repeats (and frames)."""
        return -distances.view(self.repeats, batch_size, -1).mean(dim=(0, 2))


class LPIPSGoalObjective(_GoalObjective):
    """scores = -LPIPS(last imagined frame, goal), averaged over ``repeats`` stochastic rollouts.

    Args:
        world_model: anything with ``frame_shape`` (C, H, W) and ``imagine(actions, generator)``.
        goal_frame: uint8 (H, W, 3) env frame or float (3, H, W) in [-1, 1].
        repeats: rollouts per candidate (one batch of repeats x batch).
        lpips: an LPIPS metric callable on (N, 3, H, W) in [-1, 1] -> (N,); default
            ``come_rl.metrics.lpips_metric.get_lpips()`` (AlexNet, offline weights) on the world model's device
            (the CPU for a world model without one).
        generator: torch generator passed to ``imagine`` (reproducible rollouts).
        frames: ``"last"`` scores the last imagined frame (NWM); ``"all"`` the mean over the horizon,
            which rewards reaching the goal early and staying there (steadier under MPC replanning;
            costs horizon x more LPIPS evaluations).
        share_prefixes: candidates that begin alike share one imagined sample until they part
            (:func:`imagine_candidates`; the repeats stay independent).
    """

    def __init__(self, world_model: WorldModelProtocol, goal_frame: Any, repeats: int = 1,
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, frames: str = "last", share_prefixes: bool = False) -> None:
        super().__init__(world_model, goal_frame, repeats, generator, frames, share_prefixes)
        if lpips is None:
            from come_rl.metrics.lpips_metric import get_lpips

            lpips = get_lpips(device=getattr(world_model, "device", "cpu"))
        self.lpips = lpips
        # the goal's LPIPS features once per goal, not once per candidate (an LPIPSMetric offers it; any other
        # callable is called on pairs)
        self._to_goal = lpips.target(self.goal) if callable(getattr(lpips, "target", None)) else None

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        """actions: (batch, horizon, action_dim) -> scores (batch,) = -mean LPIPS to the goal."""
        last = self.scored_frames(actions)
        start = time.perf_counter()
        with torch.no_grad():
            if self._to_goal is not None:
                distances = self._to_goal(last)
            else:
                distances = self.lpips(last, self.goal.unsqueeze(0).expand_as(last))
        self.timings["score_s"] += time.perf_counter() - start
        return self._average_repeats(torch.as_tensor(distances, dtype=torch.float32).reshape(-1), actions.shape[0])


class PixelGoalObjective(_GoalObjective):
    """scores = -mean squared error between the last imagined frame and the goal (averaged over repeats)."""

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        """actions: (batch, horizon, action_dim) -> scores (batch,)."""
        last = self.scored_frames(actions)
        start = time.perf_counter()
        distances = ((last - self.goal.unsqueeze(0)) ** 2).flatten(1).mean(dim=1)
        self.timings["score_s"] += time.perf_counter() - start
        return self._average_repeats(distances, actions.shape[0])


class PathObjective:
    """Goal scoring that knows places: follow a memorized path to the goal's place, one waypoint at a time.

    ``path`` (N, 3) is a sequence of poses that ends at the goal's place, e.g. the exploration the agent memorized,
    from where it is now back to where it saw the goal view (``agents.return_to_place``'s ``return_reference``). At
    every call the waypoint is the first path pose at least ``lookahead`` maze cells further along the path (by arc
    length; an exploration turns in place for many steps) than the path pose nearest the agent's current position
    (``world_model.current_pose()``), the path's end if none is, and a candidate scores minus the distance of its imagined final
    position to that waypoint (``world_model.last_poses``, filled by ``imagine``), minus ``turn_weight`` times the
    angle (radians) between its imagined final heading and the bearing to the waypoint, minus ``lpips_weight`` times
    the LPIPS of its last imagined frame to the goal view (the last-metre term; 0 switches it off). The turn term
    makes the score a cost-to-go: a short horizon that only turns moves no nearer, so without it every candidate
    facing away from the goal ties with standing still (in Memory Maze a step moves up to ~0.2 cells or turns
    ~0.32 rad, so 0.6 cells per radian prices a turn as the steps it takes). The world model must report imagined
    poses: the simulator does (``envs.memory_maze.MazeSimulatorModel``); a learned model needs a pose head.

    ``scoring="graph"`` replaces the distance to a waypoint by the cost-to-go of
    :class:`planners.place_graph.PlaceGraph`: the path's poses become a graph (consecutive poses joined, and poses
    within 0.3 cells of each other: the walk's loops and folds are cut short), ``goal_index`` (default: the last pose)
    is the goal's node, and a candidate scores minus its imagined final position's distance to the goal along that
    graph, minus the turn term towards the point ``lookahead`` cells along the graph's way from there (weighed down
    within ``lookahead`` of the goal, where the bearing means little). With waypoints a fixed distance ahead of the
    nearest path pose, an agent where the path folds back, or facing a waypoint around a wall's corner, can find every
    candidate scoring worse than standing still; the cost-to-go has no such fixed target.
    """

    def __init__(self, world_model, goal_frame: Any, path, lookahead: float = 1.0, lpips_weight: float = 0.0,
                 generator: torch.Generator | None = None, turn_weight: float = 0.0, scoring: str = "waypoint",
                 goal_index: int = -1, graph: PlaceGraph | None = None, share_prefixes: bool = False) -> None:
        self.share_prefixes = check_share_prefixes(share_prefixes)
        path = np.asarray(path, dtype=np.float64)
        if path.ndim != 2 or path.shape[1] != 3 or len(path) < 1 or not np.isfinite(path).all():
            raise ValueError(f"path must be finite (N >= 1, 3) poses (x, y, yaw), got shape {path.shape}")
        if isinstance(lookahead, bool) or not float(lookahead) > 0:
            raise ValueError(f"lookahead must be a distance > 0 (maze cells), got {lookahead!r}")
        for name in ("current_pose", "imagine"):
            if not callable(getattr(world_model, name, None)):
                raise ValueError(f"PathObjective needs a world model that reports poses ({name}() is missing): the "
                                 "simulator (envs.memory_maze.MazeSimulatorModel) or a model with a pose head")
        if isinstance(turn_weight, bool) or not float(turn_weight) >= 0:
            raise ValueError(f"turn_weight must be >= 0 (maze cells per radian of turning), got {turn_weight!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS} (waypoint: the distance to a waypoint ahead on the path; "
                             f"graph: the cost-to-go along the graph of the path's poses), got {scoring!r}")
        self.world_model, self.path, self.lookahead = world_model, path, float(lookahead)
        self.turn_weight, self.scoring = float(turn_weight), scoring
        # graph: the PlaceGraph of these poses already built (PlaceObjective builds it to find the route)
        self.graph = (graph if graph is not None else PlaceGraph(path, goal_index)) if scoring == "graph" else None
        steps = np.linalg.norm(np.diff(path[:, :2], axis=0), axis=1)
        self.arc = np.concatenate([[0.0], np.cumsum(steps)])  # path length up to each pose
        self.goal = frame_to_tensor(goal_frame)
        self.lpips_weight, self.generator = float(lpips_weight), generator
        self.lpips = None
        if self.lpips_weight:
            from come_rl.metrics.lpips_metric import get_lpips

            self.lpips = get_lpips(device=getattr(world_model, "device", "cpu"))
        self.timings = {"imagine_s": 0.0, "score_s": 0.0, "calls": 0, "candidates": 0}

    def waypoint(self) -> np.ndarray:
        position = np.asarray(self.world_model.current_pose(), np.float64)[:2]
        if self.graph is not None:
            return self.graph.waypoint(position, self.lookahead)
        nearest = int(np.argmin(np.linalg.norm(self.path[:, :2] - position, axis=1)))
        ahead = np.nonzero(self.arc >= self.arc[nearest] + self.lookahead)[0]
        return self.path[ahead[0]] if len(ahead) else self.path[-1]

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        target = self.waypoint() if self.graph is None else None
        with torch.no_grad():
            # without the LPIPS term no frame of the last step is read: only its pose is imagined
            frames = imagine_candidates(self.world_model, actions, self.generator, self.share_prefixes,
                                        last_frame=self.lpips is not None)
        self.timings["imagine_s"] += time.perf_counter() - start
        self.timings["calls"] += 1
        self.timings["candidates"] += int(actions.shape[0])
        poses = getattr(self.world_model, "last_poses", None)
        if poses is None:
            raise ValueError("the world model's imagine() reported no poses (last_poses); PathObjective needs them")
        start = time.perf_counter()
        final = torch.as_tensor(np.asarray(poses), dtype=torch.float64)[:, -1]
        if self.graph is None:
            offset = torch.as_tensor(target[:2]) - final[:, :2]
            scores = -torch.linalg.norm(offset, dim=1)
            turn_share = torch.ones_like(scores)
        else:  # the cost-to-go along walked ways; the turn term towards where that way leads
            costs, nodes = self.graph.assign(final[:, :2].numpy())
            targets = np.stack([self.graph.ahead(n, c, self.lookahead)[:2] for n, c in zip(nodes, costs)])
            offset = torch.as_tensor(targets) - final[:, :2]
            cost = torch.as_tensor(costs)
            scores, turn_share = -cost, torch.clamp(cost / self.lookahead, max=1.0)
        if self.turn_weight:
            bearing = torch.atan2(offset[:, 1], offset[:, 0])
            turn = torch.remainder(bearing - final[:, 2] + math.pi, 2 * math.pi) - math.pi
            scores = scores - self.turn_weight * turn_share * turn.abs()
        if self.lpips is not None:
            with torch.no_grad():
                last = frames[:, -1].to(torch.float32)
                scores = scores - self.lpips_weight * self.lpips(last, self.goal.unsqueeze(0).expand_as(last)).double()
        self.timings["score_s"] += time.perf_counter() - start
        return scores.float()


class PlaceObjective:
    """Goal scoring that asks the world model's memory where the goal is: reach the place the goal view was seen.

    At construction (once per goal) the goal image is looked up among the places the world model has memorized
    (``world_model.places``, ``come_rl.experts.episode_memory.PlaceMemory``: every memorized frame with its pose): the
    memorized frame nearest the goal in pixels, if its mean squared difference is at most ``match_mse`` (a goal view
    the agent has seen), gives the goal's place; the route is the memorized poses between the place nearest the agent
    now and the goal's (in the order seen, or backwards when the goal was seen before it). Candidates are then scored by
    :class:`PathObjective` on that route: minus the distance of their imagined final pose (the world model's
    ``last_poses``: its odometry head, or the simulator's exact poses) to the waypoint ``lookahead`` cells ahead, minus
    ``turn_weight`` times its final heading's angle off the waypoint, minus ``lpips_weight`` times the LPIPS of the last
    imagined frame to the goal view. With ``scoring="graph"`` every memorized place takes part: the route is the
    shortest way along :class:`planners.place_graph.PlaceGraph` (the walk, cut short where a place was seen twice) and
    candidates score by their cost-to-go on it (see :class:`PathObjective`).

    A world model with nothing memorized (no long-term memory: ``model.experts=[base]``; or the goal never seen), or
    one that cannot pose its imagined frames (no pose model), cannot say where the goal is: the objective is then
    :class:`LPIPSGoalObjective` (``repeats``, ``frames``), NWM's scoring by the goal view alone, ``knows_place`` is
    False and ``reason`` says why.
    """

    def __init__(self, world_model, goal_frame: Any, lookahead: float = 1.0, lpips_weight: float = 0.0,
                 match_mse: float = 1e-3, repeats: int = 1, frames: str = "last",
                 generator: torch.Generator | None = None, lpips: Callable | None = None,
                 turn_weight: float = 0.0, scoring: str = "waypoint", share_prefixes: bool = False) -> None:
        self.share_prefixes = check_share_prefixes(share_prefixes)
        if not float(match_mse) >= 0:
            raise ValueError(f"match_mse must be >= 0 (mean squared difference in [-1, 1] pixels), got {match_mse!r}")
        goal = frame_to_tensor(goal_frame)
        places = getattr(world_model, "places", None)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.goal_index, self.goal_match_mse, self.route, self.graph = None, math.nan, None, None
        if places is not None and len(places) > 0:
            memorized = places.frames.to(torch.float32)
            if tuple(memorized.shape[1:]) != tuple(goal.shape):
                raise ValueError(f"the goal image has shape {tuple(goal.shape)}, the memorized frames "
                                 f"{tuple(memorized.shape[1:])}; give a goal of the world model's frame size")
            errors = ((memorized - goal[None]) ** 2).flatten(1).mean(dim=1)
            index = int(torch.argmin(errors))
            self.goal_match_mse = float(errors[index])
            if self.goal_match_mse <= float(match_mse):
                self.goal_index = index
                poses = places.poses
                here = np.asarray(world_model.current_pose(), np.float64)[:2]
                if scoring == "graph":  # every memorized place, joined where walked or seen twice
                    self.graph = PlaceGraph(poses, index)
                    self.route = self.graph.route(here)
                else:
                    start = int(np.argmin(np.linalg.norm(poses[:, :2] - here, axis=1)))
                    self.route = poses[start:index + 1] if start <= index else poses[index:start + 1][::-1].copy()
        # the simulator reports its imagined poses itself; a WorldModel needs a pose model (its odometry head)
        reports_poses = getattr(world_model, "pose_model", True) is not None
        self.knows_place = self.route is not None and reports_poses
        self.reason = ("the goal's place is in memory" if self.knows_place
                       else "nothing memorized" if places is None or len(places) == 0
                       else f"the goal view is not among the memorized frames (nearest: mean squared difference "
                            f"{self.goal_match_mse:.4g} > match_mse {match_mse:g})" if self.route is None
                       else "the world model has no pose model for imagined frames (train an odometry head: "
                            "python -m come_rl.odometry)")
        if self.knows_place:
            path, goal_index = (places.poses, self.goal_index) if scoring == "graph" else (self.route, -1)
            self.inner = PathObjective(world_model, goal, path, lookahead=lookahead, lpips_weight=lpips_weight,
                                       generator=generator, turn_weight=turn_weight, scoring=scoring,
                                       goal_index=goal_index, graph=self.graph, share_prefixes=share_prefixes)
        else:
            self.inner = LPIPSGoalObjective(world_model, goal, repeats=repeats, lpips=lpips, generator=generator,
                                            frames=frames, share_prefixes=share_prefixes)
        self.timings = self.inner.timings

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        return self.inner(actions)


class CallableObjective:
    """Wrap any ``fn(actions (batch, horizon, action_dim)) -> scores (batch,)`` (numpy or torch).

    The output is checked (one finite-or-NaN float per candidate) and returned as a float32 tensor.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableObjective needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.timings = {"imagine_s": 0.0, "score_s": 0.0, "calls": 0, "candidates": 0}

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        scores = self.fn(actions)
        self.timings["score_s"] += time.perf_counter() - start
        self.timings["calls"] += 1
        self.timings["candidates"] += int(actions.shape[0])
        scores = torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores),
                                 dtype=torch.float32)
        if scores.shape != (actions.shape[0],):
            raise ValueError(
                f"the objective {getattr(self.fn, '__name__', self.fn)!r} returned shape {tuple(scores.shape)}; "
                f"it must return one score per candidate, shape ({actions.shape[0]},)"
            )
        return scores
