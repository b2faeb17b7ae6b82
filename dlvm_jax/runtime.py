"""Process-level settings for running dlvm_jax on a CPU.

XLA's CPU runtime allocates the temporaries of a compiled function at every call. On Linux, glibc's malloc serves
a large request from a worker thread's arena with a fresh ``mmap`` and returns it with ``munmap`` when the call
ends, so the next call page-faults the same memory in again and the kernel zeroes it: the conv VAE's train step
(batch 100, about 90 MB of temporaries) takes some 20,000 page faults a call. :func:`keep_freed_memory` makes
malloc keep freed memory for reuse instead. ``python -m benchmarks.profile_malloc`` measures what it changes, for
JAX and for PyTorch (whose eager mode gains more from it).
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that a process frees, for its next allocations, instead of returning it
    to the system: one arena for all threads, no ``mmap`` for large blocks, no trimming of the heap (``mallopt``;
    the same as ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment).
    Repeated calls of a jitted function then reuse their temporaries instead of page-faulting them in afresh.

    Call it first thing in a program, before JAX's first computation: threads that have allocated already keep
    their own arenas. The process's resident memory then stays near its peak until it exits, and all threads share
    one arena: measured on 2 cores, the conv VAE's train step ran 1.1x (one sample) to 1.3x (ten) faster, with its
    peak memory up from 1.1 to 2.1 GB at ten samples, while the small MLP VAE and GMVAE steps, which allocate
    little, ran up to 24% slower (the MLP VAE with one sample 1.16x faster in one profile, 0.86x in another;
    ``python -m benchmarks.profile_malloc``).
    Returns True where it applied (Linux with glibc), False elsewhere, where it changes nothing."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied
