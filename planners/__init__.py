"""Planners of come_rl: random shooting, CEM, MPPI and the NWM planner, plus goal objectives.

A planner implements ``plan(objective, action_spec, horizon) -> (horizon, action_dim)`` and
``reset()`` (see ``planners.base``); it never imports the world model.
"""

from planners.base import ActionSpec, Objective, Planner, SamplingPlanner, score_candidates
from planners.cem import CEMPlanner
from planners.mppi import MPPIPlanner
from planners.nwm import NWMPlanner
from planners.objectives import CallableObjective, LPIPSGoalObjective, PathObjective, PixelGoalObjective, PlaceObjective
from planners.random_shooting import RandomShootingPlanner

__all__ = [
    "ActionSpec",
    "CEMPlanner",
    "CallableObjective",
    "LPIPSGoalObjective",
    "MPPIPlanner",
    "NWMPlanner",
    "Objective",
    "PathObjective",
    "PixelGoalObjective",
    "PlaceObjective",
    "Planner",
    "RandomShootingPlanner",
    "SamplingPlanner",
    "score_candidates",
]
