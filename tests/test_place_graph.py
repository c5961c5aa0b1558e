"""The graph of memorized places (planners.place_graph) and the cost-to-go scoring it gives the place objective."""

import numpy as np
import pytest
import torch

from planners.place_graph import PlaceGraph


def _walk(points, step=0.1):
    """Poses every ``step`` cells along straight segments through ``points`` (heading along the segment)."""
    poses = []
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        n = max(1, int(round(np.hypot(x1 - x0, y1 - y0) / step)))
        yaw = np.arctan2(y1 - y0, x1 - x0)
        poses += [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n, yaw) for k in range(n)]
    poses.append((*points[-1], poses[-1][2]))
    return np.asarray(poses)


def test_a_detour_walked_out_and_back_is_cut_short():
    # the goal at the start; the walk goes 2 cells east, 1 cell north into a dead end, back, then 1 cell further east
    walk = _walk([(0, 0), (2, 0), (2, 1), (2, 0), (3, 0)])
    graph = PlaceGraph(walk, goal_index=0)
    arc = np.linalg.norm(np.diff(walk[:, :2], axis=0), axis=1).sum()
    assert arc == pytest.approx(5.0, abs=1e-6)
    # from the walk's end the way back skips the dead end: 3 cells, not 5
    assert graph.cost_to_go(np.array([3.0, 0.0]))[0] == pytest.approx(3.0, abs=1e-6)
    route = graph.route(np.array([3.0, 0.0]))
    assert np.allclose(route[-1, :2], [0, 0]) and route[:, 1].max() < 0.3  # never into the dead end
    # the waypoint: the first node >= 1 cell along the way from (3, 0) (edges join places up to 0.3 cells apart)
    x, y = graph.waypoint(np.array([3.0, 0.0]), 1.0)[:2]
    assert 1.7 - 1e-6 <= x <= 2.0 + 1e-6 and y == pytest.approx(0.0)
    # from the dead end's tip: back down, then west
    assert graph.cost_to_go(np.array([2.0, 1.0]))[0] == pytest.approx(3.0, abs=0.15)  # links cut the corner a little


def test_cost_to_go_falls_along_the_way_and_off_the_way_costs_more():
    walk = _walk([(0, 0), (0, 2), (2, 2)])  # an L: the goal at its start
    graph = PlaceGraph(walk, goal_index=0)
    along = graph.cost_to_go(np.array([[2.0, 2.0], [1.0, 2.0], [0.0, 1.0], [0.0, 0.0]]))
    assert np.all(np.diff(along) < 0) and along[-1] == pytest.approx(0.0)
    # (1, 1) is 1.41 cells from the goal in a straight line, but no walked way passes there (a wall, for all the
    # graph knows): it costs more than the corner it would cut
    corner_cut = graph.cost_to_go(np.array([1.0, 1.0]))[0]
    assert corner_cut > graph.cost_to_go(np.array([0.0, 2.0]))[0] - 1e-9
    assert corner_cut > np.hypot(1.0, 1.0) + 1.0  # more than stepping off the way straight to it and walking on


def test_a_gap_in_the_memory_costs_more_than_the_joined_places():
    near = _walk([(0, 0), (1, 0)])
    far = _walk([(5, 0), (6, 0)])  # a second segment, 4 cells from the first: no walked way joins them
    graph = PlaceGraph(np.concatenate([near, far]), goal_index=0)
    assert np.isfinite(graph.to_goal).all()
    assert graph.cost_to_go(np.array([5.0, 0.0]))[0] > graph.cost_to_go(np.array([1.0, 0.0]))[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(poses=np.zeros((3, 2))), "poses must be finite"),
    (dict(poses=np.full((3, 3), np.nan)), "poses must be finite"),
    (dict(poses=np.zeros((3, 3)), goal_index=3), "goal_index 3"),
    (dict(poses=np.zeros((3, 3)), link=0.0), "link must be a distance > 0"),
    (dict(poses=np.zeros((3, 3)), off_way_factor=0.5), "off_way_factor must be >= 1"),
])
def test_bad_graphs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlaceGraph(**kwargs)


@pytest.fixture(scope="module")
def maze_env():
    from envs.memory_maze import MemoryMazeEnv

    env = MemoryMazeEnv(maze_size=9)
    yield env
    env.close()


def test_graph_scoring_prefers_walking_back_along_a_fold(maze_env):
    """The exact model where the memorized route folds back: the agent stands at the fold facing back along the way;
    forward (towards the goal) must beat standing still and turning away, with both scorings' candidates on one
    simulator."""
    from envs.memory_maze import MazeSimulatorModel
    from planners.objectives import PathObjective, PlaceObjective

    frame, info = maze_env.reset(seed=11)
    model = MazeSimulatorModel(maze_env)
    model.observe(frame, None, info["pose"])
    start = np.asarray(info["pose"], np.float64)
    heading = np.array([np.cos(start[2]), np.sin(start[2])])
    # the memorized walk to the goal (1.1 cells ahead) first went 0.3 cells behind and came back: it folds here
    back = [np.r_[start[:2] - heading * 0.1 * k, start[2]] for k in range(4)]
    ahead = [np.r_[start[:2] + heading * 0.1 * k, start[2]] for k in range(1, 12)]
    path = np.stack(back + back[::-1][1:] + ahead)
    objective = PathObjective(model, frame, path, lookahead=0.5, turn_weight=0.6, scoring="graph")
    plans = torch.zeros(3, 4, 6)
    plans[0, :, 1] = 1  # forward
    plans[1, :, 0] = 1  # noop
    plans[2, :, 2] = 1  # turn left
    scores = objective(plans)
    assert scores[0] > scores[1] > scores[2], scores
    assert np.allclose(objective.waypoint()[:2], start[:2] + heading * 0.5, atol=0.06)
    # the waypoint 0.5 cells along the path from its nearest pose lies on the fold, behind: that scoring turns away
    folded = PathObjective(model, frame, path, lookahead=0.5, turn_weight=0.6, scoring="waypoint")(plans)
    assert folded[2] > folded[0], folded
    with pytest.raises(ValueError, match="scoring must be one of"):
        PathObjective(model, frame, path, scoring="euclid")
    with pytest.raises(ValueError, match="scoring must be one of"):
        PlaceObjective(model, frame, scoring="euclid")
