"""Host file I/O, the one place outside the array code that touches numpy files directly.

- ``save_npz_atomic(path, arrays)``: write a ``.npz`` to a temporary file in the same folder, fsync, then
  rename into place, so a failed or interrupted write never leaves a half file under ``path``.
- ``load_npz(path)``: read every array eagerly with ``allow_pickle=False`` (a file cannot run code);
  truncated, foreign or corrupt files raise ``ValueError`` naming the path.
- ``read_idx(path)``: parse an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped).
"""

import gzip
import os
import struct
import tempfile
import zipfile

import numpy as onp

_IDX_TYPES = {0x08: onp.uint8, 0x09: onp.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def save_npz_atomic(path, arrays):
    """Write ``arrays`` (name -> array-like) to ``path`` atomically; returns the final path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            onp.savez(f, **{k: onp.asarray(v) for k, v in arrays.items()})
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
        data = onp.load(path, allow_pickle=False)
        if not isinstance(data, onp.lib.npyio.NpzFile):  # a plain .npy loads as an array, not an archive
            raise ValueError("not an .npz archive")
        with data:
            return {k: onp.array(data[k]) for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"path: {path!r} is not a readable genblocks .npz file ({err})") from err


def read_idx(path):
    """The array stored in the IDX file at ``path`` (``.gz`` is decompressed)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"path: {path!r} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path: {path!r} is truncated (header needs {header} bytes, file has {len(raw)})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = onp.dtype(_IDX_TYPES[raw[2]])
    need = int(onp.prod(shape, dtype=onp.int64)) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"path: {path!r} holds {len(raw) - header} data bytes, its header promises {need}")
    return onp.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
