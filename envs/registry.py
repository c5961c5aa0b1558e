"""One table of the env names the data tools accept: gym id, frame size, collection, online episodes.

``python -m come_rl.collect env=<name>``, ``data=online:<name>`` (training, ``come_rl.evaluate``, the experiments) and
the evaluator's transition kinds all look a name up here, so an env added to this table is collectable, generable
on the fly and scored by kind everywhere at once. The planning runs (``python -m come_rl.run env=<name>``) use the
Hydra configs in ``come_rl/conf/env``; each entry names its config.

    from envs.registry import env_entry
    entry = env_entry("memory_maze")
    env, policy = entry.collector(steps=1000)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from envs.memory_cards import COVER_COLOR
from envs.memory_cards import TOGGLE as toggle


@dataclass(frozen=True)
class EnvEntry:
    """One env the data tools know."""

    name: str
    gym_id: str
    """its id in gymnasium's registry (``import envs``)."""
    module: str
    """the module that defines the env, its ``ACTION_MEANINGS`` and ``collection_env_and_policy``."""
    image_size: int
    """the default frame size (pixels, square)."""
    online: str
    """how ``data=online:<name>`` generates episodes: ``refreshed`` (a pool of short episodes, a few replaced per
    batch: envs that render thousands of frames per second) or ``seeded`` (a fixed pool, episode i from seed
    ``seed + i``, exactly as the collector records it: envs that render slowly)."""
    online_episodes: int
    online_steps: int
    """the online pool's default size: episodes of so many steps."""
    run_config: str
    """``python -m come_rl.run env=<run_config>``."""
    size_key: str = "image_size"
    """the env constructor's frame-size argument (recorded in a data set's manifest)."""
    collect_keys: tuple[str, ...] = ()
    """further ``come_rl.collect`` keys the env takes (recorded in the manifest)."""
    kinds: Callable[[dict, np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    """``kinds(clips, last_action, changed)``: boolean masks of the predicted transition's kind (the evaluator's
    per-kind rows); None: view changed / static."""

    def action_meanings(self) -> tuple[str, ...]:
        return tuple(importlib.import_module(self.module).ACTION_MEANINGS)

    def manifest_env_kwargs(self, image_size: int, **env_kwargs: Any) -> dict[str, Any]:
        """What a data set's manifest records as the env's constructor arguments."""
        return {**{key: env_kwargs[key] for key in self.collect_keys}, self.size_key: image_size}

    def collector(self, steps: int, image_size: int = 0, **env_kwargs: Any):
        """The env and the policy that records its data sets: ``(env, policy)`` with ``policy(info, rng) -> action``
        and ``policy.reset()``. ``image_size`` 0: the entry's default."""
        build = importlib.import_module(self.module).collection_env_and_policy
        kwargs = {key: env_kwargs[key] for key in self.collect_keys if key in env_kwargs}
        return build(steps=steps, image_size=image_size or self.image_size, **kwargs)


def _maze_kinds(clips: dict, last_action: np.ndarray, changed: np.ndarray) -> dict[str, np.ndarray]:
    meanings = ENVS["memory_maze"].action_meanings()
    turns = [meanings.index(name) for name in ("turn_left", "turn_right")]
    moves = [meanings.index(name) for name in ("forward", "forward_left", "forward_right")]
    return {"turn": np.isin(last_action, turns), "move": np.isin(last_action, moves), "view_change": changed}


def _cards_kinds(clips: dict, last_action: np.ndarray, changed: np.ndarray) -> dict[str, np.ndarray]:
    # An uncovered tile loses the grey cover colour: classify toggles by the count of cover-grey pixels.
    grey = np.all(clips["frames"] == COVER_COLOR, axis=-1).sum(axis=(-1, -2))
    return {"move": (last_action != toggle) & changed,
            "uncover": (last_action == toggle) & (grey[:, -1] < grey[:, -2]),
            "cover": (last_action == toggle) & (grey[:, -1] > grey[:, -2])}


ENVS: dict[str, EnvEntry] = {
    "memory_maze": EnvEntry("memory_maze", "come_rl/MemoryMaze9x9-v0", "envs.memory_maze", image_size=64,
                            online="seeded", online_episodes=4, online_steps=1000, run_config="memory_maze",
                            collect_keys=("maze_size",), kinds=_maze_kinds),
    "memory_cards": EnvEntry("memory_cards", "come_rl/MemoryCards-v0", "envs.memory_cards", image_size=48,
                             online="refreshed", online_episodes=1024, online_steps=64, run_config="memory_cards",
                             size_key="size", kinds=_cards_kinds),
}


def env_entry(name: str, need: str = "") -> EnvEntry:
    """The entry of ``name``; ``need`` (``seeded`` / ``refreshed``) also requires that kind of online pool. An unknown
    name raises a ValueError that lists the known ones."""
    entry = ENVS.get(name)
    if entry is None:
        raise ValueError(f"unknown env {name!r}; the data tools know {sorted(ENVS)} (envs/registry.py); for another "
                         "env, record a data set with its own policy and pass its directory")
    if need and entry.online != need:
        raise ValueError(f"env {name!r} has a {entry.online} online pool, not a {need} one")
    return entry


def env_name_of_data(data: str, meta: dict | None = None) -> str:
    """The registered env a data spec holds: from ``online:<env>``, else a collected data set's manifest ("" if
    unknown)."""
    if data.startswith("online:"):
        name = data.split(":", 1)[1]
    else:
        meta = meta or {}
        name = str(meta.get("env", "memory_maze" if meta.get("source") == "memory_maze_offline" else ""))
    return name if name in ENVS else ""
