"""File I/O: the one place that opens, writes and renames files of arrays (the byte formats are in
``genblocks.backends.npz``, since only ``backends/`` imports numpy).

- ``write_atomic(path, write)`` and ``save_npz_atomic(path, arrays)``: write to a temporary file in the same
  folder, fsync, then rename into place, so a failed or interrupted write never leaves a half file under
  ``path``; the result honours the umask.
- ``load_npz(path)``: read every array eagerly with ``allow_pickle=False`` (a file cannot run code);
  truncated, foreign or corrupt files raise ``ValueError`` naming the path.
- ``save_npy_atomic(path, array)`` / ``load_npy(path)``: one array as ``.npy``, never unpickling.
- ``save_npy_blocks_atomic(path, shape, dtype, blocks)``: one ``.npy`` written block by block along the first
  axis (arrays larger than memory, e.g. from ``genblocks.distributed``), atomically, every row checked.
- ``save_npy_folder_atomic(folder, blocks)``: blocks as ``shard-00000.npy``, ... plus ``index.json``, the
  folder renamed into place when complete.
- ``read_idx(path)``: parse an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped).
"""

import gzip
import json
import os
import shutil
import tempfile
import zipfile

from genblocks.backends.npz import idx_array, read_npy, read_npz, write_npy, write_npy_header, write_npy_rows, write_npz

__all__ = ["write_atomic", "save_npz_atomic", "load_npz", "save_npy_atomic", "load_npy", "read_idx",
           "save_npy_blocks_atomic", "save_npy_folder_atomic"]


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


def _check_block(block, i, tail, dtype):
    if tuple(block.shape[1:]) != tuple(tail) or str(block.dtype) != str(dtype):
        raise ValueError(f"blocks: block {i} has shape {tuple(block.shape)} and dtype {block.dtype}; expected "
                         f"(rows, {', '.join(str(s) for s in tail)}) and {dtype}")
    return int(block.shape[0])


def save_npy_blocks_atomic(path, shape, dtype, blocks):
    """Write the host arrays ``blocks`` (consecutive rows, in order) as one ``.npy`` of ``shape`` and ``dtype``.

    Only one block is in memory at a time. The write is atomic (``write_atomic``): if a block has the wrong
    shape or dtype, or the rows do not add up to ``shape[0]`` (a gap or a duplicate), it raises ``ValueError``
    and ``path`` keeps what it held before. Returns the final path.
    """
    shape = tuple(int(s) for s in shape)

    def write(f):
        write_npy_header(f, shape, dtype)
        rows = 0
        for i, block in enumerate(blocks):
            rows += _check_block(block, i, shape[1:], dtype)
            if rows > shape[0]:
                break
            write_npy_rows(f, block)
        if rows != shape[0]:
            raise ValueError(f"blocks: expected {shape[0]} rows in all, got {rows if rows <= shape[0] else 'more'}")

    return write_atomic(path, write)


def save_npy_folder_atomic(folder, blocks, info=None):
    """Write the host arrays ``blocks`` as ``folder/shard-00000.npy``, ... and ``folder/index.json``.

    ``index.json`` holds the shape of the whole array, its dtype, each shard's rows and ``info`` (a JSON dict).
    The shards go to a temporary folder beside ``folder`` that is renamed into place once complete, so
    ``folder`` never holds part of a result; ``folder`` must not exist or be empty. Returns the final path.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"out: {folder!r} exists and is not an empty folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        rows, tail, dtype = [], None, None
        for i, block in enumerate(blocks):
            if tail is None:
                tail, dtype = tuple(block.shape[1:]), str(block.dtype)
            rows.append(_check_block(block, i, tail, dtype))
            save_npy_atomic(os.path.join(tmp, f"shard-{i:05d}.npy"), block)
        index = {"shape": [sum(rows), *(tail or ())], "dtype": dtype, "rows": rows, "info": info or {}}
        write_atomic(os.path.join(tmp, "index.json"), lambda f: f.write(json.dumps(index, indent=1).encode()))
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty (checked above)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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
