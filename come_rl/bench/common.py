"""What several benchmarks share: the world model of the default planning run at its first decisions, a filled
Memory Cards world model, the checkpoint's trained experts, and the process's resident memory."""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import numpy as np

from come_rl.checkpoint import load_expert
from come_rl.experts.expert import DiffusionExpert
from come_rl.world_model import WorldModel
from envs.memory_cards import MemoryCardsEnv, cursor_pose_model
from envs.memory_maze import MemoryMazeEnv


def default_decision_model(directory: Path, steps: int, walk: int = 16) -> tuple[WorldModel, np.ndarray]:
    """The world model of the default planning run at its first decisions: Memory Maze base + LTM on the CPU (fp32),
    after observing a seeded ``walk``-step random walk and one short memorization (adapters in place). Returns it and
    the walk's first frame (a goal ``walk`` steps back, as the run's goal-reaching tasks use)."""
    model = WorldModel.load(directory, experts=["base", "ltm"], sampler={"steps": steps}, device="cpu", precision="fp32")
    env = MemoryMazeEnv(maze_size=9, image_size=model.frame_shape[-1])
    frame, info = env.reset(seed=0)
    goal = frame
    model.reset()
    model.observe(frame, None, info.get("pose"))
    rng = np.random.default_rng(0)
    for _ in range(walk):
        action = int(rng.integers(env.action_space.n))
        frame, *_, info = env.step(action)
        model.observe(frame, model.action_spec.encode(action), info.get("pose"))
    env.close()
    model.memorize(steps=2)  # adapters in place, as in the default run after its first memorization
    return model, goal


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc; elsewhere its peak)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def checkpoint_expert(checkpoint: str, role: str) -> DiffusionExpert | None:
    directory = Path(checkpoint)
    if not (directory / f"{role}.safetensors").is_file():
        return None
    return load_expert(directory, role)[0]


def filled_cards_model(checkpoint: str, steps: int, experts: list[str], stm=None, sltm=None, device: str = "cpu",
                       precision: str = "auto", compile: bool = False) -> WorldModel:
    """A Memory Cards world model of ``experts`` composed by the checkpoint's own rule (alphas, gates, pairwise: its
    cost is the shipped one) that has observed a seeded 40-step random walk: what imagine and memorize run on."""
    wm = WorldModel.load(checkpoint, experts=["base"], sampler={"steps": steps}, device=device)
    env = MemoryCardsEnv(size=wm.frame_shape[-1])  # checked before the composed model is built
    if wm.action_spec.dim != env.action_spec.dim:
        raise ValueError(f"the world-model benchmark feeds Memory Cards episodes, but {checkpoint} takes "
                         f"{wm.action_spec.dim} actions (Memory Cards has {env.action_spec.dim}): pass a Memory "
                         "Cards checkpoint, e.g. checkpoint=come_rl/checkpoints/memory_cards")
    # the checkpoint's own composition rule (alphas, gates, pairwise) with the asked experts: its cost is the shipped one
    model = WorldModel(wm.base, wm.action_spec, wm.frame_shape[-1], stm=stm, sltm=sltm,
                       composition=dataclasses.replace(wm.composition, experts=experts), sampler=wm.sampler,
                       memorize_config=wm.memorize_config, pose_model=cursor_pose_model, device=wm.device,
                       precision=precision, compile=compile)
    frame, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    model.reset()
    model.observe(frame, None, info["pose"])
    for _ in range(40):
        action = env.random_policy_action(rng)
        frame, *_, info = env.step(action)
        model.observe(frame, env.action_spec.encode(action), info["pose"])
    return model
