"""Memory Cards (CoME paper, appendix C and D.1): a 4x4 grid of face-down cards with 8 objects, each on two tiles.

The layout is shuffled per episode and static within it. A cursor moves over the grid and the agent covers or
uncovers the tile under it, so a world model that has seen a tile once must remember its object to predict what
uncovering it shows again. Guessing a hidden tile is right 1 time in 8 (the paper's 13 % chance level).

Actions (Discrete(5)): 0 up, 1 down, 2 left, 3 right, 4 toggle (cover / uncover the tile under the cursor).
Moves into the border leave the cursor where it is.

Observation: uint8 RGB frame (size, size, 3), rendered with numpy; deterministic for a seed.
``info``: ``cursor`` (row, col), ``layout`` (4, 4) object ids 0..7, ``covered`` (4, 4) bool, ``seen`` (4, 4) bool
(the tile has been shown uncovered at least once), ``pose`` = (row, col, 0) float32 (the cursor as a pose).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from come_rl.conventions import frames_to_tensor
from come_rl.interfaces import ActionSpec

GRID = 4
NUM_OBJECTS = 8
ACTION_MEANINGS = ("up", "down", "left", "right", "toggle")
UP, DOWN, LEFT, RIGHT, TOGGLE = range(5)
# The world is reversible: each action is undone by another (a move away from the border by the opposite move, a toggle
# by a toggle). Memorization may replay the episode backwards with these (MemorizeConfig.reverse_fraction).
INVERSE_ACTIONS = (DOWN, UP, RIGHT, LEFT, TOGGLE)
# The paper's random policy: cover/uncover with probability 0.4, each move with 0.15.
RANDOM_POLICY_PROBS = np.array([0.15, 0.15, 0.15, 0.15, 0.40])

_BACKGROUND = np.array([24, 24, 32], dtype=np.uint8)
COVER_COLOR = np.array([120, 120, 128], dtype=np.uint8)
_CURSOR = np.array([255, 255, 255], dtype=np.uint8)
_OBJECT_COLORS = np.array(
    [[230, 60, 60], [60, 200, 70], [70, 110, 240], [240, 210, 50],
     [200, 70, 220], [60, 210, 220], [250, 140, 40], [240, 240, 240]],
    dtype=np.uint8,
)


def _object_masks(inner: int) -> np.ndarray:
    """Eight distinct boolean shapes of size (inner, inner): square, disc, triangle, cross, diamond, ring, bars, X."""
    y, x = np.mgrid[0:inner, 0:inner].astype(np.float32)
    c = (inner - 1) / 2.0
    r = np.hypot(y - c, x - c)
    half = inner / 2.0
    masks = [
        np.ones((inner, inner), bool),                                   # filled square
        r <= half * 0.95,                                                # disc
        (y >= (inner - 1) - 2 * np.abs(x - c) * 1.0) & (y <= inner - 1),  # triangle
        (np.abs(x - c) <= inner * 0.17) | (np.abs(y - c) <= inner * 0.17),  # plus
        (np.abs(x - c) + np.abs(y - c)) <= half,                         # diamond
        (r <= half * 0.95) & (r >= half * 0.5),                          # ring
        (np.floor(y / max(inner / 4, 1)) % 2) == 0,                      # horizontal bars
        (np.abs(x - y) <= inner * 0.15) | (np.abs(x + y - (inner - 1)) <= inner * 0.15),  # X
    ]
    return np.stack(masks)


class MemoryCardsEnv(gym.Env):
    """The Memory Cards grid world. See the module docstring for actions, observation and info."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, size: int = 48, max_steps: int = 250, initial_cover: str = "random",
                 render_mode: str | None = "rgb_array"):
        if size % GRID or size < 4 * GRID:
            raise ValueError(f"size must be a multiple of {GRID} and at least {4 * GRID}, got {size}")
        if initial_cover not in ("random", "covered", "uncovered"):
            raise ValueError(f"initial_cover must be 'random', 'covered' or 'uncovered', got {initial_cover!r}")
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.size, self.max_steps, self.initial_cover, self.render_mode = size, max_steps, initial_cover, render_mode
        self.tile = size // GRID
        # A 1-pixel ring per tile is reserved for the cursor; objects are drawn inside a margin so tiles never touch.
        self.margin = max(1, self.tile // 6)
        self.inner = self.tile - 2 * self.margin
        self._masks = _object_masks(self.inner)
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = spaces.Discrete(len(ACTION_MEANINGS))
        self.action_spec = ActionSpec.discrete(len(ACTION_MEANINGS))
        self._rng = np.random.default_rng(0)
        self.layout = np.zeros((GRID, GRID), np.int64)
        self.covered = np.ones((GRID, GRID), bool)
        self.seen = np.zeros((GRID, GRID), bool)
        self.cursor = np.zeros(2, np.int64)
        self.steps = 0

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        super().reset(seed=seed)
        self._rng = self.np_random
        options = options or {}
        cover = options.get("initial_cover", self.initial_cover)
        self.layout = self._rng.permutation(np.repeat(np.arange(NUM_OBJECTS), 2)).reshape(GRID, GRID)
        if cover == "random":
            self.covered = self._rng.random((GRID, GRID)) < 0.5
        elif cover in ("covered", "uncovered"):
            self.covered = np.full((GRID, GRID), cover == "covered")
        else:
            raise ValueError(f"options['initial_cover'] must be 'random', 'covered' or 'uncovered', got {cover!r}")
        self.cursor = np.array(options.get("cursor", self._rng.integers(0, GRID, size=2)), dtype=np.int64)
        self.seen = ~self.covered
        self.steps = 0
        return self.render_frame(), self._info()

    def step(self, action):
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if not isinstance(action, (int, np.integer)) or not self.action_space.contains(int(action)):
            raise ValueError(f"action must be an int in [0, {self.action_space.n}) ({ACTION_MEANINGS}), got {action!r}")
        action = int(action)
        if action == TOGGLE:
            r, c = self.cursor
            self.covered[r, c] = ~self.covered[r, c]
            self.seen[r, c] |= ~self.covered[r, c]
        else:
            delta = {UP: (-1, 0), DOWN: (1, 0), LEFT: (0, -1), RIGHT: (0, 1)}[action]
            self.cursor = np.clip(self.cursor + np.array(delta), 0, GRID - 1)
        self.steps += 1
        truncated = self.steps >= self.max_steps
        return self.render_frame(), 0.0, False, truncated, self._info()

    def render(self):
        return self.render_frame()

    # ----------------------------------------------------------------------------------------------- helpers
    def _info(self) -> dict:
        return {
            "cursor": self.cursor.copy(),
            "layout": self.layout.copy(),
            "covered": self.covered.copy(),
            "seen": self.seen.copy(),
            "pose": np.array([self.cursor[0], self.cursor[1], 0.0], dtype=np.float32),
        }

    def random_policy_action(self, rng: np.random.Generator) -> int:
        """The paper's random policy: toggle with probability 0.4, each of the four moves with 0.15."""
        return int(rng.choice(len(ACTION_MEANINGS), p=RANDOM_POLICY_PROBS))

    def tile_slice(self, row: int, col: int) -> tuple[slice, slice]:
        """Pixel slices of one tile in a frame."""
        return slice(row * self.tile, (row + 1) * self.tile), slice(col * self.tile, (col + 1) * self.tile)

    def render_tile(self, content: int) -> np.ndarray:
        """A tile without cursor: ``content`` is an object id 0..7, or -1 for a covered tile. (tile, tile, 3) uint8."""
        tile = np.empty((self.tile, self.tile, 3), np.uint8)
        tile[:] = _BACKGROUND
        m = self.margin
        if content < 0:
            tile[m:-m, m:-m] = COVER_COLOR
        else:
            inner = tile[m:-m, m:-m]
            inner[self._masks[content]] = _OBJECT_COLORS[content]
        return tile

    def render_frame(self) -> np.ndarray:
        frame = np.empty((self.size, self.size, 3), np.uint8)
        for r in range(GRID):
            for c in range(GRID):
                content = -1 if self.covered[r, c] else int(self.layout[r, c])
                frame[self.tile_slice(r, c)] = self.render_tile(content)
        rows, cols = self.tile_slice(*self.cursor)
        frame[rows.start, cols] = _CURSOR
        frame[rows.stop - 1, cols] = _CURSOR
        frame[rows, cols.start] = _CURSOR
        frame[rows, cols.stop - 1] = _CURSOR
        return frame

    def tile_templates(self) -> np.ndarray:
        """The 9 possible tile contents without cursor: objects 0..7 then covered. (9, tile, tile, 3) uint8."""
        return np.stack([self.render_tile(k) for k in range(NUM_OBJECTS)] + [self.render_tile(-1)])


def zigzag_recall_actions(start: str = "covered") -> list[int]:
    """The paper's special test episodes (appendix C): a zig-zag over all tiles that shows every tile once.

    The episode must be reset with ``options={'initial_cover': start, 'cursor': (0, 0)}``. Starting all covered,
    each tile is uncovered and covered again; starting all uncovered, each tile is covered as the cursor passes. Either
    way every tile has been seen and all tiles are covered at the end, so every tile is a recall query.
    """
    if start not in ("covered", "uncovered"):
        raise ValueError(f"start must be 'covered' or 'uncovered', got {start!r}")
    actions: list[int] = []
    for row in range(GRID):
        cols = range(GRID) if row % 2 == 0 else range(GRID - 1, -1, -1)
        for i, _ in enumerate(cols):
            actions += [TOGGLE, TOGGLE] if start == "covered" else [TOGGLE]
            if i < GRID - 1:
                actions.append(RIGHT if row % 2 == 0 else LEFT)
        if row < GRID - 1:
            actions.append(DOWN)
    return actions


def path_to_tile(cursor, target) -> list[int]:
    """Moves that bring the cursor from ``cursor`` to ``target`` (rows first)."""
    (r0, c0), (r1, c1) = (int(cursor[0]), int(cursor[1])), (int(target[0]), int(target[1]))
    moves = [DOWN if r1 > r0 else UP] * abs(r1 - r0)
    return moves + [RIGHT if c1 > c0 else LEFT] * abs(c1 - c0)


def cursor_pose_model(poses, actions):
    """Exact motion model of the cursor for imagination (the SLTM needs the poses of imagined frames).

    poses: (B, 3) float tensor (row, col, 0); actions: (B, 5) one-hot float tensor -> next poses (B, 3).
    """
    import torch

    index = actions.argmax(dim=-1)
    delta = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    return (poses + delta[index]).clamp(0.0, GRID - 1.0) * torch.tensor([1.0, 1.0, 0.0])


class MemoryCardsWorldModel:
    """An exact world model of Memory Cards with perfect memory (implements ``WorldModelProtocol``).

    It reads every observed frame: the cursor (from the pose, else from the frame's cursor ring), which tiles are
    covered, and the object of every tile it has seen uncovered (exact template match of the tile's inside). It imagines
    by running the env's own rules and renderer on that state; a tile never seen uncovered is imagined covered-grey when
    uncovered (it knows it does not know). With this model a planner's failures are the planner's, not the model's:
    the find-the-object agent must reach (nearly) 100 % with it.
    """

    def __init__(self, size: int = 48) -> None:
        self._renderer = MemoryCardsEnv(size=size, max_steps=10**9)
        self.action_spec = self._renderer.action_spec
        self.frame_shape = (3, size, size)
        self._templates = self._renderer.tile_templates()[:, self._renderer.margin:-self._renderer.margin,
                                                          self._renderer.margin:-self._renderer.margin]
        self.reset()

    def reset(self) -> None:
        self.known = np.full((GRID, GRID), -1, np.int64)
        self.covered = np.ones((GRID, GRID), bool)
        self.cursor: np.ndarray | None = None

    def observe(self, frame: np.ndarray, action=None, pose=None) -> None:
        frame = np.asarray(frame)
        if frame.shape != self._renderer.observation_space.shape or frame.dtype != np.uint8:
            raise ValueError(f"observe expects a uint8 {self._renderer.observation_space.shape} frame, "
                             f"got {frame.dtype} {frame.shape}")
        r = self._renderer
        m = r.margin
        for row in range(GRID):
            for col in range(GRID):
                rows, cols = r.tile_slice(row, col)
                inside = frame[rows, cols][m:-m, m:-m]
                match = [k for k, t in enumerate(self._templates) if np.array_equal(inside, t)]
                if not match:
                    raise ValueError(f"tile ({row}, {col}) of the observed frame is not a Memory Cards tile")
                self.covered[row, col] = match[0] == NUM_OBJECTS
                if match[0] < NUM_OBJECTS:
                    self.known[row, col] = match[0]
        if pose is not None:
            self.cursor = np.asarray(pose, dtype=np.float64).reshape(-1)[:2].round().astype(np.int64)
        else:
            ring = [(row, col) for row in range(GRID) for col in range(GRID)
                    if (frame[r.tile_slice(row, col)][0] == _CURSOR).all()]
            self.cursor = np.array(ring[0], np.int64)

    def memorize(self, steps: int | None = None, generator=None) -> dict:
        """Nothing to learn: observing already remembers exactly."""
        return {"steps": 0, "seconds": 0.0}

    def imagine(self, actions, generator=None, seed: int | None = None):
        """actions: (batch, horizon, 5) one-hot -> frames (batch, horizon, 3, size, size) in [-1, 1]."""
        import torch


        if self.cursor is None:
            raise RuntimeError("imagine needs a current state: call reset() and observe(frame) first")
        actions = torch.as_tensor(actions, dtype=torch.float32)
        if actions.ndim != 3 or actions.shape[-1] != self.action_spec.dim:
            raise ValueError(f"actions must have shape (batch, horizon, {self.action_spec.dim}), got {tuple(actions.shape)}")
        r = self._renderer
        out = np.empty((actions.shape[0], actions.shape[1], *r.observation_space.shape), np.uint8)
        for b, row in enumerate(actions.argmax(-1).numpy()):
            r.layout = np.where(self.known >= 0, self.known, 0)
            r.covered, r.cursor = self.covered.copy(), self.cursor.copy()
            for t, action in enumerate(row):
                r.step(int(action))
                out[b, t] = r.render_frame()
                unknown = (self.known < 0) & ~r.covered
                for row_, col_ in zip(*np.nonzero(unknown)):  # uncovered but never seen: imagined grey
                    out[b, t][r.tile_slice(row_, col_)][_inside(r)] = COVER_COLOR
        return frames_to_tensor(out)


def _inside(renderer: MemoryCardsEnv) -> tuple[slice, slice]:
    """The inside of a tile (within its margin)."""
    m = renderer.margin
    return slice(m, -m), slice(m, -m)


class CardsRandomPolicy:
    """The paper's random policy as a ``policy(info, rng) -> action`` of the collector (no state between steps)."""

    def __init__(self, env: MemoryCardsEnv):
        self.env = env

    def reset(self) -> None:
        pass

    def __call__(self, info: dict, rng: np.random.Generator) -> int:
        return self.env.random_policy_action(rng)


def collection_env_and_policy(steps: int, image_size: int = 48):
    """The env and policy that record Memory Cards data sets (``python -m come_rl.collect``, envs.registry)."""
    env = MemoryCardsEnv(size=image_size, max_steps=steps)
    return env, CardsRandomPolicy(env)
