"""Where training clips come from: a recorded data set on disk, or episodes generated on the fly by a cheap env.

Both give ``sample_clips(batch_size, length, rng) -> dict(frames (B, L, H, W, 3) uint8, actions (B, L-1, A) float32,
poses (B, L, 3) float32 or None)`` with ``frames[:, i+1]`` following ``actions[:, i]``.
"""

from __future__ import annotations

import collections
import queue
import threading

import numpy as np
import torch
from tqdm import tqdm

from come_rl import conventions
from come_rl.collect import record_episode
from come_rl.conventions import frames_to_tensor
from come_rl.data.episodes import EpisodeDataset
from come_rl.interfaces import ActionSpec
from envs.registry import env_entry


class OnlineEpisodePool:
    """A pool of episodes generated with the environment's random policy, refreshed a few episodes at a time.

    For an env that renders ten thousand frames per second (Memory Cards) this beats a recorded data set: every clip
    is real env output and the pool keeps changing, so the model never sees the same episode for long.
    """

    def __init__(self, env_name: str, episodes: int = 1024, steps: int = 64, refresh: int = 2, seed: int = 0):
        entry = env_entry(env_name, need="refreshed")
        self.env, self.policy = entry.collector(10**9)
        self.action_spec: ActionSpec = self.env.action_spec
        self.frame_size = int(self.env.observation_space.shape[0])
        self.env_name, self.steps, self.refresh = env_name, steps, refresh
        self.rng = np.random.default_rng(seed)
        self.frames = np.empty((episodes, steps + 1, self.frame_size, self.frame_size, 3), np.uint8)
        self.actions = np.empty((episodes, steps, self.action_spec.dim), np.float32)
        self.poses = np.empty((episodes, steps + 1, 3), np.float32)
        self.slot_rng_states: list[dict] = [{} for _ in range(episodes)]  # self.rng's state when each slot was filled
        for i in tqdm(range(episodes), desc=f"generating {env_name} episodes", leave=False):
            self._fill(i)
        self._next = 0

    def state_dict(self) -> dict:
        """What the pool's future clips depend on, small enough for a training checkpoint: the generator's state, the
        next slot to refresh and, instead of the frames, the generator's state at each slot's fill (an episode is a
        function of it). A resumed training run that loads it samples the clips an uninterrupted run samples."""
        return {"rng": self.rng.bit_generator.state, "next": self._next, "slot_rng_states": list(self.slot_rng_states)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: regenerate the slots filled since the pool started, then the generator."""
        if len(state["slot_rng_states"]) != len(self.frames):
            raise ValueError(f"the saved pool has {len(state['slot_rng_states'])} episodes, this one "
                             f"{len(self.frames)}; resume with the same online_episodes")
        changed = [i for i, slot in enumerate(state["slot_rng_states"]) if slot != self.slot_rng_states[i]]
        for index in tqdm(changed, desc=f"regenerating {self.env_name} episodes", leave=False):
            self.rng.bit_generator.state = state["slot_rng_states"][index]
            self._fill(index)
        self.rng.bit_generator.state = state["rng"]
        self._next = int(state["next"])

    def _fill(self, index: int) -> None:
        self.slot_rng_states[index] = self.rng.bit_generator.state
        frame, info = self.env.reset(seed=int(self.rng.integers(2**31)))
        self.frames[index, 0], self.poses[index, 0] = frame, info["pose"]
        for t in range(self.steps):
            action = self.policy(info, self.rng)
            frame, _, _, _, info = self.env.step(action)
            self.frames[index, t + 1], self.poses[index, t + 1] = frame, info["pose"]
            self.actions[index, t] = self.action_spec.encode(action)

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        for _ in range(self.refresh):  # keep the pool fresh: replace the oldest episodes
            self._fill(self._next)
            self._next = (self._next + 1) % len(self.frames)
        episode = rng.integers(0, len(self.frames), batch_size)
        start = rng.integers(0, self.steps + 2 - length, batch_size)
        frame_index = start[:, None] + np.arange(length)
        return {
            "frames": self.frames[episode[:, None], frame_index],
            "actions": self.actions[episode[:, None], frame_index[:, :-1]],
            "poses": self.poses[episode[:, None], frame_index],
        }


class SeededEpisodePool:
    """``online:memory_maze``: ``episodes`` episodes of the exploring policy, episode i from seed ``seed + i``, exactly
    as ``python -m come_rl.collect env=memory_maze seed=<seed> steps=<steps>`` records them (same env, policy and
    seeds), generated in memory. Held-out clips of any seed are therefore one command, and equal to the collected
    data set of that seed. The pool is fixed (a Memory Maze frame costs ~45 ms to render), so it has no state to
    checkpoint. ``dataset`` is the :class:`come_rl.data.episodes.EpisodeDataset` of the episodes (full episodes,
    poses included, for the consistency experiment)."""

    def __init__(self, env_name: str, episodes: int | None = None, steps: int | None = None, seed: int = 0):
        entry = env_entry(env_name, need="seeded")
        episodes, steps = episodes or entry.online_episodes, steps or entry.online_steps
        if episodes < 1 or steps < 1:
            raise ValueError(f"online:{env_name} needs episodes >= 1 and steps >= 1, got {episodes} and {steps}")
        env, policy = entry.collector(steps)
        self.action_spec: ActionSpec = env.action_spec
        bar = tqdm(total=episodes * steps, desc=f"generating {env_name} episodes (seeds {seed}..{seed + episodes - 1})",
                   unit="step", leave=False)
        recorded = [record_episode(env, policy, steps, seed + i, i, progress=bar) for i in range(episodes)]
        bar.close()
        env.close()
        self.dataset = EpisodeDataset.from_episodes(recorded, self.action_spec, meta={
            "source": f"online:{env_name}", "seed": seed, "episodes": episodes, "steps": steps})
        self.frame_size = int(self.dataset.frames[0].shape[1])

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        return self.dataset.sample_clips(batch_size, length, rng)


class DatasetSource:
    """A recorded data set (``come_rl.data.EpisodeDataset``) behind the same interface."""

    def __init__(self, path: str):
        self.dataset = EpisodeDataset(path)
        self.action_spec = self.dataset.action_spec
        self.frame_size = int(self.dataset.frames[0].shape[1])

    def sample_clips(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        return self.dataset.sample_clips(batch_size, length, rng)


def open_data_source(spec: str, seed: int = 0, online_episodes: int = 0):
    """``online:<env>`` for generated episodes, otherwise a data set path.

    ``online:memory_cards``: a refreshed pool of ``online_episodes`` (0: 1024) episodes; ``online:memory_maze``: a
    fixed pool of ``online_episodes`` (0: 4) episodes of 1000 steps from seeds ``seed``, ``seed + 1``, ... (see
    :class:`SeededEpisodePool`)."""
    if spec.startswith("online:"):
        env_name = spec.split(":", 1)[1]
        try:
            entry = env_entry(env_name)
        except ValueError as error:
            raise ValueError(f"unknown online data source {spec}: {error}; or collect a data set with "
                             "`python -m come_rl.collect env=<env> ...` and pass its directory") from error
        if entry.online == "seeded":
            return SeededEpisodePool(env_name, episodes=online_episodes or None, seed=seed)
        return OnlineEpisodePool(env_name, episodes=online_episodes or entry.online_episodes, seed=seed)
    return DatasetSource(spec)




def clips_to_tensors(clips: dict, pose_features: bool = False):
    """A clip of L frames -> (frames (B, L-1, 3, H, W), actions (B, L-1, A), poses (B, L-1, 4) or None).

    The first frame is dropped so that every remaining frame has the action that led to it.
    """
    use_poses = pose_features
    frames = frames_to_tensor(clips["frames"][:, 1:])
    actions = torch.from_numpy(np.ascontiguousarray(clips["actions"])).float()
    poses = None
    if use_poses:
        if clips.get("poses") is None:
            raise ValueError("pose features requested but the data set has no poses")
        poses = conventions.pose_features(clips["poses"][:, 1:])
    return frames, actions, poses


class BatchStream:
    """The training batches of one run, in order: clips from ``source``, their tensors and their noise, each batch
    drawn from the run's generators (``rng`` for clips, ``generator`` for noise) after the one before.

    ``workers=0``: a batch is made when asked for. ``workers=1``: a background thread makes up to ``prefetch``
    batches ahead while the current step trains, in pinned memory when ``pin`` (bound for a GPU): the same batches in
    the same order, so the weights do not depend on it (tested). Before a checkpoint reads the generators,
    :meth:`sync` stops the thread and rewinds ``rng``, ``generator`` and the source to the first batch not yet handed
    out (made ahead, not trained on), so that a resumed run trains on what an uninterrupted run does.
    """

    def __init__(self, source, rng: np.random.Generator, generator: torch.Generator, batch_size: int, length: int,
                 pose_features: bool, draw_noise, workers: int = 0, pin: bool = False, prefetch: int = 2):
        if workers not in (0, 1):
            raise ValueError(f"data_workers must be 0 (batches made in the training loop) or 1 (a thread makes them "
                             f"ahead); got {workers}. Batches are drawn in order from one generator, so more threads "
                             "could not make them faster without changing them")
        self.source, self.rng, self.generator = source, rng, generator
        self.batch_size, self.length, self.pose_features, self.draw_noise = batch_size, length, pose_features, draw_noise
        self.workers, self.pin, self.prefetch = workers, pin, max(1, prefetch)
        self._thread = None

    def _snapshot(self) -> dict:
        state = getattr(self.source, "state_dict", None)
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state(),
                "data": state() if callable(state) else None}

    def _restore(self, snapshot: dict) -> None:
        self.rng.bit_generator.state = snapshot["rng"]
        self.generator.set_state(snapshot["generator"])
        if snapshot["data"] is not None:
            self.source.load_state_dict(snapshot["data"])

    def _make(self) -> tuple[tuple, tuple]:
        clips = self.source.sample_clips(self.batch_size, self.length, self.rng)
        batch = clips_to_tensors(clips, pose_features=self.pose_features)
        noise = self.draw_noise(self.batch_size, tuple(batch[0].shape[2:]))
        if "staleness" in clips:  # a retrieving expert's stale clips: the level it is told, no noise added
            if len(noise) > 3:
                raise ValueError("context_noise and retrieval_stale_fraction both use the context level: pick one")
            noise = (*noise, torch.from_numpy(clips["staleness"]), None)
        if self.pin:
            batch, noise = (tuple(None if x is None else x.pin_memory() for x in group) for group in (batch, noise))
        return batch, noise

    def next(self) -> tuple[tuple, tuple]:
        """(frames, actions, poses), (t, eps, drop) of the next global batch."""
        if self.workers == 0:
            return self._make()
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.sync()
            raise item
        with self._lock:
            self._unconsumed.popleft()
        return item

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._unconsumed: collections.deque = collections.deque()  # snapshots before each batch made, not handed out
        self._lock, self._stop = threading.Lock(), threading.Event()

        def work() -> None:
            while not self._stop.is_set():
                with self._lock:
                    self._unconsumed.append(self._snapshot())
                try:
                    item = self._make()
                except BaseException as error:  # handed to the training loop, which raises it
                    item = error
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return

        self._thread = threading.Thread(target=work, name="come_rl-batches", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        """Stop making batches ahead and rewind the generators to the first batch not handed out (a no-op with
        ``workers=0``); the next :meth:`next` starts the thread again."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._unconsumed:
            self._restore(self._unconsumed[0])
        self._unconsumed.clear()
