"""Every random number of a planning run comes from ``run.seed``, through :func:`derive_seed` (this one place).

The random sources of ``python -m come_rl.run`` and the stream that feeds each (:func:`episode_seeds`):

==============  ======================================================================================================
stream          what draws from it
==============  ======================================================================================================
env             ``env.reset(seed=...)``: the maze / card layout and start state. ``run.seed + episode`` (not hashed),
                so the ``seed`` column of ``episodes.csv`` is the env's own seed, usable by hand
policy          the reference (exploring) policy's numpy generator: the recorded path, hence the goal image
planner         the planner's torch generator (candidate action sequences), re-seeded at every episode
imagine         the objective's torch generator: the sampler noise of every candidate the planner imagines
memorize        the memory wrapper's torch generator: memorization clips, noise levels and noise (preload and stream)
rollout_gif     the one extra ``imagine`` per replan drawn for ``rollout.gif``
torch_global    torch's global generator, re-seeded at every episode: what a library draws without a generator
                (peft re-initialises the LoRA adapters' A matrices from it in ``WorldModel.reset``)
==============  ======================================================================================================

Why it matters: torch seeds its global generator from OS entropy in every new process, so whatever drew from it
(memorization and planning imagination did, before) differed between two runs of one command.

Why named streams, derived per episode, and not one generator: a stream's draws must not depend on how much another
stream drew (the GIF's extra imagine, a larger population, one more memorization step), and an episode's draws must not
depend on the episodes before it (an evaluation resumed at episode k redoes episode k alone, with the same numbers).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _name_key(name: str | int) -> int:
    """A stable 64-bit key of a stream name (Python's ``hash`` is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.sha256(str(name).encode()).digest()[:8], "little")


def check_seed(seed: int) -> int:
    """``int(seed)``, or a ValueError naming ``run.seed``: an integer >= 0 (env seeds are ``run.seed + episode``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"run.seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def derive_seed(seed: int, *names: str | int) -> int:
    """The 64-bit seed of the stream ``names`` (e.g. ``"episode", 3, "planner"``) of the run seed ``seed``.

    numpy's SeedSequence mixes the run seed with the names' hashes, so streams of one seed are independent of each
    other and of other seeds' streams, and the value is the same on every machine and Python version.
    """
    seed = check_seed(seed)
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=tuple(_name_key(name) for name in names))
    return int(sequence.generate_state(1, np.uint64)[0])


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed`` (e.g. a field of :class:`EpisodeSeeds`)."""
    return torch.Generator().manual_seed(int(seed))


def accepts_keyword(function: Callable, name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (or ``**kwargs``).

    Seeds reach user-supplied parts (a planner's ``reset(seed=)``, an objective's ``generator=``, a world model's
    ``memorize(generator=)``) only where they accept them; the plain contracts (``reset()``, ``memorize(steps)``)
    stay valid.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@dataclass(frozen=True)
class EpisodeSeeds:
    """The seeds of one episode's random sources; see the module docstring for who draws from each."""

    env: int
    policy: int
    planner: int
    imagine: int
    memorize: int
    rollout_gif: int
    torch_global: int


def episode_seeds(run_seed: int, episode: int) -> EpisodeSeeds:
    """The seeds of episode ``episode`` (0, 1, ...) of a run with ``run.seed = run_seed``."""
    def stream(name: str) -> int:
        return derive_seed(run_seed, "episode", int(episode), name)

    return EpisodeSeeds(env=check_seed(run_seed) + int(episode), policy=stream("policy"), planner=stream("planner"),
                        imagine=stream("imagine"), memorize=stream("memorize"), rollout_gif=stream("rollout_gif"),
                        torch_global=stream("torch_global"))
