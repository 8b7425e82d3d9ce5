"""What several benchmark scripts time the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def per_cpu_second(fn: Callable[[bytes], Any], data: list[bytes], min_s: float) -> float:
    """Items of ``data`` per CPU-second of this thread through ``fn``, over whole passes lasting
    at least ``min_s`` (CPU time, so other processes on the machine move it little)."""
    n, t0 = 0, time.thread_time()
    while True:
        for d in data:
            fn(d)
        n += len(data)
        if (dt := time.thread_time() - t0) >= min_s:
            return n / dt
