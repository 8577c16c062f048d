"""File I/O: the one place that opens, writes and renames files of arrays (the byte formats are in
``genblocks.backends.npz``, since only ``backends/`` imports numpy).

- ``save_npz_atomic(path, arrays)``: write a ``.npz`` to a temporary file in the same folder, fsync, then
  rename into place, so a failed or interrupted write never leaves a half file under ``path``.
- ``load_npz(path)``: read every array eagerly with ``allow_pickle=False`` (a file cannot run code);
  truncated, foreign or corrupt files raise ``ValueError`` naming the path.
- ``read_idx(path)``: parse an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped).
"""

import gzip
import os
import tempfile
import zipfile

from genblocks.backends.npz import idx_array, read_npz, write_npz

__all__ = ["save_npz_atomic", "load_npz", "read_idx"]


def save_npz_atomic(path, arrays):
    """Write ``arrays`` (name -> array-like) to ``path`` atomically; returns the final path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_npz(path):
    """All arrays of the ``.npz`` at ``path`` as a dict of host arrays (never unpickles)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no file at {path!r}")
    try:
        with open(path, "rb") as f:
            return read_npz(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"path: {path!r} is not a readable genblocks .npz file ({err})") from err


def read_idx(path):
    """The array stored in the IDX file at ``path`` (``.gz`` is decompressed)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    return idx_array(raw, path)
