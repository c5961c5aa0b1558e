"""Small file helpers: atomic writes, hashing, and a pickle loader that cannot run code.

Every writer here writes to a temporary file in the destination's directory and then renames it
over the destination with `os.replace`, so a reader never sees a half-written file (a crash leaves
either the old file or the new one, plus at worst a stray `*.tmp`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike


class WriteError(OSError):
    """A file could not be written (full disk, read-only or unwritable directory); the message names the path, what
    it needed and the fix. The previous file at the path, if any, is intact and no temporary file is left."""


WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def explain_write_error(path: PathLike, error: OSError, needed_bytes: int | None = None) -> OSError:
    """``error`` from writing ``path`` as a :class:`WriteError` that says what went wrong and how to fix it (other
    errors are returned unchanged)."""
    reason = WRITE_ERRNOS.get(getattr(error, "errno", None))
    if reason is None:
        return error
    destination = Path(path)
    directory = destination.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    need = f"it needed {needed_bytes / 1e6:.2f} MB" if needed_bytes is not None else "it needed more"
    have = f", {free / 1e6:.2f} MB are free there" if free is not None else ""
    fix = ("free space on that disk or write elsewhere (another out_dir / out=)" if error.errno in (errno.ENOSPC,
           errno.EDQUOT) else "make the directory writable or write elsewhere (another out_dir / out=)")
    exists = "its previous content is intact" if destination.exists() else "nothing was written there"
    return WriteError(error.errno, f"cannot write {destination}: {reason} ({need}{have}); {exists} and no temporary "
                                   f"file is left; {fix}")


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory, then `os.replace`).

    Parent directories are created. Returns the destination as a `Path`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}; encode text first "
                        "or use atomic_write_text")
    destination = Path(path)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the destination so that os.replace is a rename on one filesystem (atomic).
        file_descriptor, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                                      suffix=".tmp")
    except OSError as error:
        raise explain_write_error(destination, error, len(data)) from error
    try:
        # mkstemp creates 0600 files; keep the destination's mode, or use the usual 0644 for new files.
        os.chmod(temp_name, destination.stat().st_mode & 0o777 if destination.exists() else 0o644)
        with os.fdopen(file_descriptor, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, destination)
    except BaseException as error:
        # Leave no stray temp file behind on failure; the destination keeps its old content.
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise explain_write_error(destination, error, len(data)) from error
        raise
    return destination


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_write_bytes`)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_npz(path: PathLike, **arrays: Any) -> Path:
    """Save arrays to a compressed `.npz` at `path` atomically.

    `path` should end in `.npz` (numpy would otherwise append it to the temporary name, so we insist).
    Each keyword becomes one array in the archive; load with `np.load(path)` (no pickle needed for
    numeric arrays, and object arrays are refused so loading never needs `allow_pickle=True`).
    """
    destination = Path(path)
    if destination.suffix != ".npz":
        raise ValueError(f"atomic_save_npz: path must end in '.npz', got {str(destination)!r}; "
                         f"use {str(destination.with_suffix('.npz'))!r}")
    if not arrays:
        raise ValueError("atomic_save_npz: give at least one array as a keyword, e.g. frames=array")
    for name, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise ValueError(f"atomic_save_npz: array {name!r} has dtype object, which would need pickle to "
                             "load; convert it to a numeric or string array first")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(destination, buffer.getvalue())


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 digest of the file at `path`, read in chunks (large weight files stay out of memory)."""
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"sha256_file: no such file {str(file_path)!r}")
    digest = hashlib.sha256()
    with open(file_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# (module, name) pairs a numpy-only pickle needs. Plain containers (dict, list, tuple, str, int,
# float, bool, None, bytes) are built by pickle opcodes directly and never go through find_class.
_ALLOWED_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    # ndarray reconstruction (numpy < 2 writes numpy.core, numpy >= 2 writes numpy._core)
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    # protocol 5 pickles arrays as _frombuffer(buffer, dtype, shape, order)
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "dtype"),
    # numpy scalars such as np.float32(1.0)
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # protocol 0-2 pickles made by Python 3 store bytes as _codecs.encode(str, 'latin1')
    ("_codecs", "encode"),
})


def _is_allowed_numpy_dtype_class(module: str, name: str) -> bool:
    # numpy >= 1.25 may pickle dtypes by their class, e.g. numpy.dtypes.Float32DType.
    return module == "numpy.dtypes" and name.endswith("DType") and name.isidentifier()


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle refused because loading it would call something other than numpy's reconstruction helpers.

    A subclass so that callers can tell a refused (possibly malicious) file from a damaged one, which they may want to
    report with a different fix; both remain `pickle.UnpicklingError`s.
    """


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` admits only the numpy reconstruction helpers listed above."""

    def __init__(self, file: IO[bytes], source_name: str) -> None:
        super().__init__(file)
        self._source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_PICKLE_GLOBALS or _is_allowed_numpy_dtype_class(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {self._source_name}: it references {module}.{name}, but only numpy arrays, "
            "numpy scalars and plain containers (dict, list, tuple, str, int, float, bool, None) are "
            "allowed, because unpickling anything else can run arbitrary code. If you trust this file and "
            "it is legitimately different, convert it to .npz or safetensors first."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to load {self._source_name}: it uses persistent ids "
                                "(e.g. a torch.save file); only plain numpy pickles are allowed")


def safe_pickle_load(path_or_file: PathLike | IO[bytes]) -> Any:
    """Load a pickle that may contain only numpy arrays/dtypes/scalars and plain containers.

    Anything else (classes, functions, `os.system`, torch storages) raises `UnsafePickleError` (a
    `pickle.UnpicklingError`) naming the file and the refused global, before any of it is executed. A truncated or
    damaged file raises a plain `pickle.UnpicklingError` naming the file.

    Args:
        path_or_file: a path, or a binary file object opened for reading.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        file_path = Path(path_or_file)
        if not file_path.is_file():
            raise FileNotFoundError(f"safe_pickle_load: no such file {str(file_path)!r}")
        with open(file_path, "rb") as handle:
            return _load_checked(handle, repr(str(file_path)))
    if not hasattr(path_or_file, "read"):
        raise TypeError(f"safe_pickle_load expects a path or a binary file object, got "
                        f"{type(path_or_file).__name__}")
    return _load_checked(path_or_file, repr(getattr(path_or_file, "name", "<file object>")))


def _load_checked(handle: IO[bytes], source_name: str) -> Any:
    try:
        return _NumpyOnlyUnpickler(handle, source_name).load()
    except UnsafePickleError:
        raise
    except Exception as error:
        # A damaged pickle fails inside pickle or numpy with almost any exception type, and pickle's own errors
        # ("pickle data was truncated") do not say which file; every one of them means the same thing here.
        raise pickle.UnpicklingError(f"could not read {source_name} as a numpy pickle ({type(error).__name__}: "
                                     f"{error}); the file is truncated, corrupt or not a pickle") from error
