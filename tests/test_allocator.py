"""astra.tune_allocator: glibc keeps freed memory (no page faults when a freed block is allocated again), the
user's own malloc settings win, bad thresholds are refused, and astra.launch tunes its ranks (opt-out too)."""
import os
import platform
import subprocess
import sys

import pytest

import astra
from astra import allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="glibc malloc (Linux) only")

def second_touch_faults(rank=None) -> int:
    """malloc + touch 16 MB, free, malloc + touch 16 MB again: the second touch's page faults. Untuned glibc
    returns the first block to the kernel (it was mmapped) and takes the second from a freshly grown heap:
    ~4096 faults. Tuned, the second block reuses the kept pages. (``rank``: so that astra.launch can run it.)"""
    import ctypes
    import resource

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 16 << 20
    for _ in range(2):
        p = libc.malloc(n)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(p, 1, n)
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        libc.free(p)
    return f1 - f0


#: a fresh interpreter, tuned or not (argv[3]), prints second_touch_faults()
FRESH = """import sys
sys.path[:0] = sys.argv[1:3]
if sys.argv[3] == "tuned":
    from astra.allocator import tune_allocator
    assert tune_allocator() == "tuned"
from test_allocator import second_touch_faults
print(second_touch_faults())
"""


def _second_touch_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    paths = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(astra.__file__))]
    out = subprocess.run([sys.executable, "-c", FRESH, *paths, mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@glibc
def test_tuned_glibc_reuses_a_freed_block_without_faulting_it_in_again():
    pages = (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    untuned, tuned = _second_touch_faults("default"), _second_touch_faults("tuned")
    assert untuned > pages // 2, f"untuned glibc faulted only {untuned} pages (the test's premise)"
    assert tuned < pages // 50, f"tuned glibc faulted {tuned} of {pages} pages of a reused block"


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "64", 2**31])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="an int in 1..2147483647"):
        astra.tune_allocator(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        astra.tune_allocator(trim_threshold=bad)


def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4096")
    assert astra.tune_allocator() == "left as configured by GLIBC_TUNABLES"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")      # not a malloc setting
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    assert astra.tune_allocator() == "left as configured by MALLOC_TRIM_THRESHOLD_"


@glibc
@pytest.mark.parametrize("tune", [True, False])
def test_launch_tunes_its_ranks_unless_told_not_to(tune, monkeypatch):
    for k in allocator.USER_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    faults = astra.launch(second_touch_faults, 2, tune_allocator=tune, timeout=60, join_timeout=120)
    pages = (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    if tune:
        assert max(faults) < pages // 50, faults
    else:
        assert min(faults) > pages // 2, faults
