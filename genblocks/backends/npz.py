"""Array (de)serialisation on open file objects: the numpy half of file I/O, no paths or files opened here.

``genblocks.io`` owns the files (temporary names, fsync, rename, gzip); this module only turns arrays into
bytes and back, because only ``backends/`` may import numpy.

- ``write_npz(f, arrays)``: ``arrays`` (name -> array-like) as an ``.npz`` archive into the binary file ``f``.
- ``read_npz(f)``: every array of the ``.npz`` in ``f`` as host arrays, ``allow_pickle=False`` (a file
  cannot run code); ``ValueError`` for a plain ``.npy`` or anything numpy cannot read as an archive.
- ``write_npy(f, array)`` / ``read_npy(f)``: one array as ``.npy`` (``allow_pickle=False`` both ways).
- ``write_npy_header(f, shape, dtype)`` then ``write_npy_rows(f, array)`` per block: one ``.npy`` written in
  blocks along its first axis, without holding the whole array (``genblocks.io.save_npy_blocks_atomic``).
- ``idx_array(raw, where)``: the array in the bytes of an IDX file (MNIST / Fashion-MNIST format).
"""

import struct

import numpy as onp

_IDX_TYPES = {0x08: onp.uint8, 0x09: onp.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def write_npz(f, arrays):
    onp.savez(f, **{k: onp.asarray(v) for k, v in arrays.items()})


def read_npz(f):
    data = onp.load(f, allow_pickle=False)
    if not isinstance(data, onp.lib.npyio.NpzFile):  # a plain .npy loads as an array, not an archive
        raise ValueError("not an .npz archive")
    with data:
        return {k: onp.array(data[k]) for k in data.files}


def write_npy(f, array):
    onp.save(f, onp.asarray(array), allow_pickle=False)


def write_npy_header(f, shape, dtype):
    """The ``.npy`` header of a C-ordered array of ``shape`` and ``dtype``; its data must follow in order."""
    header = {"descr": onp.lib.format.dtype_to_descr(onp.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    onp.lib.format.write_array_header_1_0(f, header)


def write_npy_rows(f, array):
    """The bytes of ``array`` (a host array) in C order, as the next rows of a ``.npy`` opened by
    ``write_npy_header``."""
    f.write(onp.ascontiguousarray(array).tobytes())


def read_npy(f):
    data = onp.load(f, allow_pickle=False)
    if isinstance(data, onp.lib.npyio.NpzFile):
        data.close()
        raise ValueError("an .npz archive, not a single .npy array")
    return onp.array(data)


def idx_array(raw, where):
    """The array in ``raw`` (bytes of an IDX file); ``where`` names the file in error messages."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"path: {where!r} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path: {where!r} is truncated (header needs {header} bytes, file has {len(raw)})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = onp.dtype(_IDX_TYPES[raw[2]])
    need = int(onp.prod(shape, dtype=onp.int64)) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"path: {where!r} holds {len(raw) - header} data bytes, its header promises {need}")
    return onp.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
