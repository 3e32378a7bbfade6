"""``astra.tune_allocator``: keep freed memory in the process instead of returning it to the OS every forward.

An ASTRA forward on CPU allocates and frees the same tens of MB of temporaries in every layer. glibc's malloc
hands blocks above its (dynamic) mmap threshold back to the kernel at once and trims the heap's top whenever
more than its trim threshold is free there, so the next layer faults the same pages in again, zero-filled by
the kernel: measured on the benchmark's GPT-2 shape (2 ranks x 1 thread, T = 1024), 35k-140k page faults per
rank per forward and 7-8 % of the forward's time (bench/RESULTS.md, "Page faults"). The plain model's steadier
allocation pattern lets glibc's dynamic thresholds settle, so it gains little.

:func:`tune_allocator` fixes both thresholds through ``mallopt`` (Linux glibc only; elsewhere it does nothing
and says so), as PyTorch's CPU performance guide does by preloading jemalloc or tcmalloc. :func:`astra.launch`
calls it in every rank it starts; under torchrun call it once at the start of the script, or set
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912`` (a user's own
``GLIBC_TUNABLES`` / ``MALLOC_*_`` settings are left as they are).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from astra_kernels.checks import is_count

#: blocks at least this large are still mmapped per allocation (and returned at once when freed); 32 MiB is
#: the largest value every glibc accepts (older ones refuse more than half their 64 MiB arena heap)
MMAP_THRESHOLD_BYTES = 32 << 20
#: free memory at the heap's top kept in the process, up to this much
TRIM_THRESHOLD_BYTES = 512 << 20
#: the largest threshold mallopt takes (its value is a C int)
MAX_THRESHOLD_BYTES = 2**31 - 1
#: glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: environment variables through which a user already configures glibc's malloc
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES) -> str:
    """Fix glibc malloc's mmap and trim thresholds for this process (see the module docstring).

    Returns what was done, one line: ``"tuned"`` or why nothing was (not glibc, or the user's own settings in
    the environment). Raises ValueError for a threshold that is not a positive int (no sense in a partial
    change: nothing is set then)."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not is_count(v, 1) or v > MAX_THRESHOLD_BYTES:
            raise ValueError(f"tune_allocator: {name} must be an int in 1..{MAX_THRESHOLD_BYTES} (bytes; mallopt "
                             f"takes a C int), got {v!r}")
    user = [k for k in USER_SETTINGS if k in os.environ and (k != "GLIBC_TUNABLES" or "malloc" in os.environ[k])]
    if user:
        return f"left as configured by {', '.join(user)}"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return f"not glibc ({sys.platform}): allocator left as it is"
    refused = [name for name, param, v in (("mmap_threshold", _M_MMAP_THRESHOLD, mmap_threshold),
                                           ("trim_threshold", _M_TRIM_THRESHOLD, trim_threshold))
               if not mallopt(param, v)]
    return f"glibc refused {', '.join(refused)}" if refused else "tuned"


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):      # glibc only (musl's mallopt ignores every parameter)
        return None
    fn = libc.mallopt
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lambda param, value: fn(param, value) == 1
