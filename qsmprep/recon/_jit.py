"""Lazily compiled numba kernels shared by the recon modules.

A module writes its voxel-wise kernels inside a builder ``build(jit) -> tuple`` decorated
with :func:`lazy_kernels`; the first call compiles them (on-disk cached where a writable
cache location exists), later calls return the same tuple, and ``None`` comes back where
numba is not importable so that callers can use their numpy fallbacks.
:func:`run_in_blocks` spreads a ``nogil`` kernel over threads.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np


def _jit(fastmath: bool) -> Callable | None:
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - exercised only without numba
        return None

    def jit(fn):
        # on-disk caching needs a writable __pycache__ or NUMBA_CACHE_DIR; compile without
        # it (about a second per process) where there is none, e.g. read-only containers
        try:
            return njit(fastmath=fastmath, cache=True)(fn)
        except RuntimeError:  # pragma: no cover - "no locator available"
            return njit(fastmath=fastmath)(fn)

    return jit


def lazy_kernels(*, fastmath: bool = True) -> Callable[[Callable], Callable[[], tuple | None]]:
    """Decorator turning ``build(jit) -> tuple of kernels`` into a cached zero-argument
    getter (``None`` without numba)."""

    def decorate(build: Callable) -> Callable[[], tuple | None]:
        @functools.cache
        def get() -> tuple | None:
            jit = _jit(fastmath)
            return None if jit is None else build(jit)

        functools.update_wrapper(get, build)
        return get

    return decorate


def run_in_blocks(kernel: Callable, split: Sequence[np.ndarray], *shared,
                  blocks_per_thread: int = 4) -> None:
    """Call the ``nogil`` compiled ``kernel(*blocks, *shared)`` on contiguous blocks (axis 0)
    of the arrays ``split`` from a pool of ``numba.get_num_threads()`` Python threads (the
    count :func:`qsmprep.interfaces.base.threads` sets).

    Python threads rather than numba's ``parallel=True``: with GNU OpenMP, the threading
    layer numba picks on Linux, a forked child that runs a parallel region after its parent
    did is terminated, and Nipype's MultiProc forks its workers."""
    import numba

    n_items = split[0].shape[0]
    count = max(1, min(numba.get_num_threads(), n_items))
    if count == 1:
        kernel(*split, *shared)
        return
    bounds = np.linspace(0, n_items, count * blocks_per_thread + 1).astype(np.int64)

    def block(index: int) -> None:
        lo, hi = bounds[index], bounds[index + 1]
        kernel(*(array[lo:hi] for array in split), *shared)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(block, range(bounds.size - 1)))
