"""Timing and peak-memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

LOGGER = logging.getLogger("qsmprep.benchmark")


def _release_freed_memory() -> None:
    """Make glibc return every large (>= 128 kB) block to the OS when it is freed, so that
    the resident set follows live memory and a step's RSS increase is its peak footprint
    (by default glibc's adaptive mmap threshold keeps freed arrays for reuse)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        LOGGER.warning("mallopt unavailable: memory deltas may read low")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Largest resident-set increase during a ``with`` block (sampled every 5 ms)."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta_mb = (self.peak - self.start) / 2**20


@dataclasses.dataclass
class Step:
    """One timed call: its result (or error), wall time (s) and peak RSS increase (MB)."""

    value: Any = None
    seconds: float = math.nan
    mem_mb: float = math.nan
    error: str | None = None


def measure(fn: Callable[[], Any]) -> Step:
    """Run ``fn`` once; failures are recorded, not raised."""
    try:
        with _PeakRss() as rss:
            start = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - start
        return Step(value, seconds, rss.delta_mb)
    except Exception as error:  # noqa: BLE001 - a failing method must not stop the run
        LOGGER.warning("step failed: %s", traceback.format_exc(limit=3))
        return Step(error=f"{type(error).__name__}: {error}"[:160])


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_section(results: Path, marker: str, text: str) -> None:
    """Replace the ``<!-- marker:start -->...<!-- marker:end -->`` block of ``results`` by
    ``text`` (which carries the markers), or append it."""
    current = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- {marker}:start -->.*?<!-- {marker}:end -->", re.S)
    new = pattern.sub(lambda _: text, current) if pattern.search(current) else (
        current.rstrip() + "\n\n" + text + "\n")
    results.write_text(new)
