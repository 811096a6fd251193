"""A sample of the fuzz driver (tests/bench/fuzz.py): mutated images through info and restore, mutated frisbee
datagrams through packets.decode. No tracebacks, hangs, writes outside the covered range or leftover files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

import fuzz  # noqa: E402


def test_fuzz_sample(tmp_path):
    report = fuzz.run(cases=300, datagrams=300, seed=11, directory=str(tmp_path))
    assert report.cases == 300 and report.datagrams == 300
    assert sum(report.clean.values()) > 100 and report.accepted > 10  # the mutations both break and keep images
    assert report.tracebacks == [] and report.hangs == [] and report.datagram_tracebacks == []
    assert report.outside == [] and report.leftovers == []
