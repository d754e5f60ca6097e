"""Lazily compiled numba kernels shared by the recon modules.

A module writes its voxel-wise kernels inside a builder ``build(jit) -> tuple`` decorated
with :func:`lazy_kernels`; the first call compiles them (on-disk cached where a writable
cache location exists), later calls return the same tuple, and ``None`` comes back where
numba is not importable so that callers can use their numpy fallbacks.
"""

from __future__ import annotations

import functools
from typing import Callable


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
