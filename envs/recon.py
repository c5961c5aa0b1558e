"""RECON (outdoor robot navigation) in NWM's processed layout, NWM's action encoding and goal tasks.

Processed layout (as used by GNM/NoMaD/NWM)::

    <root>/<traj_name>/0.jpg, 1.jpg, ..., (T-1).jpg
    <root>/<traj_name>/traj_data.pkl   {"position": (T, 2) metres, "yaw": (T,) radians}, 4 Hz

``traj_data.pkl`` is read with ``come_rl.io_utils.safe_pickle_load`` (numpy arrays and plain
containers only; anything else is refused before it can run).

Actions (NWM): for a prediction starting at frame ``t`` (the last context frame), the future poses
``t+1..t+H`` are expressed in the frame of pose ``t`` (x forward, y left), positions divided by the
0.25 m waypoint spacing, yaw as the wrapped difference to yaw ``t`` ("waypoints"). The per-step
action is the difference of consecutive waypoints, the first being the first waypoint itself
("step actions": NWM's ``get_delta``). Both are in the *current* pose's frame, not each step's.

Goal tasks: the 100 cases of NWM's ``navigation_eval`` split (shipped as
``envs/data/recon_navigation_eval.csv``: ``traj_name, curr_time, goal_offset, len_traj_pred``):
4 context frames ending at ``curr_time``, the goal image ``goal_offset`` (8) frames ahead, 8
predicted steps.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from come_rl.io_utils import UnsafePickleError, atomic_write_bytes, safe_pickle_load
from come_rl.conventions import from_local_frame, to_local_frame, wrap_angle

WAYPOINT_SPACING_METRES = 0.25
CONTEXT_FRAMES = 4
NAVIGATION_EVAL_CSV = Path(__file__).resolve().parent / "data" / "recon_navigation_eval.csv"

__all__ = [
    "NAVIGATION_EVAL_CSV",
    "WAYPOINT_SPACING_METRES",
    "ReconGoalTask",
    "ReconGoalTaskSpec",
    "ReconTrajectory",
    "convert_recon_directory",
    "convert_recon_hdf5",
    "iterate_goal_tasks",
    "load_navigation_eval_tasks",
    "load_recon_trajectory",
    "nwm_step_actions",
    "nwm_waypoints",
    "step_actions_to_poses",
]


def _read_image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


@dataclass
class ReconTrajectory:
    """One processed RECON trajectory.

    Attributes:
        name: folder name.
        folder: its path.
        position: (T, 2) float64 metres.
        yaw: (T,) float64 radians.
    """

    name: str
    folder: Path
    position: np.ndarray
    yaw: np.ndarray

    def __len__(self) -> int:
        return len(self.yaw)

    @property
    def poses(self) -> np.ndarray:
        """(T, 3) float64 ``(x, y, yaw)`` in metres / radians."""
        return np.concatenate([self.position, self.yaw[:, None]], axis=1)

    def frame(self, time: int, size: int | None = None) -> np.ndarray:
        """Frame ``time`` as uint8 (H, W, 3), resized to (size, size) when ``size`` is given."""
        if not 0 <= time < len(self):
            raise IndexError(f"{self.name}: frame {time} outside [0, {len(self)})")
        return _read_image(self.folder / f"{time}.jpg", size)

    def frames(self, times, size: int | None = None) -> np.ndarray:
        """Frames at ``times`` stacked: (len(times), H, W, 3) uint8."""
        return np.stack([self.frame(int(time), size) for time in times])


def load_recon_trajectory(root: str | os.PathLike, traj_name: str) -> ReconTrajectory:
    """Load and validate one trajectory folder; every missing piece raises an error naming the file."""
    folder = Path(root) / traj_name
    if not folder.is_dir():
        raise FileNotFoundError(f"RECON trajectory folder {folder} does not exist; download the processed RECON "
                                "data set (or convert the raw hdf5 files with envs.recon.convert_recon_directory) "
                                f"and pass its root directory (the one that contains {traj_name}/)")
    pickle_path = folder / "traj_data.pkl"
    if not pickle_path.is_file():
        raise FileNotFoundError(f"{pickle_path} is missing; every RECON trajectory needs traj_data.pkl with "
                                "'position' (T, 2) and 'yaw' (T,); re-extract or re-convert this trajectory")
    try:
        data = safe_pickle_load(pickle_path)
    except UnsafePickleError:
        raise  # a refused global: its own message says why, and re-extracting is not the fix
    except pickle.UnpicklingError as error:
        # convert_recon_directory skips a trajectory whose traj_data.pkl exists, so re-converting means deleting it.
        raise ValueError(f"{pickle_path} is truncated or corrupt ({error.__cause__ or error}); re-copy this trajectory "
                         f"from the processed RECON data set, or delete {pickle_path.name} and re-convert the "
                         f"trajectory from its raw hdf5 file (envs.recon.convert_recon_directory)") from error
    if not isinstance(data, dict) or "position" not in data or "yaw" not in data:
        raise ValueError(f"{pickle_path} must hold a dict with 'position' and 'yaw', got "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    position = np.asarray(data["position"], dtype=np.float64)
    yaw = np.asarray(data["yaw"], dtype=np.float64).reshape(-1)
    if position.ndim != 2 or position.shape[1] < 2 or position.shape[0] != yaw.shape[0]:
        raise ValueError(f"{pickle_path}: position must be (T, 2) and yaw (T,), got {position.shape} and {yaw.shape}")
    position = position[:, :2]
    missing = [f"{t}.jpg" for t in range(len(yaw)) if not (folder / f"{t}.jpg").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{folder} has {len(yaw)} poses but frames {shown} are missing (expected 0.jpg.."
                                f"{len(yaw) - 1}.jpg); re-extract this trajectory")
    return ReconTrajectory(traj_name, folder, position, yaw)


# --------------------------------------------------------------------------------------- actions
def nwm_waypoints(position: np.ndarray, yaw: np.ndarray, curr_time: int, horizon: int,
                  spacing: float = WAYPOINT_SPACING_METRES) -> np.ndarray:
    """Future poses ``curr_time+1 .. curr_time+horizon`` in the frame of pose ``curr_time``.

    Returns:
        (horizon, 3): ``(x / spacing, y / spacing, wrapped yaw difference)``.
    """
    position, yaw = np.asarray(position, dtype=np.float64), np.asarray(yaw, dtype=np.float64).reshape(-1)
    if curr_time < 0 or curr_time + horizon >= len(yaw):
        raise ValueError(f"need poses up to {curr_time + horizon}, the trajectory has {len(yaw)} (0..{len(yaw) - 1})")
    poses = np.concatenate([position[:, :2], yaw[:, None]], axis=1)
    local = to_local_frame(poses[curr_time + 1: curr_time + horizon + 1], poses[curr_time])
    local[:, :2] /= spacing
    return local


def nwm_step_actions(position: np.ndarray, yaw: np.ndarray, curr_time: int, horizon: int,
                     spacing: float = WAYPOINT_SPACING_METRES) -> np.ndarray:
    """NWM's per-step actions: differences of consecutive waypoints (the first is the first waypoint).

    Returns:
        (horizon, 3) ``(dx, dy, dyaw)`` in the frame of pose ``curr_time``, positions in waypoint
        spacings; ``dyaw`` wrapped.
    """
    waypoints = nwm_waypoints(position, yaw, curr_time, horizon, spacing)
    deltas = np.diff(np.concatenate([np.zeros((1, 3)), waypoints]), axis=0)
    deltas[:, 2] = wrap_angle(deltas[:, 2])
    return deltas


def step_actions_to_poses(step_actions: np.ndarray, start_pose: np.ndarray,
                          spacing: float = WAYPOINT_SPACING_METRES) -> np.ndarray:
    """Inverse of ``nwm_step_actions``: (H, 3) step actions from ``start_pose`` -> (H, 3) world poses.

    Positions come back in metres; what a planner outputs can be scored against the true poses
    with this (ATE/RPE in waypoint units: divide positions by ``spacing``).
    """
    step_actions = np.asarray(step_actions, dtype=np.float64)
    if step_actions.ndim != 2 or step_actions.shape[1] != 3:
        raise ValueError(f"step_actions must be (horizon, 3), got {step_actions.shape}")
    waypoints = np.cumsum(step_actions, axis=0)
    waypoints[:, :2] *= spacing
    return from_local_frame(waypoints, np.asarray(start_pose, dtype=np.float64))


# --------------------------------------------------------------------------------------- goal tasks
@dataclass(frozen=True)
class ReconGoalTaskSpec:
    """One row of the navigation-eval split."""

    traj_name: str
    curr_time: int
    goal_offset: int = 8
    len_traj_pred: int = 8
    context_size: int = CONTEXT_FRAMES


@dataclass
class ReconGoalTask:
    """A loaded goal-reaching case.

    Attributes:
        spec: the split row.
        context_frames: (context_size, H, W, 3) uint8, frames ``curr_time-3 .. curr_time``.
        goal_frame: (H, W, 3) uint8 at ``curr_time + goal_offset``.
        start_pose: (3,) world pose at ``curr_time`` (metres, radians).
        goal_pose: (3,) world pose of the goal frame.
        true_poses: (len_traj_pred, 3) world poses ``curr_time+1 ..``.
        true_step_actions: (len_traj_pred, 3) NWM step actions of the recorded path.
    """

    spec: ReconGoalTaskSpec
    context_frames: np.ndarray
    goal_frame: np.ndarray
    start_pose: np.ndarray
    goal_pose: np.ndarray
    true_poses: np.ndarray
    true_step_actions: np.ndarray


def load_navigation_eval_tasks(csv_path: str | os.PathLike | None = None) -> list[ReconGoalTaskSpec]:
    """The goal cases of a navigation-eval CSV (default: NWM's 100 RECON cases shipped here)."""
    path = Path(csv_path) if csv_path is not None else NAVIGATION_EVAL_CSV
    if not path.is_file():
        raise FileNotFoundError(f"navigation-eval CSV {path} not found; expected columns traj_name,curr_time,"
                                "goal_offset,len_traj_pred")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        required = {"traj_name", "curr_time", "goal_offset", "len_traj_pred"}
        if reader.fieldnames is None or not required <= set(reader.fieldnames):
            raise ValueError(f"{path} must have the columns {sorted(required)}, got {reader.fieldnames}")
        return [ReconGoalTaskSpec(row["traj_name"], int(row["curr_time"]), int(row["goal_offset"]),
                                  int(row["len_traj_pred"])) for row in reader]


def load_goal_task(root: str | os.PathLike, spec: ReconGoalTaskSpec, image_size: int | None = None,
                   trajectory: ReconTrajectory | None = None) -> ReconGoalTask:
    """Load the frames and poses of one goal case."""
    trajectory = trajectory or load_recon_trajectory(root, spec.traj_name)
    first_context = spec.curr_time - spec.context_size + 1
    last_needed = spec.curr_time + max(spec.goal_offset, spec.len_traj_pred)
    if first_context < 0 or last_needed >= len(trajectory):
        raise ValueError(f"{spec.traj_name}: the task needs frames {first_context}..{last_needed}, the trajectory has "
                         f"0..{len(trajectory) - 1}")
    poses = trajectory.poses
    return ReconGoalTask(
        spec=spec,
        context_frames=trajectory.frames(range(first_context, spec.curr_time + 1), image_size),
        goal_frame=trajectory.frame(spec.curr_time + spec.goal_offset, image_size),
        start_pose=poses[spec.curr_time],
        goal_pose=poses[spec.curr_time + spec.goal_offset],
        true_poses=poses[spec.curr_time + 1: spec.curr_time + spec.len_traj_pred + 1],
        true_step_actions=nwm_step_actions(trajectory.position, trajectory.yaw, spec.curr_time, spec.len_traj_pred),
    )


def iterate_goal_tasks(root: str | os.PathLike, specs: list[ReconGoalTaskSpec] | None = None,
                       image_size: int | None = 64) -> Iterator[ReconGoalTask]:
    """Yield the loaded goal cases in order (default: all 100 navigation-eval cases)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"RECON root {root} does not exist; pass the folder of processed trajectories")
    cache: dict[str, ReconTrajectory] = {}
    for spec in specs if specs is not None else load_navigation_eval_tasks():
        if spec.traj_name not in cache:
            cache[spec.traj_name] = load_recon_trajectory(root, spec.traj_name)
        yield load_goal_task(root, spec, image_size, cache[spec.traj_name])


# --------------------------------------------------------------------------------------- conversion
def _import_h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError("converting raw RECON needs h5py: pip install h5py (it is not a dependency of come_rl "
                          "because only this converter uses it)") from error
    return h5py


def convert_recon_hdf5(hdf5_path: str | os.PathLike, out_root: str | os.PathLike,
                       traj_name: str | None = None) -> Path:
    """Convert one raw RECON ``.hdf5`` (``images/rgb_left`` JPEG bytes, ``jackal/position``,
    ``jackal/yaw``) into ``<out_root>/<traj_name>/{0..T-1}.jpg + traj_data.pkl``.

    The JPEG bytes are written unchanged (no re-encoding). ``traj_data.pkl`` is written last and
    atomically, so a folder with it is complete. Returns the trajectory folder.
    """
    h5py = _import_h5py()
    hdf5_path = Path(hdf5_path)
    if not hdf5_path.is_file():
        raise FileNotFoundError(f"raw RECON file {hdf5_path} does not exist")
    name = traj_name or hdf5_path.stem
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"trajectory name {name!r} must be letters, digits, '_', '-' or '.'")
    folder = Path(out_root) / name
    with h5py.File(hdf5_path, "r") as h5_file:
        for key in ("images/rgb_left", "jackal/position", "jackal/yaw"):
            if key not in h5_file:
                raise ValueError(f"{hdf5_path} lacks {key!r}: not a raw RECON file")
        images = h5_file["images/rgb_left"]
        position = np.asarray(h5_file["jackal/position"][:, :2], dtype=np.float64)
        yaw = np.asarray(h5_file["jackal/yaw"][()], dtype=np.float64).reshape(-1)
        if not len(images) == len(position) == len(yaw):
            raise ValueError(f"{hdf5_path}: {len(images)} images, {len(position)} positions, {len(yaw)} yaws differ")
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(len(images)):
            atomic_write_bytes(folder / f"{index}.jpg", bytes(np.asarray(images[index]).tobytes()))
    atomic_write_bytes(folder / "traj_data.pkl", pickle.dumps({"position": position, "yaw": yaw}, protocol=4))
    return folder


def convert_recon_directory(input_dir: str | os.PathLike, out_root: str | os.PathLike) -> list[Path]:
    """Convert every ``*.hdf5`` under ``input_dir`` (skipping trajectories already converted)."""
    from tqdm import tqdm

    files = sorted(Path(input_dir).rglob("*.hdf5"))
    if not files:
        raise FileNotFoundError(f"no .hdf5 files under {input_dir}; point to the extracted recon_release folder")
    folders = []
    for file in tqdm(files, desc="RECON hdf5 -> jpg", unit="traj"):
        done = Path(out_root) / file.stem / "traj_data.pkl"
        folders.append(done.parent if done.is_file() else convert_recon_hdf5(file, out_root))
    return folders


def _jpeg_bytes(frame: np.ndarray) -> bytes:
    """Encode a uint8 frame as JPEG bytes (used by tests and tools that write RECON-like data)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
