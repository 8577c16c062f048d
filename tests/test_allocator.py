"""benchmarks/allocator.py: the opt-in malloc setting the benchmarks use (run in a subprocess: it is process-wide)."""

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from allocator import keep_freed_memory  # noqa: E402

SCRIPT = """
import resource, numpy as np
from allocator import keep_freed_memory

def faults_per_step(steps=20):
    # a pure Adam-like update of an MLP's weights: fresh moments and parameters every step
    p = [np.ones(s, dtype=np.float32) for s in [(64, 512), (512,), (512, 512), (512,), (512, 64), (64,)]]
    m = [0.0 * a for a in p]
    v = [0.0 * a for a in p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        g = [0.5 * a for a in p]
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v = [0.999 * a + 0.001 * (b * b) for a, b in zip(v, g)]
        p = [a - 1e-3 * (b / 0.1) / (np.sqrt(c / 0.01) + 1e-8) for a, b, c in zip(p, m, v)]
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

default = faults_per_step()
applied = keep_freed_memory()
faults_per_step()  # the first round fills the heap
print(applied, default, faults_per_step())
"""


def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, cwd=BENCHMARKS)
    out = out.stdout.split()
    applied, default, tuned = out[0] == "True", float(out[1]), float(out[2])
    assert applied  # glibc on every machine we test on
    assert default > 500  # about 1.4 MiB of parameters: 350 pages, faulted in again and again
    assert tuned < 0.1 * default


def test_bad_arguments():
    with pytest.raises(ValueError, match="mmap_threshold_mb: expected a positive int"):
        keep_freed_memory(mmap_threshold_mb=0)
    with pytest.raises(ValueError, match="trim_threshold_mb: expected a positive int"):
        keep_freed_memory(trim_threshold_mb=1.5)
