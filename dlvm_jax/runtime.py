"""Settings for running dlvm_jax on a CPU: memory, process-wide (keep_freed_memory) or per compiled function, and
the library for a compiled function's matrix products (tuned_jit).

XLA's CPU runtime allocates the temporaries of a compiled function at every call. On Linux, glibc's malloc serves
a large request from a worker thread's arena with a fresh ``mmap`` and returns it with ``munmap`` when the call
ends, so the next call page-faults the same memory in again and the kernel zeroes it: the conv VAE's train step
(batch 100, about 90 MB of temporaries) takes some 20,000 page faults a call. :func:`keep_freed_memory` makes
malloc keep freed memory for reuse instead, for the whole process. ``python -m benchmarks.profile_malloc``
measures what it changes, for JAX and for PyTorch (whose eager mode gains more from it).

:class:`tuned_jit` (what :func:`dlvm_jax.train.make_train_step` compiles with) leaves the allocator alone and
changes what XLA asks of it: the temporaries come in heaps of at most :data:`TEMP_HEAP_BYTES` instead of
one block, under glibc's largest ``mmap`` threshold, so that malloc keeps them for the next call. Only partly:
glibc still returns a heap to the system when a whole per-thread sub-heap (64 MiB) falls free or its free top
exceeds the trim threshold, so some calls, or in some processes every call, still fault part of the temporaries
in (the conv VAE's step: 0 faults in most calls of most runs, ~6,100 a call in others, against ~20,000).

For a loss that is a mean over examples, :func:`dlvm_jax.objectives.microbatched` shrinks the temporaries
themselves (the activations of one microbatch instead of the batch's), which glibc's defaults then recycle
reliably (``python -m benchmarks.profile_microbatch``).

:class:`tuned_jit` also keeps at most :data:`CPU_MAX_IN_FLIGHT` calls of a computation over several CPU devices
in flight: more than about 32 abort the process in jaxlib 0.10.2 (see there).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import statistics
import time
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
#: :class:`tuned_jit`. XLA otherwise places all of a computation's temporaries in one block, 77 MB for
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


# ----------------------------------------------------------------------------------------------------------------
# The library that runs the matrix products on a CPU, chosen by timing both
# ----------------------------------------------------------------------------------------------------------------

#: Which library runs the matrix products of a computation compiled by :class:`tuned_jit` on XLA's CPU backend:
#: ``"ynnpack"`` (XLA's default in jaxlib 0.10: each dot a YNNPACK fusion), ``"eigen"`` (XLA's own dot thunks,
#: which call Eigen; the XLA option ``xla_cpu_experimental_ynn_fusion_type`` set empty), or ``"auto"``: time both
#: on the first call's arguments and keep the faster. Neither wins everywhere. Measured on 2 cores, both ways in one
#: process, alternating (``python -m benchmarks.profile_dots``), YNNPACK's time over Eigen's: the MLP VAE's train step
#: (batch 100) 1.013 with one sample and 0.774 with ten, the conv VAE's (whose convolutions are dots on patches)
#: 0.512, the GMVAE's 1.096 and 0.930, the MLP VAE's K=5000 IS estimate 1.145.
#: The two differ in round-off, so ``"auto"`` may give results that differ in the last bits from process to process
#: where the two run about as fast; fix the choice for bitwise-reproducible runs. Read from the environment variable
#: ``DLVM_CPU_DOTS`` at import (default ``"auto"``).
CPU_DOTS = os.environ.get("DLVM_CPU_DOTS", "auto")
#: ``"auto"`` times both only for computations of at least this many FLOPs (XLA's count for the lowered
#: computation): below it, a step is too short for the choice to matter and the second compilation would cost more
#: than it saves (the tests' small models).
TUNE_MIN_FLOPS = 2e7
#: How long ``"auto"`` times each of the two compiled variants, seconds: after one call each to warm up, at least
#: ``_TUNE_MIN_CALLS`` calls each, unless the calls take over ``4 * TUNE_SECONDS`` in all (then one may be enough).
TUNE_SECONDS = 0.25
_TUNE_MIN_CALLS, _TUNE_MAX_CALLS = 5, 40
_DOT_OPTIONS = {"ynnpack": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}
#: Choices made in this process, by fingerprint of the lowered computation and its other options, so that the same
#: computation always runs the same way in one process (and is timed once).
_chosen: dict[str, str] = {}


def _flops(lowered: Any) -> float:
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 (a backend without a cost model: no tuning)
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _median_call_seconds(calls: dict[str, Callable[[], Any]], fresh_args: Callable[[], tuple]) -> dict[str, float]:
    """Median seconds of a call of each of ``calls[name](*args)`` (each waited for), alternating between them, on
    fresh arguments each time (their buffers may be donated), for about :data:`TUNE_SECONDS` each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    spent = 0.0
    for i in range(_TUNE_MAX_CALLS + 1):
        for name in (names if i % 2 else names[::-1]):
            args = jax.block_until_ready(fresh_args())
            t = time.perf_counter()
            jax.block_until_ready(calls[name](*args))
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
                spent += times[name][-1]
        if i and spent >= TUNE_SECONDS * len(names) and (i >= _TUNE_MIN_CALLS or spent >= 4 * TUNE_SECONDS):
            break  # enough calls, or a few long ones (the IS estimate of a batch: one call each, ~1.7 s)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------------------------------------------
