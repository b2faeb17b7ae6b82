"""Memory settings for running dlvm_jax on a CPU: process-wide (keep_freed_memory) or per compiled function.

XLA's CPU runtime allocates the temporaries of a compiled function at every call. On Linux, glibc's malloc serves
a large request from a worker thread's arena with a fresh ``mmap`` and returns it with ``munmap`` when the call
ends, so the next call page-faults the same memory in again and the kernel zeroes it: the conv VAE's train step
(batch 100, about 90 MB of temporaries) takes some 20,000 page faults a call. :func:`keep_freed_memory` makes
malloc keep freed memory for reuse instead, for the whole process. ``python -m benchmarks.profile_malloc``
measures what it changes, for JAX and for PyTorch (whose eager mode gains more from it).

:func:`jit_reusing_temporaries` (what :func:`dlvm_jax.train.make_train_step` compiles with) leaves the allocator
alone and changes what XLA asks of it: the temporaries come in heaps of at most :data:`TEMP_HEAP_BYTES` instead of
one block, under glibc's largest ``mmap`` threshold, so that malloc keeps them for the next call. Only partly:
glibc still returns a heap to the system when a whole per-thread sub-heap (64 MiB) falls free or its free top
exceeds the trim threshold, so some calls, or in some processes every call, still fault part of the temporaries
in (the conv VAE's step: 0 faults in most calls of most runs, ~6,100 a call in others, against ~20,000).

For a loss that is a mean over examples, :func:`dlvm_jax.objectives.microbatched` shrinks the temporaries
themselves (the activations of one microbatch instead of the batch's), which glibc's defaults then recycle
reliably (``python -m benchmarks.profile_microbatch``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import platform
import re
from typing import Any, Callable

import jax

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


# ----------------------------------------------------------------------------------------------------------------
# Temporaries in heaps that glibc recycles (a compiler option; the process's allocator is left alone)
# ----------------------------------------------------------------------------------------------------------------

#: The most bytes of temporaries that XLA:CPU puts in one heap (``xla_multiheap_size_constraint_per_heap``) for
#: :func:`jit_reusing_temporaries`. XLA otherwise places all of a computation's temporaries in one block, 77 MB for
#: the conv VAE's train step, which glibc serves with a fresh ``mmap`` at every call (anything over its dynamic
#: threshold, at most 32 MiB). Heaps under that threshold come back from malloc's free lists instead. 20, 24 and
#: 28 MiB measured on that step's gradient (2 cores, ``python -m benchmarks.profile_heaps``): 24 MiB the fastest
#: in the first sweep, 28 MiB still page-faulting 13,800 times a call in every sweep.
#: 0 leaves XLA's single block (what ``python -m benchmarks.profile_malloc`` compares against).
TEMP_HEAP_BYTES = 24 << 20
_HEAP_OPTION = "xla_multiheap_size_constraint_per_heap"
_TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z]+(\d+)>")


def largest_array_bytes(module_text: str) -> int:
    """Bytes of the largest array type in a (StableHLO) module's text; 0 if it has none but scalars."""
    sizes = [math.prod(int(d) for d in dims.rstrip("x").split("x")) * -(-int(bits) // 8)
             for dims, bits in _TENSOR.findall(module_text)]
    return max(sizes, default=0)


def temp_heap_options(lowered: Any, *, platform: str | None = None) -> dict[str, int]:
    """Compiler options that split a lowered computation's temporaries into heaps of :data:`TEMP_HEAP_BYTES` on
    XLA's CPU backend: ``{}`` on other platforms, and for a computation with an array over that size (such an array
    is ``mmap``-ed whatever the heaps, and XLA would log a warning for each at compile time)."""
    platform = platform or jax.default_backend()
    if TEMP_HEAP_BYTES <= 0 or platform != "cpu" or largest_array_bytes(lowered.as_text()) > TEMP_HEAP_BYTES:
        return {}
    return {_HEAP_OPTION: TEMP_HEAP_BYTES}


class jit_reusing_temporaries:  # noqa: N801 (used like jax.jit)
    """``jax.jit(fun, **jit_kwargs)``, compiled at its first call with :func:`temp_heap_options` for the arguments
    of that call, so that on a CPU repeated calls reuse the memory of their temporaries instead of page-faulting it
    in afresh (see the module's notes for when glibc still returns them). Measured on 2 cores
    (``python -m benchmarks.profile_heaps``, three sweeps): the conv VAE's gradient (batch 100, one sample) in
    60-89 ms instead of 80-120 (medians of 20 repeats), 0-10,500 page faults a call in the median against 19,800;
    its train step in the benchmark's workers, four interleaved pairs, 7.7-12.0 steps/s against 6.7-10.4 on a
    noisy host. Later calls with other shapes compile with the same options; ``lower``
    works as for ``jax.jit``."""

    def __init__(self, fun: Callable, **jit_kwargs: Any) -> None:
        self._fun, self._jit_kwargs = fun, jit_kwargs
        self._jitted: Any = None
        functools.update_wrapper(self, fun)

    def _jit_for(self, *args: Any) -> Any:
        if self._jitted is None:
            plain = jax.jit(self._fun, **self._jit_kwargs)
            options = temp_heap_options(plain.lower(*args))
            self._jitted = jax.jit(self._fun, compiler_options=options, **self._jit_kwargs) if options else plain
        return self._jitted

    def __call__(self, *args: Any) -> Any:
        return (self._jitted or self._jit_for(*args))(*args)

    def lower(self, *args: Any) -> Any:
        return self._jit_for(*args).lower(*args)
