"""Keep freed activation memory in the process instead of handing it back to the kernel.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above its mmap
threshold (at most 32 MB) with a fresh `mmap` and returns it with `munmap` when freed, and trims
the top of the heap when much of it is free. A distillation or evaluation step allocates and
frees the same few hundred MB of activations every step, so each step paid for them again in
page faults: ~400,000 minor faults and ~0.6 s of system time per DM step, a third of the step
(benchmarks/bench_speed.py prints the faults and system time per step).

`keep_freed_memory` tells glibc to serve large blocks from the heap and never trim it, so freed
activations are reused by the next step, as a caching allocator would (PyTorch's CUDA allocator
does the same on the GPU). The cost: the process keeps its peak heap until it exits. It is
process-wide and idempotent; the engine calls it when a distiller, evaluator or expert trainer
is built. Set MIM4DD_MALLOC=default to leave malloc alone. Other C libraries: a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MIM4DD_MALLOC"

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free top-of-heap

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process (see the module doc); True when it is in effect."""
    global _applied
    if _applied is None:
        _applied = _tune()
    return _applied


def _tune() -> bool:
    if os.environ.get(ENV, "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both must hold, or the heap would still be trimmed.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
