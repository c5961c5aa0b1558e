"""Objects built from configs with a ``_target_`` (Hydra's convention), and planners by name from conf/planner.

``come_rl.run`` builds its env, world model, agent and planner through :func:`import_target` / :func:`call_target`;
every other command that needs a named planner (the NWM protocol, return to a place, the benchmarks) gets it from
:func:`load_planner`, so a planner's settings are written once, in ``come_rl/conf/planner/<name>.yaml``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("come_rl.targets")

PLANNER_CONF_DIR = Path(__file__).resolve().parent / "conf" / "planner"


def import_target(target: str, what: str) -> Any:
    """The object a dotted ``_target_`` names; a clear error naming the key ``what`` when it cannot be imported."""
    try:
        return hydra.utils.get_object(target)
    except Exception as error:  # ImportError, AttributeError, ... : say which key and how to fix it
        raise ValueError(
            f"{what}._target_={target!r} could not be imported ({type(error).__name__}: {error}); "
            f"give a dotted path to a class or function importable from {Path.cwd()}"
        ) from error


def call_target(target: Callable, settings: dict) -> Any:
    """``target(**settings)`` with nested ``_target_`` values instantiated; errors keep their own type
    and message (Hydra's ``instantiate`` would wrap a ValueError in an InstantiationException)."""
    kwargs = {key: instantiate(value) if isinstance(value, dict) and "_target_" in value else value
              for key, value in settings.items() if key != "_target_"}
    return target(**kwargs)


def build_planner(planner_cfg: DictConfig) -> Any:
    """Instantiate the planner; keys its constructor does not take are dropped with a warning.

    Dropping them is what makes ``planner._target_=my_module.MyPlanner`` work on top of the default
    planner's settings (population, elites, ...), which a custom planner need not accept.
    """
    if "_target_" not in planner_cfg:
        raise ValueError("the planner config has no _target_; pick planner=cem|mppi|random_shooting|nwm or set planner._target_")
    target = import_target(planner_cfg._target_, "planner")
    settings = OmegaConf.to_container(planner_cfg, resolve=True)
    parameters = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        dropped = [key for key in settings if key != "_target_" and key not in parameters]
        if dropped:
            log.warning("planner %s does not take %s; these settings are ignored", planner_cfg._target_, dropped)
        settings = {key: value for key, value in settings.items() if key not in dropped}
    planner = call_target(target, settings)
    if not callable(getattr(planner, "plan", None)) or not callable(getattr(planner, "reset", None)):
        raise TypeError(
            f"planner {planner_cfg._target_} must have plan(objective, action_spec, horizon) -> (horizon, action_dim) "
            "and reset(); see planners.base"
        )
    return planner


def planner_names() -> tuple[str, ...]:
    """The named planners: one per ``come_rl/conf/planner/<name>.yaml``."""
    return tuple(sorted(path.stem for path in PLANNER_CONF_DIR.glob("*.yaml")))


def planner_config(name: str, seed: int = 0, replan_every: int = 1, **overrides: Any) -> DictConfig:
    """conf/planner/<name>.yaml with its ``${run.seed}`` / ``${agent.replan_every}`` set and ``overrides`` applied;
    an override the yaml does not have is refused (a typo would otherwise fall back to a default silently)."""
    path = PLANNER_CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown planner {name!r}; choose from {', '.join(planner_names())} "
                         f"(conf/planner/<name>.yaml)")
    raw = OmegaConf.load(path)
    unknown = sorted(set(overrides) - set(raw) - {"_target_"})
    if unknown:
        raise ValueError(f"planner {name!r} has no setting {unknown}; its settings are {sorted(set(raw) - {'_target_'})} "
                         f"({path.name})")
    context = OmegaConf.create({"run": {"seed": int(seed)}, "agent": {"replan_every": int(replan_every)},
                                "planner": raw})
    config = OmegaConf.create(OmegaConf.to_container(context, resolve=True)["planner"])
    return OmegaConf.merge(config, OmegaConf.create(dict(overrides)))


def load_planner(name: str, seed: int = 0, replan_every: int = 1, **overrides: Any) -> Any:
    """The planner ``name`` as conf/planner/<name>.yaml sets it, with ``overrides`` (e.g. a budget's population)."""
    return build_planner(planner_config(name, seed=seed, replan_every=replan_every, **overrides))
