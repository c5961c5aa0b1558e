"""RECON reader: a hand-made trajectory in the processed layout, hand-computed NWM actions."""

import os
import pickle

import numpy as np
import pytest

from envs.recon import (
    NAVIGATION_EVAL_CSV,
    ReconGoalTaskSpec,
    _jpeg_bytes,
    convert_recon_hdf5,
    iterate_goal_tasks,
    load_navigation_eval_tasks,
    load_recon_trajectory,
    nwm_step_actions,
    nwm_waypoints,
    step_actions_to_poses,
)

# Poses 0..3 are context; from pose 3 = (1, 1, pi/2) (facing +y) the robot goes 0.25 m forward,
# turns left while going 0.25 m forward (now facing -x), then moves 0.25 m forward (-x) and
# 0.25 m to its right... see the hand-computed waypoints below.
HAND_POSES = np.array([
    [1.0, 0.25, np.pi / 2],
    [1.0, 0.50, np.pi / 2],
    [1.0, 0.75, np.pi / 2],
    [1.0, 1.00, np.pi / 2],   # t = 3: current pose
    [1.0, 1.25, np.pi / 2],   # +1 waypoint forward
    [1.0, 1.50, np.pi],       # +1 forward, turned left by pi/2
    [0.75, 1.50, np.pi],      # 0.25 m along -x = to the left of the pose at t=3
    [0.50, 1.50, np.pi],
    [0.50, 1.50, -np.pi / 2],  # turn left again in place (pi -> 3pi/2 == -pi/2)
    [0.50, 1.25, -np.pi / 2],
    [0.50, 1.00, -np.pi / 2],
    [0.50, 0.75, -np.pi / 2],  # t = 11: goal (8 ahead of t = 3)
    [0.50, 0.50, -np.pi / 2],
])
# Waypoints in the frame of pose 3 (x = +y world, y = -x world), in units of 0.25 m.
HAND_WAYPOINTS = np.array([
    [1, 0, 0], [2, 0, np.pi / 2], [2, 1, np.pi / 2], [2, 2, np.pi / 2],
    [2, 2, -np.pi], [1, 2, -np.pi], [0, 2, -np.pi], [-1, 2, -np.pi],
], dtype=np.float64)
HAND_STEPS = np.array([
    [1, 0, 0], [1, 0, np.pi / 2], [0, 1, 0], [0, 1, 0],
    [0, 0, np.pi / 2], [-1, 0, 0], [-1, 0, 0], [-1, 0, 0],
], dtype=np.float64)


def write_trajectory(root, name, poses, frames_to_skip=()):
    folder = root / name
    folder.mkdir(parents=True)
    for t in range(len(poses)):
        if t in frames_to_skip:
            continue
        frame = np.zeros((24, 32, 3), np.uint8)
        frame[..., 0] = 10 * t  # frame t is recognisable by its red level
        (folder / f"{t}.jpg").write_bytes(_jpeg_bytes(frame))
    with open(folder / "traj_data.pkl", "wb") as handle:
        pickle.dump({"position": poses[:, :2].copy(), "yaw": poses[:, 2].copy()}, handle)
    return folder


def angle_close(a, b):
    return np.allclose(np.cos(a), np.cos(b), atol=1e-9) and np.allclose(np.sin(a), np.sin(b), atol=1e-9)


def test_hand_computed_waypoints_and_step_actions():
    waypoints = nwm_waypoints(HAND_POSES[:, :2], HAND_POSES[:, 2], curr_time=3, horizon=8)
    np.testing.assert_allclose(waypoints[:, :2], HAND_WAYPOINTS[:, :2], atol=1e-9)
    assert angle_close(waypoints[:, 2], HAND_WAYPOINTS[:, 2])
    steps = nwm_step_actions(HAND_POSES[:, :2], HAND_POSES[:, 2], curr_time=3, horizon=8)
    np.testing.assert_allclose(steps[:, :2], HAND_STEPS[:, :2], atol=1e-9)
    assert angle_close(steps[:, 2], HAND_STEPS[:, 2])
    # Integrating the step actions from the current pose gives the recorded poses back.
    poses = step_actions_to_poses(steps, HAND_POSES[3])
    np.testing.assert_allclose(poses[:, :2], HAND_POSES[4:12, :2], atol=1e-9)
    assert angle_close(poses[:, 2], HAND_POSES[4:12, 2])


