"""Opt-in allocator setting for numpy-heavy training loops: reuse freed memory instead of faulting it in.

A benchmark helper, not part of the package: scripts next to this file ``from allocator import ...``.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB to start, raised dynamically up to 32 MiB)
with fresh ``mmap`` pages and gives freed heap tops back to the OS above ``M_TRIM_THRESHOLD``. A pure
training step allocates new parameter, moment and gradient arrays every step, so each step can pay a
page fault per 4 KiB of every large temporary: measured 2,400 minor faults and 3.7 ms for one pure Adam
update of a 64-512-512-64 MLP in float32, against 33 faults and 1.3 ms with the settings below.

``keep_freed_memory()`` raises both thresholds so that freed blocks stay in the heap and are reused. It
is process-wide (it changes malloc for every library in the process), so genblocks never calls it on
its own: a training script or benchmark opts in (copy this file next to your own script). The cost is
a resident set that stays near its peak. On anything but glibc it does nothing and returns False.
"""

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: AttributeError elsewhere
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(mmap_threshold_mb=32, trim_threshold_mb=512):
    """Serve blocks below ``mmap_threshold_mb`` from the heap and keep up to ``trim_threshold_mb`` freed.

    Returns True when the setting was applied (glibc), False otherwise. 32 MiB is glibc's own ceiling
    for its dynamic threshold, so this only skips the warm-up and stops trimming from undoing it.
    """
    for name, value in (("mmap_threshold_mb", mmap_threshold_mb), ("trim_threshold_mb", trim_threshold_mb)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int (MiB), got {value!r}")
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20) == 1 and ok
    return ok
