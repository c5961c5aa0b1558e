"""Memory Cards, find the object: watch an exploration, then uncover a tile that hides the goal object (one try).

Each episode (a seed fixes everything):
1. **Exploration** (done by ``reset``): a zig-zag over the 4x4 grid from the top-left corner that shows every tile and
   leaves all tiles covered (``zigzag_recall_actions``; the start is all covered or all uncovered, drawn per episode
   unless ``initial_cover`` fixes it). Its frames, actions and cursor poses are in ``info["exploration"]``, for an
   agent's world model to observe and memorize.
2. **Goal**: one of the 8 objects, drawn uniformly; ``info["goal_image"]`` is that object's tile as the env draws it
   (uint8, tile x tile x 3) and ``info["goal_object"]`` its id.
3. **Search**: the agent moves the cursor (up, down, left, right) and may toggle once: the toggle uncovers the tile
   under the cursor and ends the episode. Success (reward 1) when that tile holds the goal object. Each object sits on
   two of the 16 tiles, so a blind guess succeeds 2 times in 16. ``max_steps`` moves without a toggle end the episode
   (truncated, no success).

Registered as ``come_rl/MemoryCardsFind-v0``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.memory_cards import (ACTION_MEANINGS, GRID, NUM_OBJECTS, TOGGLE, MemoryCardsEnv, path_to_tile,
                               zigzag_recall_actions)


class MemoryCardsFindEnv(gym.Env):
    """See the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, size: int = 48, max_steps: int = 16, initial_cover: str = "random",
                 render_mode: str | None = "rgb_array"):
        if initial_cover not in ("random", "covered", "uncovered"):
            raise ValueError(f"initial_cover must be 'random', 'covered' or 'uncovered', got {initial_cover!r}")
        if isinstance(max_steps, bool) or int(max_steps) < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.cards = MemoryCardsEnv(size=size, max_steps=10**6)
        self.max_steps, self.initial_cover, self.render_mode = int(max_steps), initial_cover, render_mode
        self.observation_space = self.cards.observation_space
        self.action_space = spaces.Discrete(len(ACTION_MEANINGS))
        self.action_spec = self.cards.action_spec
        self.goal_object = 0
        self.steps = 0
        self.done = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        cover = options.get("initial_cover", self.initial_cover)
        if cover == "random":
            cover = "covered" if self.np_random.random() < 0.5 else "uncovered"
        if cover not in ("covered", "uncovered"):
            raise ValueError(f"initial_cover must be 'random', 'covered' or 'uncovered', got {cover!r}")
        layout_seed = int(self.np_random.integers(2**31))
        frame, info = self.cards.reset(seed=layout_seed, options={"initial_cover": cover, "cursor": (0, 0)})
        frames, actions, poses = [frame], [], [info["pose"]]
        for action in zigzag_recall_actions(cover):
            frame, *_, info = self.cards.step(action)
            frames.append(frame)
            actions.append(action)
            poses.append(info["pose"])
        goal = options.get("goal_object")
        if goal is None:
            goal = int(self.np_random.integers(NUM_OBJECTS))
        if isinstance(goal, bool) or not isinstance(goal, (int, np.integer)) or not 0 <= int(goal) < NUM_OBJECTS:
            raise ValueError(f"goal_object must be an object id in [0, {NUM_OBJECTS}), got {goal!r}")
        self.goal_object, self.steps, self.done = int(goal), 0, False
        self.exploration = {"frames": np.stack(frames), "actions": actions, "poses": np.stack(poses),
                            "initial_cover": cover}
        return frame, self._info(info)

    def step(self, action):
        if self.done:
            raise RuntimeError("the episode has ended (a tile was uncovered or max_steps passed); call reset()")
        frame, _, _, _, info = self.cards.step(action)
        self.steps += 1
        uncovered = int(action) == TOGGLE
        success = bool(uncovered and self.cards.layout[tuple(self.cards.cursor)] == self.goal_object)
        truncated = not uncovered and self.steps >= self.max_steps
        self.done = uncovered or truncated
        return frame, float(success), uncovered, truncated, dict(self._info(info), success=success)

    def render(self):
        return self.cards.render_frame()

    def goal_image(self) -> np.ndarray:
        return self.cards.render_tile(self.goal_object)

    def goal_tiles(self) -> list[tuple[int, int]]:
        """The tiles that hide the goal object (what an oracle knows)."""
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(self.cards.layout == self.goal_object))]

    def path_to(self, tile) -> list[int]:
        """The moves to a tile and the toggle that uncovers it."""
        return path_to_tile(self.cards.cursor, tile) + [TOGGLE]

    def _info(self, info: dict) -> dict:
        return dict(info, goal_object=self.goal_object, goal_image=self.goal_image(), exploration=self.exploration,
                    success=False, grid=GRID)
