"""File I/O: the one place that opens, writes and renames files of arrays (the byte formats are in
``genblocks.backends.npz``, since only ``backends/`` imports numpy).

- ``write_atomic(path, write)`` and ``save_npz_atomic(path, arrays)``: write to a temporary file in the same
  folder, fsync, then rename into place, so a failed or interrupted write never leaves a half file under
  ``path``; the result honours the umask.
- ``load_npz(path)``: read every array eagerly with ``allow_pickle=False`` (a file cannot run code);
  truncated, foreign or corrupt files raise ``ValueError`` naming the path.
- ``save_npy_atomic(path, array)`` / ``load_npy(path)``: one array as ``.npy``, never unpickling.
- ``read_idx(path)``: parse an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped).
"""

import gzip
import os
import tempfile
import zipfile

from genblocks.backends.npz import idx_array, read_npy, read_npz, write_npy, write_npz

__all__ = ["write_atomic", "save_npz_atomic", "load_npz", "save_npy_atomic", "load_npy", "read_idx"]


def _umask():
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path, write):
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same folder, fsync, rename.

    A failed or interrupted write never leaves a half file under ``path``; the file gets the permissions a
    plain ``open(path, "wb")`` would (0o666 minus the umask), not the temporary file's 0o600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_npz_atomic(path, arrays):
    """Write ``arrays`` (name -> array-like) to ``path`` atomically (``write_atomic``); returns the final path."""
    return write_atomic(path, lambda f: write_npz(f, arrays))


def _read(path, reader, what):
    """``reader(file)`` on the file at ``path``; FileNotFoundError / ValueError naming the path otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no file at {path!r}")
    try:
        with open(path, "rb") as f:
            return reader(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"path: {path!r} is not a readable {what} ({err})") from err


def load_npz(path):
    """All arrays of the ``.npz`` at ``path`` as a dict of host arrays (never unpickles)."""
    return _read(path, read_npz, "genblocks .npz file")


def save_npy_atomic(path, array):
    """Write one array to ``path`` as ``.npy`` atomically (``write_atomic``); returns the final path."""
    return write_atomic(path, lambda f: write_npy(f, array))


def load_npy(path):
    """The array in the ``.npy`` file at ``path`` (never unpickles: object arrays are refused)."""
    return _read(path, read_npy, ".npy array file")


def read_idx(path):
    """The array stored in the IDX file at ``path`` (``.gz`` is decompressed)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    return idx_array(raw, path)
