"""Sector ranges: collecting and merging them, and finding the runs of set bits in an allocation bitmap."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

Range = tuple[int, int]  # (start, count)

_RUN_OF_ONES = re.compile("1+")


class RangeSet:
    """Collects (start, count) ranges and hands them back sorted, non-overlapping and merged.

    Ranges that arrive in ascending order (the usual case: one block group after the other) are merged on the
    spot, so memory stays proportional to the result, not to the number of calls. The few that arrive out of
    order (metadata of one group stored in another) are set aside and folded in by `ranges()`.
    """

    def __init__(self) -> None:
        self._runs: list[list[int]] = []  # [start, end) in ascending order, disjoint, not adjacent
        self._late: list[Range] = []  # (start, end) that arrived out of order

    def add(self, start: int, count: int) -> None:
        if count <= 0:
            return
        end = start + count
        runs = self._runs
        if runs:
            last = runs[-1]
            if start < last[0]:
                self._late.append((start, end))
                return
            if start <= last[1]:
                if end > last[1]:
                    last[1] = end
                return
        runs.append([start, end])

    def add_all(self, ranges: Iterable[Range], offset: int = 0) -> None:
        for start, count in ranges:
            self.add(offset + start, count)

    def ranges(self) -> list[Range]:
        if self._late:
            spans = sorted([(s, e) for s, e in self._runs] + self._late)
            self._runs, self._late = [], []
            for s, e in spans:
                self.add(s, e - s)
        return [(s, e - s) for s, e in self._runs]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge (start, count) ranges; overlapping and adjacent ones become one."""
    merged = RangeSet()
    for start, count in sorted(ranges):
        merged.add(start, count)
    return merged.ranges()


def set_bit_runs(bitmap: bytes, nbits: int) -> Iterator[Range]:
    """Yield (first_bit, bit_count) for each run of 1 bits among the first `nbits` bits of `bitmap`.

    Bit i is bit (i % 8) of byte (i // 8), least significant first, as ext2/3/4 bitmaps are laid out.
    Done with one big-integer conversion and a regex over its binary text, both in C: a Python loop per
    bit would take ~1 s for a 2 GiB filesystem.
    """
    nbytes = (nbits + 7) // 8
    chunk = bitmap[:nbytes]
    if nbits <= 0 or not chunk.strip(b"\x00"):
        return
    value = int.from_bytes(chunk, "little")
    all_ones = (1 << nbits) - 1
    value &= all_ones
    if value == all_ones:
        yield (0, nbits)
        return
    # format() writes the most significant bit first; reversed, character i is bit i. Leading zero bits
    # are dropped by format(), which only shortens the trailing run of zeros.
    text = format(value, "b")[::-1]
    for match in _RUN_OF_ONES.finditer(text):
        first, end = match.span()
        yield (first, end - first)