# Calls in flight on several CPU devices
# ----------------------------------------------------------------------------------------------------------------

#: The most calls of one :class:`tuned_jit` computation whose results span several CPU devices (a mesh of host
#: devices, ``--xla_force_host_platform_device_count``) that may be in flight: each call waits for the results of
#: the call this many before it. JAX dispatches asynchronously, and in jaxlib 0.10.2 XLA:CPU deadlocks once a
#: computation with a collective (the all-reduce of a data-parallel gradient) has more than about 32 calls queued:
#: one device's part waits in the all-reduce for another device's, which is not queued yet, until a 40 s timeout
#: aborts the process. Measured on 2 cores with 2 and with 8 devices (a 1 ms matmul and all-reduce in a loop):
#: waiting every 32 calls ran, every 40 aborted; so did 300 train steps of ``make_train_step(mesh=...)`` and
#: ``fit(scan=False)`` with 300 batches on 8 devices, before this limit. 8 keeps the queue full.
CPU_MAX_IN_FLIGHT = 8


def _spans_cpu_devices(out: Any) -> bool:
    return any(isinstance(a, jax.Array) and len(a.sharding.device_set) > 1
               and next(iter(a.sharding.device_set)).platform == "cpu" for a in jax.tree.leaves(out))


def _wait_for(out: Any) -> None:
    """Wait for the results of one call (those not donated to a later call since)."""
    for a in jax.tree.leaves(out):
        if isinstance(a, jax.Array) and not a.is_deleted():
            a.block_until_ready()


