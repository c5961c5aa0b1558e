"""A graph of memorized places and the cost-to-go it gives a planner: how far a position is from the goal's place
along the ways the agent has walked.

Nodes are memorized poses (x, y, yaw) in the order they were seen. Two nodes are joined when they follow each other
(one step of the walk, at most ``max_step`` cells apart) or when they lie within ``link`` cells of each other (the
same place seen twice: where an exploration loops, turns back or crosses itself, the graph takes the shortcut the
walk did not). Edge lengths are position distances. Dijkstra from the goal's node gives every node's distance to the
goal along walked ways, ``to_goal``.

The cost-to-go of a position p is ``min_i |p - node_i| + to_goal_i`` over the nodes within ``reach`` cells of p (a
node further away may lie behind a wall: the graph knows nothing of walls, only where the agent has been); off the
memorized ways (no node within ``reach``) it is ``off_way_factor * |p - nearest| + to_goal_nearest``, so leaving the
walked ways costs more than it gains. Unlike a waypoint a fixed distance ahead, it has no target that moves only when
the agent is nearest a later pose, so it neither stalls where the walk folds back nor pulls the agent into a wall
towards a waypoint around a corner.

``waypoint(p, lookahead)`` follows the shortest-path tree from the node that gives p its cost-to-go until
``lookahead`` cells of path are covered: the direction to head in (the planner's turn term).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PlaceGraph"]


class PlaceGraph:
    """Memorized poses (N, 3) with the goal's node ``goal_index``; see the module docstring."""

    def __init__(self, poses, goal_index: int = -1, link: float = 0.3, max_step: float = 0.5, reach: float = 0.4,
                 off_way_factor: float = 2.0) -> None:
        poses = np.asarray(poses, dtype=np.float64)
        if poses.ndim != 2 or poses.shape[1] != 3 or len(poses) < 1 or not np.isfinite(poses).all():
            raise ValueError(f"poses must be finite (N >= 1, 3) poses (x, y, yaw), got shape {poses.shape}")
        n = len(poses)
        goal = int(goal_index) + (n if int(goal_index) < 0 else 0)
        if not 0 <= goal < n:
            raise ValueError(f"goal_index {goal_index} is not a node of a graph of {n} poses")
        for name, value in (("link", link), ("max_step", max_step), ("reach", reach)):
            if isinstance(value, bool) or not float(value) > 0:
                raise ValueError(f"{name} must be a distance > 0 (maze cells), got {value!r}")
        if not float(off_way_factor) >= 1:
            raise ValueError(f"off_way_factor must be >= 1, got {off_way_factor!r}")
        self.poses, self.goal_index = poses, goal
        self.reach, self.off_way_factor = float(reach), float(off_way_factor)
        positions = poses[:, :2]
        distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
        weights = np.where(distance <= float(link), distance, np.inf)
        steps = distance[np.arange(n - 1), np.arange(1, n)]
        walked = np.nonzero(steps <= float(max_step))[0]
        weights[walked, walked + 1] = steps[walked]
        weights[walked + 1, walked] = steps[walked]
        np.fill_diagonal(weights, np.inf)
        # Dijkstra from the goal (dense: a few hundred memorized poses)
        to_goal = np.full(n, np.inf)
        to_goal[goal] = 0.0
        parent = np.full(n, -1)
        done = np.zeros(n, dtype=bool)
        for _ in range(n):
            open_costs = np.where(done, np.inf, to_goal)
            u = int(np.argmin(open_costs))
            if not np.isfinite(open_costs[u]):
                break
            done[u] = True
            better = to_goal[u] + weights[u] < to_goal
            to_goal[better] = to_goal[u] + weights[u][better]
            parent[better] = u
        unreached = ~np.isfinite(to_goal)  # a gap in the memory (segments far apart): no walked way from there
        if unreached.any():
            far = to_goal[~unreached].max() + self.off_way_factor * np.linalg.norm(positions - positions[goal], axis=1)
            to_goal[unreached] = far[unreached]
        self.to_goal, self.parent = to_goal, parent

    def __len__(self) -> int:
        return len(self.poses)

    def assign(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(cost-to-go (B,), the node giving it (B,)) for positions (B, 2) (or (2,)): see :meth:`cost_to_go`."""
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        distance = np.linalg.norm(positions[:, None] - self.poses[None, :, :2], axis=-1)
        on_way = np.where(distance <= self.reach, distance + self.to_goal[None], np.inf)
        off_way = self.off_way_factor * distance + self.to_goal[None]
        cost = np.where(np.isfinite(on_way).any(1, keepdims=True), on_way, off_way)
        node = np.argmin(cost, axis=1)
        return cost[np.arange(len(node)), node], node

    def cost_to_go(self, positions) -> np.ndarray:
        """Cells to the goal's place along walked ways, for positions (B, 2) (or (2,)). A node no walked way joins
        to the goal (a gap in the memory) costs the farthest joined node's cost plus ``off_way_factor`` times its
        straight distance to the goal."""
        return self.assign(positions)[0]

    def route(self, position) -> np.ndarray:
        """The memorized poses of the shortest walked way from where ``position`` (2,) joins the graph to the goal."""
        _, node = self.assign(position)
        nodes = [int(node[0])]
        while self.parent[nodes[-1]] >= 0:
            nodes.append(int(self.parent[nodes[-1]]))
        return self.poses[nodes]

    def ahead(self, node: int, cost: float, lookahead: float) -> np.ndarray:
        """The pose ``lookahead`` cells along the shortest way from a position of cost-to-go ``cost`` that joins the
        graph at ``node`` (what :meth:`assign` gives): covered counts from the position itself."""
        node = int(node)
        while self.parent[node] >= 0 and float(cost) - self.to_goal[node] < float(lookahead) - 1e-9:
            node = int(self.parent[node])
        return self.poses[node]

    def waypoint(self, position, lookahead: float) -> np.ndarray:
        """The pose ``lookahead`` cells along the shortest way to the goal from where ``position`` (2,) joins it."""
        cost, node = self.assign(position)
        return self.ahead(node[0], cost[0], lookahead)
