"""Fan evaluation episodes out: in this process (the default) or over Ray actors (a machine or a cluster).

    rows = run_tasks(FindWorker, (agent_name, config), seeds, backend="ray", workers=4)

A *worker* is a class built once per process from picklable arguments (it loads its world model once) with a
``run(task)`` method; ``run_tasks`` returns ``[worker.run(task) for task in tasks]`` in task order whatever the
backend, so the tables written from it are the same for the same seeds. ``backend="ray"`` starts ``workers`` Ray
actors (one CPU each, ``threads`` torch threads each, a GPU each with ``gpus_per_worker``) and hands tasks to whichever
is free; ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` when it is set, else starts a local one. Each result
must not depend on which worker ran it or on what ran before on that worker: episodes seed everything they draw.

A worker that dies (its process killed, out of memory, its node gone) is restarted by Ray (it builds its world model
again) and the task it was running is played again from the start, up to ``retries`` times per worker; since an
episode seeds everything it draws, the replay gives the row the first attempt would have. Past that, the run stops
with :class:`WorkerDied`, which names the task; what finished before is kept by the caller (per-episode records), so
the same command resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tqdm import tqdm

BACKENDS = ("local", "ray")
RETRIES = 3
"""restarts of a dead Ray worker, and replays of the task it was running (``retries`` of run_tasks / iter_tasks)."""


class WorkerDied(RuntimeError):
    """A Ray worker died more often than ``retries`` allows while it ran a task."""


@dataclass
class FanoutSettings:
    """Where an evaluation's episodes run: the fields its ``key=value`` config shares with every other evaluation
    (``agents.find_object``, ``agents.return_to_place``, ``come_rl.experiments.recall`` derive their configs from it)."""

    threads: int = 2
    """torch threads (per Ray worker with backend=ray)."""
    backend: str = "local"
    """local (this process) | ray (episodes fanned out over Ray actors; RAY_ADDRESS names a cluster)."""
    workers: int = 2
    """Ray actors with backend=ray (each builds its env and world model once)."""


FANOUT_KEYS = tuple(field.name for field in fields(FanoutSettings))
"""settings that change where episodes run, not their numbers (a rerun may change them and still resume)."""


def check_backend(backend: str, workers: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")


class _ThreadedWorker:
    """Runs inside a Ray actor: sets torch's thread count, then builds the user's worker."""

    def __init__(self, factory: Callable[..., Any], args: tuple, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.worker = factory(*args)

    def run(self, task: Any) -> Any:
        return self.worker.run(task)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when a ``host:port`` (or ``ray://host:port``) Ray address does not answer: ``ray.init`` would retry
    for minutes. ``auto``/``local`` are left to Ray."""
    import socket

    target = address.strip()
    if target in ("auto", "local", ""):
        return
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RAY_ADDRESS={address!r} is not host:port or ray://host:port (or auto); fix it, or unset "
                         "RAY_ADDRESS to start Ray on this machine")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"the Ray cluster at RAY_ADDRESS={address!r} cannot be reached ({error}); start it "
                              "(ray start --head) or unset RAY_ADDRESS to start Ray on this machine") from error


def init_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` once: the cluster at ``RAY_ADDRESS`` if set, else a local one (``num_cpus`` CPUs)."""
    try:
        import ray
    except ImportError as error:  # pragma: no cover - ray is a dependency
        raise ImportError("backend=ray needs the ray package: pip install ray") from error
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def run_tasks(factory: Callable[..., Any], args: tuple, tasks: Sequence[Any], backend: str = "local",
              workers: int = 1, threads: int = 1, gpus_per_worker: float = 0.0, desc: str | None = None,
              progress: bool = True, retries: int = RETRIES) -> list[Any]:
    """``[factory(*args).run(task) for task in tasks]``, in order, locally or on ``workers`` Ray actors."""
    return list(iter_tasks(factory, args, tasks, backend=backend, workers=workers, threads=threads,
                           gpus_per_worker=gpus_per_worker, desc=desc, progress=progress, retries=retries))


def iter_tasks(factory: Callable[..., Any], args: tuple, tasks: Sequence[Any], backend: str = "local",
               workers: int = 1, threads: int = 1, gpus_per_worker: float = 0.0, desc: str | None = None,
               progress: bool = True, retries: int = RETRIES) -> Iterator[Any]:
    """:func:`run_tasks` as a generator: each result is yielded, in task order, as soon as it and those before it are
    done, so a caller records finished episodes while later ones still run (a kill loses only unfinished ones).
    The Ray actors live until the generator is exhausted or closed; a dead one is restarted and its task replayed up
    to ``retries`` times (module docstring), then :class:`WorkerDied`."""
    check_backend(backend, workers)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0 (restarts of a dead Ray worker), got {retries!r}")
    tasks = list(tasks)
    if not tasks:  # nothing to play (a resumed run that had finished): start no worker
        return
    if backend == "local":
        worker = factory(*args)
        for task in tqdm(tasks, desc=desc, disable=not progress):
            yield worker.run(task)
        return
    import ray
    from ray.util import ActorPool

    init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else max(workers, 1))
    # a dead actor is restarted (its __init__ runs again) and the call it was serving is resent, `retries` times
    actor_class = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=retries,
                             max_task_retries=retries)(_ThreadedWorker)
    actors = [actor_class.remote(factory, args, threads) for _ in range(min(workers, max(len(tasks), 1)))]
    try:
        pool = ActorPool(actors)
        results = pool.map(lambda actor, task: actor.run.remote(task), tasks)  # in task order
        done = 0
        try:
            for result in tqdm(results, total=len(tasks), desc=f"{desc} (ray x{len(actors)})" if desc else None,
                               disable=not progress):
                yield result
                done += 1
        except ray.exceptions.RayActorError as error:
            raise WorkerDied(
                f"a Ray worker died more than retries={retries} times while running task {tasks[done]!r} "
                f"({type(error).__name__}); the {done} task(s) before it finished. Rerun the same command to resume "
                f"(finished episodes are recorded), with fewer workers or more memory per worker if workers are being "
                f"killed for memory") from error
    finally:
        for actor in actors:
            ray.kill(actor)
