"""Run a function over items on a few threads, results in order, with a bounded number in flight.

zlib, zstandard, pread and pwrite release the GIL, so plain threads use every core for (de)compression and I/O.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """Like map(fn, items) on `workers` threads, reading at most `depth` items ahead of the consumer.

    The first exception stops the submission of new items and is raised once the running ones have ended.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nodeagent") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
