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
from come_rl.locks import hold_directory

RECORDS_DIR = "episode_records"


def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, Mapping):
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): settings}


def setting_differences(recorded: Any, wanted: Any, limit: int = 6) -> str:
    """``key: old -> new`` for each (nested, dotted) setting that differs, at most ``limit`` of them."""
    old, new = _flatten(recorded), _flatten(wanted)
    keys = [key for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]
    text = ", ".join(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_SAID: set[str] = set()
"""the start-over notices this process has printed (each once)."""


def compare_settings(path: Path, settings: Any, has_records: bool, *, out: Path, key: str | None = None,
                     out_option: str = "out_dir") -> bool:
    """Whether a run with ``settings`` resumes from the settings file ``path`` (its JSON, or its ``key`` entry, equal
    to them once stored as JSON). The one rule of every evaluation's resume, the run command's included:

    - no file: False (a fresh start; the caller writes it);
    - equal: True (the episodes recorded there are this run's);
    - different, and no episode record in ``out`` (``has_records``): False, said on stdout (tables committed without
      their records, or a run that never finished an episode, hold nothing to resume or mix with);
    - different, with records: ValueError naming the differences and the fix, before any work;
    - unreadable: ValueError naming the file and the fix.
    Changes nothing on disk.
    """
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
        recorded = recorded[key] if key is not None else recorded
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a settings file of this evaluation ({type(error).__name__}: {error}); use "
                         f"another {out_option}, or delete {out} to start over") from error
    wanted = json.loads(json.dumps(settings, allow_nan=True))  # compared as stored: tuples become lists
    if recorded == wanted:
        return True
    if not has_records:
        message = (f"{out} holds tables of other settings ({setting_differences(recorded, wanted)}) but no episode "
                   f"records; starting over there")
        if message not in _SAID:  # the run command checks before any work and again where it opens the directory
            _SAID.add(message)
            print(message, flush=True)
        return False
    raise ValueError(f"{out} holds episodes run with other settings ({setting_differences(recorded, wanted)}); use "
                     f"another {out_option}, or delete {out} to start over")


def check_records(out: Path, config, resume_free_keys: Sequence[str]) -> None:
    """Write the run's settings (outside ``resume_free_keys``: those that change no episode) beside the records, or
    refuse a rerun whose settings differ from those the recorded episodes were run with (:func:`compare_settings`).
    ``config``: a dataclass, or a JSON-able mapping."""
    hold_directory(out, "evaluation")  # one writer per results directory (come_rl.locks)
    items = config.items() if isinstance(config, Mapping) else dataclasses.asdict(config).items()
    settings = json.loads(json.dumps({k: v for k, v in items if k not in resume_free_keys}, allow_nan=True))
    records = Path(out) / RECORDS_DIR
    path = records / "run_config.json"
    if not compare_settings(path, settings, any(records.glob("*.npz")), out=Path(out)):
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
