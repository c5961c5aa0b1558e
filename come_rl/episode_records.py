"""Crash-safe evaluations: one atomic record per finished episode; a rerun of the same command skips them.

Used by every evaluation (``agents.find_object``, ``agents.return_to_place``, ``agents.nwm_protocol``, the recall
and consistency studies; the run command's goal episodes write theirs with :func:`write_record` too): ``check_records(out, config,
resume_free_keys)`` once before any episode, then ``recorded_episode(out, key, play)`` per episode. A kill leaves whole
records or none (``atomic_save_npz``); tables, plots and GIFs are rebuilt from all episodes at the end, so a resumed run
writes what an uninterrupted one writes (timing columns aside). Records hold the row as JSON and the GIF frames as
uint8, nothing that needs pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from come_rl.io_utils import atomic_save_npz, atomic_write_text

RECORDS_DIR = "episode_records"


def check_records(out: Path, config, resume_free_keys: Sequence[str]) -> None:
    """Write the run's settings (outside ``resume_free_keys``: those that change no episode) beside the records, or
    refuse a rerun whose settings differ from those the recorded episodes were run with. ``config``: a dataclass, or a
    JSON-able mapping (``come_rl.run`` passes its resolved configuration)."""
    from come_rl.locks import hold_directory

    hold_directory(out, "evaluation")  # one writer per results directory (come_rl.locks)
    items = config.items() if isinstance(config, Mapping) else dataclasses.asdict(config).items()
    settings = json.loads(json.dumps({k: v for k, v in items if k not in resume_free_keys}, allow_nan=True))
    path = Path(out) / RECORDS_DIR / "run_config.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupt ({error}); delete {path.parent} to start over") from error
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(f"{out} holds episodes run with other settings ({changed}); use another out_dir or "
                             f"delete {path.parent} to start over")
    else:
        atomic_write_text(path, json.dumps(settings, sort_keys=True, indent=1))


def write_record(path: Path, row: Any, **arrays: np.ndarray) -> None:
    """One finished episode's record, atomically: ``row`` (anything JSON holds, NaN included) and named arrays (frames
    as uint8, poses ...; nothing that needs pickle). Every evaluation's records are written by this function."""
    atomic_save_npz(path, row=np.array(json.dumps(row, allow_nan=True)), **arrays)


def read_record(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """(row, {name: array}) of a record :func:`write_record` wrote. A record that cannot be read raises ValueError
    naming it and the fix (records are written atomically: a damaged one was changed by someone else)."""
    try:
        with np.load(path) as saved:
            key = "row" if "row" in saved.files else "rows_json"  # rows_json: the run command's records before 2026-12
            return json.loads(str(saved[key])), {name: saved[name] for name in saved.files if name != key}
    except Exception as error:
        raise ValueError(f"episode record {path} is unreadable ({type(error).__name__}: {error}); delete it to rerun "
                         f"the episode") from error


def recorded_episode(out: Path | None, key: str, play: Callable[[], tuple[dict, list]]) -> tuple[dict, list]:
    """``play()`` -> (row, GIF frames or sequences; may be empty), or the episode's record ``key`` in ``out`` if a
    previous run finished it (``out=None``: always play, record nothing)."""
    if out is None:
        return play()
    path = Path(out) / RECORDS_DIR / f"{key}.npz"
    if path.exists():
        row, arrays = read_record(path)
        return row, list(arrays["gif"])
    row, gif = play()
    write_record(path, row, gif=np.stack(gif) if len(gif) else np.zeros((0,), np.uint8))
    return row, gif


@contextlib.contextmanager
def stop_with_resume_hint(out: str | Path) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM during an evaluation: the episode in progress is dropped (every finished one has its
    record), a line says how to resume, and the process exits with 128 + the signal's number. Records are written
    atomically, so a stop at any moment leaves whole records only."""
    received = {"signal": signal.SIGINT}

    def on_term(signum, frame):
        received["signal"] = signal.SIGTERM
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    except KeyboardInterrupt:
        records = Path(out) / RECORDS_DIR
        kept = len([p for p in records.iterdir() if p.suffix in (".npz", ".json") and p.name != "run_config.json"
                    and not p.name.startswith(".")]) if records.is_dir() else 0
        print(f"\nstopped by {received['signal'].name}: {kept} finished episode record(s) are kept in {records}; run "
              f"the same command again to resume", file=sys.stderr)
        raise SystemExit(128 + int(received["signal"])) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
