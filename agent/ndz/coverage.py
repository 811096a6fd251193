"""Which sectors an image has written so far: catches chunks whose regions overlap each other."""

from __future__ import annotations

import bisect


class Coverage:
    """A set of disjoint half-open sector intervals, merged as they are added."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def overlap(self, start: int, end: int) -> tuple[int, int] | None:
        """An interval already present that meets [start, end), or None."""
        i = bisect.bisect_right(self._starts, start) - 1
        for j in (i, i + 1):
            if 0 <= j < len(self._starts) and self._starts[j] < end and start < self._ends[j]:
                return self._starts[j], self._ends[j]
        return None

    def add(self, start: int, end: int) -> None:
        """Add [start, end), which must not overlap what is present."""
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._ends[i - 1] == start:  # continues the interval before
            i -= 1
            self._ends[i] = end
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        if i + 1 < len(self._starts) and self._starts[i + 1] == self._ends[i]:  # touches the one after
            self._ends[i] = self._ends.pop(i + 1)
            self._starts.pop(i + 1)

    def __len__(self) -> int:
        return len(self._starts)
