"""Record random-policy episodes into compressed, checksummed, resumable shards.

Usage (plain ``key=value`` arguments, no Hydra, so it runs anywhere the package imports)::

    OMP_NUM_THREADS=1 python -m come_rl.collect env=memory_maze episodes=40 steps=500 \\
        out=/data/memory_maze_train seed=0 workers=1

Keys:
    env                 ``memory_maze`` or ``memory_cards`` (required).
    episodes            number of episodes N (required).
    steps               actions per episode T (episodes have T + 1 frames; shorter only if the
                        env's own time limit is shorter: 1000 steps for Memory Maze 9x9).
    out                 output directory (required); created if needed.
    seed                base seed S (default 0): episode i is reset with seed S + i and its policy
                        uses ``np.random.default_rng(S + i)``, so every episode is reproducible on its
                        own, whatever the sharding or the number of workers.
    workers             processes (default 1; spawn start method).
    episodes_per_shard  K (default 4): one ``shard_<first>-<end>.npz`` per K episodes.
    maze_size           Memory Maze only: 9 (default), 11, 13 or 15.
    image_size          frame size: 64 for Memory Maze, 48 for Memory Cards by default.

Resuming: run the same command again. A shard counts as done iff the manifest lists it and its
file matches the recorded size and SHA-256; every other shard of the plan is (re)collected and
stray temporary files are removed, so a killed run leaves no corrupt or duplicated shard. Raising
``episodes`` extends a data set; changing anything else in an existing ``out`` is refused.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from come_rl.cli_args import HELP_FLAGS, help_text, parse_dataclass
from come_rl.data.episodes import (
    MANIFEST_NAME,
    Episode,
    read_manifest,
    save_episode_shard,
    shard_file_name,
    verify_shard,
    write_manifest,
)
from envs.registry import ENVS, env_entry

ENV_NAMES = tuple(ENVS)
# Parameters that define the content of a data set; a resumed run must agree on all of them.
_IDENTITY_KEYS = ("env", "steps", "seed", "episodes_per_shard", "maze_size", "image_size")


@dataclass
class CollectConfig:
    """``python -m come_rl.collect key=value ...`` (the toolkit's one ``key=value`` parser)."""

    env: str = ""
    """a name of envs.registry (memory_maze, memory_cards); required."""
    out: str = ""
    """the data set directory (rerunning with the same out resumes); required."""
    episodes: int = 0
    """required."""
    steps: int = 0
    """env steps per episode; required."""
    seed: int = 0
    workers: int = 1
    episodes_per_shard: int = 4
    maze_size: int = 9
    image_size: int = 0
    """0: the env's default (envs.registry: 64 for Memory Maze, 48 for Memory Cards)."""

    def __post_init__(self) -> None:
        for required in ("env", "episodes", "steps", "out"):
            if not getattr(self, required):
                raise ValueError(f"missing {required}=...; {USAGE}")
        if self.env not in ENV_NAMES:
            raise ValueError(f"env must be one of {ENV_NAMES}, got {self.env!r}")
        for key in ("episodes", "steps", "workers", "episodes_per_shard"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


USAGE = ("usage: python -m come_rl.collect env=memory_maze episodes=N steps=T out=DIR "
         "[seed=S workers=W episodes_per_shard=K]")


def parse_arguments(argv: list[str]) -> dict[str, Any]:
    """``["env=memory_maze", "episodes=4", ...]`` -> the validated config dict :func:`collect` takes."""
    config = dataclasses.asdict(parse_dataclass(argv, CollectConfig))
    entry = env_entry(config["env"])
    config["image_size"] = config["image_size"] or entry.image_size
    if "maze_size" not in entry.collect_keys:
        config["maze_size"] = 0  # not used; fixed so that it never makes two runs look different
    return config


# --------------------------------------------------------------------------------------- env + policy
def make_env_and_policy(config: dict[str, Any]):
    """The env of ``config`` and a ``policy(info, rng) -> action`` callable with a ``reset()`` (envs.registry)."""
    entry = env_entry(config["env"])
    return entry.collector(config["steps"], config["image_size"],
                           **{key: config[key] for key in entry.collect_keys if key in config})


def record_episode(env, policy, steps: int, seed: int, index: int, progress=None) -> Episode:
    """Run ``policy`` for up to ``steps`` actions from ``env.reset(seed=seed)``."""
    rng = np.random.default_rng(seed)
    policy.reset()
    frame, info = env.reset(seed=seed)
    frames, poses, actions, rewards = [frame], [info.get("pose")], [], []
    for _ in range(steps):
        action = policy(info, rng)
        frame, reward, terminated, truncated, info = env.step(action)
        frames.append(frame)
        poses.append(info.get("pose"))
        actions.append(env.action_spec.encode(action))
        rewards.append(reward)
        if progress is not None:
            progress.update(1)
        if terminated or truncated:
            break
    has_poses = all(pose is not None for pose in poses)
    return Episode(np.stack(frames).astype(np.uint8), np.stack(actions).astype(np.float32),
                   np.asarray(rewards, dtype=np.float32),
                   np.stack(poses).astype(np.float32) if has_poses else None, seed, index)


_worker_env: dict[str, Any] = {}


def collect_shard(config: dict[str, Any], first: int, end: int, show_steps: bool = False) -> dict[str, Any]:
    """Record episodes [first, end) and write their shard; returns the manifest record.

    The env is built once per process and reused for every shard that process collects.
    """
    key = repr(sorted((k, config[k]) for k in _IDENTITY_KEYS))
    if _worker_env.get("key") != key:
        _worker_env.update(key=key, pair=make_env_and_policy(config))
    env, policy = _worker_env["pair"]
    progress = tqdm(total=(end - first) * config["steps"], desc=f"episodes {first}-{end - 1}", unit="step",
                    leave=False, disable=not show_steps)
    episodes = [record_episode(env, policy, config["steps"], config["seed"] + index, index, progress)
                for index in range(first, end)]
    progress.close()
    return save_episode_shard(Path(config["out"]) / shard_file_name(first, end), episodes)


def _collect_shard_job(job: tuple[dict[str, Any], int, int]) -> dict[str, Any]:
    config, first, end = job
    return collect_shard(config, first, end)


# --------------------------------------------------------------------------------------- driver
def plan_shards(episodes: int, episodes_per_shard: int) -> list[tuple[int, int]]:
    """Episode ranges [first, end) of all shards of a data set of ``episodes`` episodes."""
    return [(first, min(first + episodes_per_shard, episodes)) for first in range(0, episodes, episodes_per_shard)]


def collect(config: dict[str, Any]) -> dict[str, Any]:
    """Collect (or resume) the data set described by ``config``; returns the final manifest."""
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    identity = {key: config[key] for key in _IDENTITY_KEYS}
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        previous = manifest.get("identity", {})
        if previous != identity:
            raise ValueError(f"{out} holds a data set made with {previous}, this run asks for {identity}; use another "
                             "out=DIR, or the same arguments to resume it")
        if config["episodes"] < manifest.get("total_episodes", 0):
            raise ValueError(f"{out} already plans {manifest['total_episodes']} episodes; pass episodes>= that to "
                             "resume or extend it")
    else:
        manifest = {"identity": identity, "shards": []}
    # A killed atomic write leaves only a hidden temp file (of a shard or of the manifest): remove those.
    for stray in (*out.glob(".shard_*.tmp"), *out.glob(f".{MANIFEST_NAME}.*.tmp")):
        stray.unlink()

    plan = plan_shards(config["episodes"], config["episodes_per_shard"])
    planned_names = {shard_file_name(first, end) for first, end in plan}
    good_records = []
    for record in manifest["shards"]:
        if record["file"] in planned_names and verify_shard(out, record) is None:
            good_records.append(record)
        else:
            print(f"[collect] will recollect {record['file']}: "
                  f"{verify_shard(out, record) or 'not part of the plan'}", file=sys.stderr)
    done = {record["file"] for record in good_records}
    todo = [(first, end) for first, end in plan if shard_file_name(first, end) not in done]

    action_spec = _describe_action_spec(config)
    manifest.update(
        identity=identity,
        env=config["env"],
        env_kwargs=env_entry(config["env"]).manifest_env_kwargs(config["image_size"], maze_size=config["maze_size"]),
        total_episodes=config["episodes"],
        steps_per_episode=config["steps"],
        episodes_per_shard=config["episodes_per_shard"],
        base_seed=config["seed"],
        episode_seeds=[config["seed"] + index for index in range(config["episodes"])],
        frame_shape=[config["image_size"], config["image_size"], 3],
        action_spec=action_spec,
        has_poses=True,
        command="python -m come_rl.collect " + " ".join(
            shlex.quote(f"{key}={config[key]}") for key in ("env", "episodes", "steps", "out", "seed",
                                                              "episodes_per_shard", "maze_size", "image_size")),
        shards=good_records,
        complete=not todo,
    )
    write_manifest(out, manifest)
    if not todo:
        print(f"[collect] {out}: all {len(plan)} shards present and verified", file=sys.stderr)
        return manifest

    started = time.time()
    progress = tqdm(total=sum(end - first for first, end in todo), desc="episodes", unit="ep")

    def finish(record: dict[str, Any]) -> None:
        manifest["shards"].append(record)
        manifest["complete"] = len(manifest["shards"]) == len(plan)
        write_manifest(out, manifest)  # after every shard, so a kill loses at most the shards in flight
        progress.update(record["episodes"][1] - record["episodes"][0])

    workers = min(config["workers"], len(todo))
    if workers == 1:
        for first, end in todo:
            finish(collect_shard(config, first, end, show_steps=True))
    else:
        # spawn: MuJoCo/EGL contexts must not be inherited through fork.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for record in pool.imap_unordered(_collect_shard_job, [(config, first, end) for first, end in todo]):
                finish(record)
    progress.close()
    elapsed = time.time() - started
    steps = sum(record["steps"] for record in manifest["shards"] if record["file"] in
                {shard_file_name(first, end) for first, end in todo})
    manifest["last_run"] = {"seconds": round(elapsed, 1), "steps": steps, "steps_per_second": round(steps / elapsed, 2),
                            "workers": workers}
    write_manifest(out, manifest)
    print(f"[collect] {out}: {steps} steps in {elapsed:.1f} s ({steps / elapsed:.1f} steps/s, {workers} workers)",
          file=sys.stderr)
    return manifest


def _describe_action_spec(config: dict[str, Any]) -> dict[str, Any]:
    meanings = env_entry(config["env"]).action_meanings()
    return {"kind": "discrete", "dim": len(meanings), "meanings": list(meanings)}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    argv = sys.argv[1:] if argv is None else argv
    if any(argument in HELP_FLAGS for argument in argv):
        print(help_text(CollectConfig, USAGE))
        return 0
    try:
        config = parse_arguments(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    collect(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
