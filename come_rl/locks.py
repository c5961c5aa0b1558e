"""One writer per directory: a run that writes results or checkpoints into a directory holds ``<dir>/.come_rl.lock``.

    lock = hold_directory(out_dir, "come_rl.run")   # held until release() or the process ends

A second process that asks for the same directory while the holder lives is refused at once with the holder's pid and
command; a lock whose process is gone (a killed run) is taken over with a warning, so a rerun after a crash needs no
manual clean-up. The lock file is created with ``O_CREAT | O_EXCL`` (two starters cannot both win) and holds the pid,
the host and the command line as JSON. Locks are per host: a lock written on another host (a shared disk) is
respected unless ``COME_RL_BREAK_LOCKS=1``.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import warnings
from pathlib import Path

from come_rl.io_utils import explain_write_error

LOCK_NAME = ".come_rl.lock"
_held: dict[Path, "DirectoryLock"] = {}


class DirectoryBusyError(RuntimeError):
    """Another live process writes into the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class DirectoryLock:
    def __init__(self, directory: Path, what: str):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self.held = False

    def acquire(self) -> DirectoryLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise explain_write_error(self.path, error) from error
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                             "command": " ".join(sys.argv)})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as error:
                raise explain_write_error(self.path, error) from error
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
            self.held = True
            return self
        raise DirectoryBusyError(f"could not take {self.path} after 3 tries (another process keeps taking it)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        same_host = host in (None, socket.gethostname())
        if isinstance(pid, int) and pid == os.getpid() and same_host:
            raise DirectoryBusyError(f"{self.directory} is already held by this process ({holder.get('what')}); "
                                     f"one writer per directory: use another output directory")
        if isinstance(pid, int) and (_alive(pid) if same_host else os.environ.get("COME_RL_BREAK_LOCKS") != "1"):
            raise DirectoryBusyError(
                f"{self.directory} is in use by another run: pid {pid} on {host} ({holder.get('what')}: "
                f"{holder.get('command', '?')}). Wait for it to finish, stop it, or write elsewhere (another out_dir / "
                f"out=); if that process is gone (a crashed host), delete {self.path}")
        warnings.warn(f"taking over the stale lock {self.path} (its process {pid} on {host} is gone: a killed run)",
                      stacklevel=3)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            try:
                holder = json.loads(self.path.read_text())
                if holder.get("pid") == os.getpid():
                    self.path.unlink(missing_ok=True)
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False
        _held.pop(self.directory.resolve(), None)


def hold_directory(directory: str | os.PathLike, what: str) -> DirectoryLock:
    """Hold ``directory`` for this process (idempotent for a directory it already holds); released at exit."""
    key = Path(directory).resolve()
    if key in _held:
        return _held[key]
    lock = DirectoryLock(Path(directory), what).acquire()
    _held[key] = lock
    return lock


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
