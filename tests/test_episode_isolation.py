"""Episode isolation: nothing of one episode streamed through the memory wrapper reaches the next.

The shipped Memory Cards world model (full fine-tuning of a copy of the base: the LTM's every weight moves) streams
episode 1 with memorization on schedule; after ``reset`` for episode 2 its state (LTM weights, optimizer, memorized step
count, context frames, actions, poses) and its imagination must equal a freshly loaded model's bit for bit, and so must
episode 2's own memorization (a leftover AdamW state or step count would change it).
"""

from __future__ import annotations

import numpy as np
import torch

from envs.memory_cards import MemoryCardsEnv
from envs.memory_wrapper import WorldModelMemoryWrapper

import peft  # noqa: F401  (a hard dependency: a broken install fails here, never skips)

MEMORIZE_EVERY, MEMORIZE_STEPS, EPISODE_STEPS = 4, 2, 8


def build():
    from come_rl.world_model import WorldModel

    model = WorldModel.load("memory_cards", memorize={"batch_size": 2}, sampler={"steps": 2})
    return WorldModelMemoryWrapper(MemoryCardsEnv(), model, memorize_every=MEMORIZE_EVERY,
                                   memorize_steps=MEMORIZE_STEPS), model


def stream(wrapped: WorldModelMemoryWrapper, seed: int) -> list[dict]:
    """One episode of the paper's random policy: reset, then EPISODE_STEPS steps (memorizing every MEMORIZE_EVERY)."""
    wrapped.set_memorize_seed(1000 + seed)
    wrapped.reset(seed=seed)
    rng = np.random.default_rng(seed)
    return [wrapped.step(wrapped.env.unwrapped.random_policy_action(rng))[-1] for _ in range(EPISODE_STEPS)]


def ltm_state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.ltm.state_dict().items()}


def imagine(model) -> torch.Tensor:
    actions = torch.eye(5)[torch.tensor([[0, 4, 2], [3, 4, 1]])]  # (2, 3, 5): moves and toggles
    return model.imagine(actions, seed=0)


def test_nothing_of_the_first_episode_reaches_the_second() -> None:
    wrapped, model = build()
    fresh_wrapped, fresh = build()
    initial = ltm_state(fresh)

    infos = stream(wrapped, seed=3)
    memorized = [info for info in infos if info["memory/memorized"]]
    assert len(memorized) == EPISODE_STEPS // MEMORIZE_EVERY
    # episode 1 left every kind of trace that reset must remove (else the checks below could not see a leak)
    assert model.ltm.memorized_steps == MEMORIZE_STEPS * len(memorized) and model.ltm._optimizer is not None
    assert len(model.memory) == EPISODE_STEPS + 1 and model.memory.poses is not None
    moved = ltm_state(model)
    assert any(not torch.equal(moved[name], initial[name]) for name in initial), "memorization moved the LTM"

    # control: a new segment keeps the LTM (explore, then return), and imagination shows it
    wrapped.reset(seed=5, keep_memory=True)
    fresh_wrapped.set_memorize_seed(1005)
    fresh_wrapped.reset(seed=5)
    assert not torch.equal(imagine(model), imagine(fresh)), "the comparison must see what the LTM memorized"

    wrapped.reset(seed=5)
    assert model.ltm.memorized_steps == 0 and model.ltm._optimizer is None
    after = ltm_state(model)
    assert after.keys() == initial.keys()
    assert all(torch.equal(after[name], initial[name]) for name in initial), "reset restores every LTM weight bit-exactly"
    assert len(model.memory) == 1 == len(fresh.memory)
    for part in ("frames", "actions", "poses"):
        assert torch.equal(getattr(model.memory, part), getattr(fresh.memory, part)), part
    assert torch.equal(imagine(model), imagine(fresh)), "imagination after reset equals a fresh model's bit for bit"

    # episode 2 streamed by both, memorization included: the same losses, step counts and imagination
    second, fresh_second = stream(wrapped, seed=5), stream(fresh_wrapped, seed=5)
    for info, fresh_info in zip(second, fresh_second, strict=True):
        keys = [key for key in info if key.startswith("memory/") and key != "memory/seconds"]
        assert {key: info[key] for key in keys} == {key: fresh_info[key] for key in keys}
    assert second[-1]["memory/total_steps"] == MEMORIZE_STEPS * (EPISODE_STEPS // MEMORIZE_EVERY)
    assert torch.equal(imagine(model), imagine(fresh))