def test_reader_and_goal_task(tmp_path):
    write_trajectory(tmp_path, "traj_a", HAND_POSES)
    trajectory = load_recon_trajectory(tmp_path, "traj_a")
    assert len(trajectory) == 13
    np.testing.assert_allclose(trajectory.poses, HAND_POSES)
    spec = ReconGoalTaskSpec("traj_a", curr_time=3, goal_offset=8, len_traj_pred=8)
    (task,) = list(iterate_goal_tasks(tmp_path, [spec], image_size=16))
    assert task.context_frames.shape == (4, 16, 16, 3) and task.goal_frame.shape == (16, 16, 3)
    # Context frames are 0..3 and the goal is frame 11 (red level 10 * t, JPEG within a few levels).
    np.testing.assert_allclose(task.context_frames[..., 0].mean(axis=(1, 2)), [0, 10, 20, 30], atol=3)
    assert abs(task.goal_frame[..., 0].mean() - 110) < 3
    np.testing.assert_allclose(task.start_pose, HAND_POSES[3])
    np.testing.assert_allclose(task.goal_pose, HAND_POSES[11])
    np.testing.assert_allclose(task.true_step_actions[:, :2], HAND_STEPS[:, :2], atol=1e-9)
    np.testing.assert_allclose(task.true_poses, HAND_POSES[4:12])


def test_missing_frame_and_folder_are_named(tmp_path):
    write_trajectory(tmp_path, "traj_b", HAND_POSES, frames_to_skip={5})
    with pytest.raises(FileNotFoundError, match=r"5\.jpg"):
        load_recon_trajectory(tmp_path, "traj_b")
    with pytest.raises(FileNotFoundError, match="traj_c"):
        load_recon_trajectory(tmp_path, "traj_c")
    (tmp_path / "traj_d").mkdir()
    with pytest.raises(FileNotFoundError, match="traj_data.pkl"):
        load_recon_trajectory(tmp_path, "traj_d")


def test_pickle_that_runs_code_is_refused(tmp_path):
    folder = write_trajectory(tmp_path, "traj_e", HAND_POSES)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "traj_data.pkl", "wb") as handle:
        pickle.dump({"position": Exploit(), "yaw": np.zeros(13)}, handle)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_recon_trajectory(tmp_path, "traj_e")


def test_task_too_close_to_the_end_is_rejected(tmp_path):
    write_trajectory(tmp_path, "traj_f", HAND_POSES)
    with pytest.raises(ValueError, match="needs frames"):
        list(iterate_goal_tasks(tmp_path, [ReconGoalTaskSpec("traj_f", curr_time=6)]))


def test_shipped_navigation_eval_split():
    specs = load_navigation_eval_tasks()
    assert NAVIGATION_EVAL_CSV.is_file() and len(specs) == 100
    assert all(spec.goal_offset == 8 and spec.len_traj_pred == 8 and spec.context_size == 4 for spec in specs)
    assert specs[0] == ReconGoalTaskSpec("jackal_2019-08-06-14-12-43_19_r00", 59, 8, 8)
    assert all(spec.curr_time >= 3 for spec in specs)


def test_converter_needs_h5py_or_converts(tmp_path):
    try:
        import h5py
    except ImportError:
        with pytest.raises(ImportError, match="pip install h5py"):
            convert_recon_hdf5(tmp_path / "missing.hdf5", tmp_path / "out")
        return
    raw = tmp_path / "raw.hdf5"
    with h5py.File(raw, "w") as handle:
        images = handle.create_dataset("images/rgb_left", (13,), dtype=h5py.vlen_dtype(np.uint8))
        for t in range(13):
            images[t] = np.frombuffer(_jpeg_bytes(np.full((8, 8, 3), 10 * t, np.uint8)), np.uint8)
        handle["jackal/position"] = np.concatenate([HAND_POSES[:, :2], np.zeros((13, 1))], axis=1)
        handle["jackal/yaw"] = HAND_POSES[:, 2]
    convert_recon_hdf5(raw, tmp_path / "out", "converted")
    trajectory = load_recon_trajectory(tmp_path / "out", "converted")
    np.testing.assert_allclose(trajectory.poses, HAND_POSES)
