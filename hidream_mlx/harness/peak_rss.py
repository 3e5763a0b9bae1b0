"""Peak resident memory of this process while one image is made.

Two sources, because each misses something: a thread samples ``psutil``'s RSS every few
milliseconds (portable, but can miss a short spike), and the kernel's high-water mark from
``getrusage`` (exact, but process-wide). On Linux the high-water mark can be reset per image
(``/proc/self/clear_refs``), which makes it exact per image; on macOS it cannot, so there the
per-image figure is the sampled one and ``process_max`` is the high-water mark since start.
"""

from __future__ import annotations

import resource
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIGH_WATER = "5"  # Linux: "reset the peak resident set size" (proc(5))


def ru_maxrss_bytes() -> int:
    """The process high-water mark; ``ru_maxrss`` is KiB on Linux and bytes on macOS."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_high_water() -> bool:
    """Reset the kernel's peak RSS if this system allows it; say whether it did."""
    try:
        _CLEAR_REFS.write_text(_RESET_HIGH_WATER)
    except OSError:  # not Linux, or a sandbox that forbids it: fall back to sampling
        return False
    return True


class PeakRss:
    """``with rss.measure(): ...`` then read ``rss.peak`` (bytes, this block) and ``rss.process_max``."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self.process_max = 0
        self.exact = False  # True when the kernel high-water mark was reset for this block

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @contextmanager
    def measure(self) -> Iterator["PeakRss"]:
        self.exact = reset_high_water()
        self.peak = self.process.memory_info().rss
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            stop.set()
            sampler.join()
            self.process_max = ru_maxrss_bytes()
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.exact:
                self.peak = max(self.peak, self.process_max)