class tuned_jit:  # noqa: N801 (used like jax.jit)
    """``jax.jit(fun, **jit_kwargs)``, compiled at its first call with XLA:CPU options chosen for the arguments of
    that call (on other backends, plain ``jax.jit``):

    * :func:`temp_heap_options`, so that repeated calls reuse the memory of their temporaries instead of
      page-faulting it in afresh (see the module's notes for when glibc still returns them). Measured on 2 cores
      (``python -m benchmarks.profile_heaps``, three sweeps): the conv VAE's gradient (batch 100, one sample) in
      60-89 ms instead of 80-120 (medians of 20 repeats), 0-10,500 page faults a call in the median against 19,800;
      its train step in the benchmark's workers, four interleaved pairs, 7.7-12.0 steps/s against 6.7-10.4 on a
      noisy host.
    * the library for its matrix products (:data:`CPU_DOTS`): with ``"auto"``, a computation of at least
      :data:`TUNE_MIN_FLOPS` is compiled both ways and each is timed on copies of the first call's arguments for
      about :data:`TUNE_SECONDS`; the faster is kept (``dot_library`` and ``dot_seconds`` record the choice and
      the median seconds of a call of each, ``tuning_s`` the seconds spent timing them). The two differ in
      round-off only. The choice is remembered for the process, so the same computation runs the same way each
      time it is compiled there; another process may choose otherwise where the two are close.

    ``dots_from(*args)``, where given, names the library instead of a timing of this computation (a scanned epoch
    takes the choice of its train step, timed on one batch). Later calls with other shapes compile with the same
    options; ``lower`` works as for ``jax.jit``. Where its results span several CPU devices, at most
    :data:`CPU_MAX_IN_FLIGHT` calls are in flight (a call waits for the results of the call that many before it;
    more deadlock XLA:CPU)."""

    def __init__(self, fun: Callable, *, dots_from: Callable[..., str] | None = None, **jit_kwargs: Any) -> None:
        self._fun, self._jit_kwargs, self._dots_from = fun, jit_kwargs, dots_from
        self._jitted: Any = None
        self.dot_library: str | None = None
        self.dot_seconds: dict[str, float] = {}
        self.tuning_s = 0.0
        self._in_flight: collections.deque = collections.deque()  # the last calls' results, where paced
        self._paced: bool | None = None  # whether results span several CPU devices (known after the first call)
        functools.update_wrapper(self, fun)

    def _dot_library(self, lowered: Any, options: dict[str, Any], args: tuple) -> str:
        if CPU_DOTS not in ("auto", *_DOT_OPTIONS):
            raise ValueError("runtime.CPU_DOTS (environment variable DLVM_CPU_DOTS) must be 'auto', 'ynnpack' or "
                             f"'eigen', got {CPU_DOTS!r}")
        if CPU_DOTS != "auto":
            return CPU_DOTS
        if set(self._jit_kwargs) - {"donate_argnums"} or _flops(lowered) < TUNE_MIN_FLOPS:
            return "ynnpack"  # shardings (a mesh of devices), or too little work for the choice to matter
        if self._dots_from is not None:
            return self._dots_from(*args)
        text = lowered.as_text()
        if "dot_general" not in text and "convolution" not in text:
            return "ynnpack"
        key = hashlib.sha256((text + repr(sorted(options.items()))).encode()).hexdigest()
        if key not in _chosen:
            donated = self._jit_kwargs.get("donate_argnums", ())
            donated = {donated} if isinstance(donated, int) else set(donated)
            compiled = {name: jax.jit(self._fun, compiler_options={**options, **extra} or None,
                                      **self._jit_kwargs).lower(*args).compile()
                        for name, extra in _DOT_OPTIONS.items()}

            def fresh_args() -> tuple:
                return tuple(jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, arg)
                             if i in donated else arg for i, arg in enumerate(args))

            t = time.perf_counter()
            self.dot_seconds = _median_call_seconds(compiled, fresh_args)
            self.tuning_s = time.perf_counter() - t
            _chosen[key] = min(self.dot_seconds, key=self.dot_seconds.__getitem__)
        return _chosen[key]

    def _jit_for(self, *args: Any) -> Any:
        if self._jitted is None:
            plain = jax.jit(self._fun, **self._jit_kwargs)
            if jax.default_backend() != "cpu":
                self._jitted = plain
                return plain
            lowered = plain.lower(*args)
            options = temp_heap_options(lowered, platform="cpu")
            self.dot_library = self._dot_library(lowered, options, args)
            options = {**options, **_DOT_OPTIONS[self.dot_library]}
            self._jitted = jax.jit(self._fun, compiler_options=options, **self._jit_kwargs) if options else plain
        return self._jitted

    def __call__(self, *args: Any) -> Any:
        out = (self._jitted or self._jit_for(*args))(*args)
        if self._paced is None:
            self._paced = _spans_cpu_devices(out)
        if self._paced:
            self._in_flight.append(out)
            if len(self._in_flight) > CPU_MAX_IN_FLIGHT:
                _wait_for(self._in_flight.popleft())
        return out

    def lower(self, *args: Any) -> Any:
        return self._jit_for(*args).lower(*args)
