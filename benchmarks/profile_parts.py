"""Where a step's time goes: BLAS calls, the fixed per-call cost, elementwise passes, page faults.

``profile_parts(step, fixed_step)`` splits the median time of ``step()`` into parts that can be measured
apart, so a claimed speed-up names the part it shrank:

- **BLAS**: every ``numpy.matmul`` the step makes is recorded (its operands, with their layout: a
  transposed view stays a transposed view) and replayed alone; their median time is the BLAS part.
- **fixed cost**: ``fixed_step`` is the same computation on 1-wide arrays (same layers, same calls, almost
  no arithmetic); its time is what the step pays per call whatever the size: Python, autograd's tracing,
  numpy's dispatch and small allocations.
- **elementwise + memory**: the rest (total - BLAS - fixed): the passes over the arrays (activations,
  their derivatives, the optimizer's updates, copies) and the faults on fresh memory.

Beside them: minor page faults per step (``getrusage``; a fresh large array faults in page by page, so
this counts the allocation that reaches the kernel), and Python function calls per step (cProfile).
numpy's ufuncs (matmul included) are invisible to cProfile, hence the replay rather than a profiler.
"""

import cProfile
import pstats
import resource
import statistics
import time

import numpy as np


def _median_ms(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def record_matmuls(step):
    """The operand pairs of every ``numpy.matmul`` call made by one ``step()`` (copies, same layout)."""
    calls, original = [], np.matmul

    def recording(a, b, *args, **kwargs):
        calls.append((_same_layout_copy(a), _same_layout_copy(b)))
        return original(a, b, *args, **kwargs)

    np.matmul = recording
    try:
        step()
    finally:
        np.matmul = original
    return calls


def _same_layout_copy(a):
    a = np.asarray(a)
    if a.ndim == 2 and a.flags.f_contiguous and not a.flags.c_contiguous:
        return np.asfortranarray(a)  # a transposed view: BLAS sees it transposed
    return np.array(a)


def profile_parts(step, fixed_step, n=30):
    """{part: value} for one step: ms of the whole, of BLAS, of the fixed cost and of the rest; faults and
    Python calls per step. Parts are medians over ``n`` calls, each measured apart, so they need not
    add up exactly; the rest is the difference."""
    for _ in range(3):
        step()
        fixed_step()
    total = _median_ms(step, n)
    calls = record_matmuls(step)
    blas = _median_ms(lambda: [np.matmul(a, b) for a, b in calls], n) if calls else 0.0
    fixed = _median_ms(fixed_step, n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        step()
    prof.disable()
    py_calls = pstats.Stats(prof).total_calls / 5
    return {"total": total, "blas": blas, "n_blas": len(calls), "fixed": fixed,
            "rest": max(total - blas - fixed, 0.0), "faults": faults, "py_calls": py_calls}


HEADER = (f"{'part':<22} {'total':>7} {'BLAS':>7} {'(calls)':>7} {'fixed':>7} {'elem+mem':>8} "
          f"{'faults':>7} {'py calls':>8}")


def format_parts(name, p):
    """One table row: ms columns, then page faults and Python calls per step."""
    return (f"{name:<22} {p['total']:>7.3f} {p['blas']:>7.3f} {p['n_blas']:>7d} {p['fixed']:>7.3f} "
            f"{p['rest']:>8.3f} {p['faults']:>7.0f} {p['py_calls']:>8.0f}")


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
