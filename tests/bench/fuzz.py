"""Fuzz driver: mutated images through the decoders and the restore path, mutated datagrams through frisbee's decoder.

    .venv/bin/python tests/bench/fuzz.py [--cases 100000] [--datagrams N] [--seed 1] [--dir /dev/shm]

Each image case starts from a small valid image made here (1-3 chunks, V3 or V5, zlib or zstd, a few regions of
mixed data, sometimes a short last sector), applies 1-3 mutations (header field set to an edge value, bytes flipped,
the file cut, chunks repeated/swapped/dropped, the codec tag swapped, the last sector pushed to the edge, the
stream replaced by a zip bomb) and runs it
through `info -c`'s path (describe) and `image`'s (restore from the file, or as stdin, into a new or an existing
file target). Prints: cases, clean errors (by kind), tracebacks, hangs, writes outside the range the image's
decodable headers cover, and leftover files (a target created by a run that failed before writing to it).
CI runs a sample of it (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.errors import NodeagentError  # noqa: E402
from agent.info import describe  # noqa: E402
from agent.io.image import restore  # noqa: E402
from agent.io.sources import FileSource, StreamSource  # noqa: E402
from agent.io.target import Target  # noqa: E402
from agent.ndz import codec as ndz_codec  # noqa: E402
from agent.ndz.header import CHUNK_SIZE, HEADER_AREA, RELOC_SHORTSECTOR, SECTOR, ChunkHeader, Reloc, decode, encode  # noqa: E402

CASE_SECONDS = 20  # a case still running after this is a hang
EDGE_INTS = [0, 1, -1, 2, 511, 512, 4095, 4096, 4097, CHUNK_SIZE - 1, CHUNK_SIZE, 2**31 - 1, -(2**31), 2**32 - 1,
             2**53, 2**54, 2**55 - 1, 2**62, 2**63 - 1, 2**64 - 1]


# Where the fields that size and place things sit: size, regionsize, regioncount, V3 first/last sector, reloccount,
# V5 first/last sector, the first V3 and V5 regions.
FIELD_OFFSETS = [4, 16, 20, 24, 28, 32, 40, 48, 36, 40, 72, 80]


class Hang(Exception):
    pass


@dataclass
class Report:
    cases: int = 0
    clean: collections.Counter = field(default_factory=collections.Counter)  # kind -> count
    accepted: int = 0
    tracebacks: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    datagrams: int = 0
    datagram_clean: int = 0
    datagram_accepted: int = 0
    datagram_tracebacks: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.clean.items()))
        return [
            f"image cases: {self.cases}",
            f"  accepted (valid after mutation): {self.accepted}",
            f"  clean errors: {sum(self.clean.values())} ({kinds})",
            f"  tracebacks: {len(self.tracebacks)}",
            f"  hangs: {len(self.hangs)}",
            f"  writes outside the covered range: {len(self.outside)}",
            f"  leftover files: {len(self.leftovers)}",
            f"  peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
            f"datagram cases: {self.datagrams}",
            f"  accepted: {self.datagram_accepted}, clean errors: {self.datagram_clean}, "
            f"tracebacks: {len(self.datagram_tracebacks)}",
        ]

    @property
    def defects(self) -> int:
        return len(self.tracebacks) + len(self.hangs) + len(self.outside) + len(self.leftovers) + len(
            self.datagram_tracebacks
        )


# --- seed images -------------------------------------------------------------------------------------------------


def _data(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return bytes(n)
    if kind == 1:
        return (b"the quick brown fox %d " % rng.randrange(1000) * (n // 20 + 1))[:n]
    return rng.randbytes(n)


def _compress(codec: str, data: bytes) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, 4)
    return ndz_codec.compress_piece("zstd", 3, data)


def make_seed(rng: random.Random) -> bytes:
    """A small valid image: 1-3 chunks tiling a sector range, each with 1-4 regions."""
    version, codec = rng.choice((3, 5)), rng.choice(("zlib", "zstd"))
    image_id = rng.randbytes(16) if version == 5 else None
    count = rng.randint(1, 3)
    cursor = 0 if rng.random() < 0.5 else rng.randrange(1, 1 << 20)
    chunks = []
    for index in range(count):
        first = cursor
        regions, data = [], []
        position = first
        for _ in range(rng.randint(1, 4)):
            start = position + rng.randint(0, 64)
            sectors = rng.randint(1, 48)
            regions.append((start, sectors))
            data.append(_data(rng, sectors * SECTOR))
            position = start + sectors
        last = position + rng.randint(0, 32)
        relocs = ()
        if index == count - 1 and last == position and rng.random() < 0.3:
            relocs = (Reloc(RELOC_SHORTSECTOR, position - 1, 0, rng.randint(1, SECTOR - 1)),)
        stream = _compress(codec, b"".join(data))
        header = ChunkHeader(version, codec, len(stream), index, tuple(regions), first, last, relocs, image_id)
        chunk = encode(header) + stream
        chunks.append(chunk + bytes(CHUNK_SIZE - len(chunk)))
        cursor = last
    return b"".join(chunks)


# --- mutations ---------------------------------------------------------------------------------------------------


def _bomb(rng: random.Random, codec: str) -> bytes:
    """A stream inflating to far more than any header here claims (64 MiB)."""
    if codec == "zstd":
        return ndz_codec.compress_piece("zstd", 1, bytes(64 << 20))
    return _ZLIB_BOMB


_ZLIB_BOMB = zlib.compress(bytes(64 << 20), 9)


def mutate(rng: random.Random, image: bytes) -> bytes:
    data = bytearray(image)
    chunks = max(1, len(data) // CHUNK_SIZE)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        base = rng.randrange(chunks) * CHUNK_SIZE
        if op <= 2:  # a header field (4 or 8 bytes at a 4-byte boundary of the first 128) set to an edge value
            offset = base + (rng.choice(FIELD_OFFSETS) if rng.random() < 0.5 else 4 * rng.randrange(32))
            width = rng.choice((4, 8))
            value = rng.choice(EDGE_INTS) % (1 << (8 * width))
            data[offset : offset + width] = value.to_bytes(width, "little")
        elif op == 3:  # random bytes in the header tables
            offset = base + rng.randrange(256)
            data[offset : offset + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # bit flips in the compressed stream
            for _ in range(rng.randint(1, 4)):
                offset = base + HEADER_AREA + rng.randrange(64 << 10)
                if offset < len(data):
                    data[offset] ^= 1 << rng.randrange(8)
        elif op == 5:  # the file cut short
            del data[rng.randrange(len(data) + 1) :]
        elif op == 6:  # chunks repeated, swapped or dropped
            parts = [bytes(data[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE)]
            how = rng.randrange(3)
            if how == 0:
                parts += [rng.choice(parts)] if parts else []
            elif how == 1 and len(parts) > 1:
                i, j = rng.sample(range(len(parts)), 2)
                parts[i], parts[j] = parts[j], parts[i]
            elif parts:
                del parts[rng.randrange(len(parts))]
            data = bytearray(b"".join(parts))
        elif op == 7:  # the codec tag swapped (zlib <-> zstd)
            if base + 4 <= len(data):
                data[base + 3] = 0x69 if data[base + 3] == 0x7A else 0x7A
        elif op == 9:  # the last sector (V3: 32 bits at 28, V5: 64 bits at 48) pushed to the edge of what fits
            if data[base : base + 1] == b"\x6d" and base + 56 <= len(data):  # V5 ("miii"/"miiz")
                struct.pack_into("<Q", data, base + 48, rng.choice(EDGE_INTS[-8:]) % (1 << 64))
            elif base + 32 <= len(data):
                struct.pack_into("<I", data, base + 28, rng.choice(EDGE_INTS[-10:]) % (1 << 32))
        elif base + HEADER_AREA <= len(data):  # the stream replaced by a bomb; the header still claims its sectors
            codec = "zstd" if data[base + 3] == 0x7A else "zlib"
            bomb = _bomb(rng, codec)[: CHUNK_SIZE - HEADER_AREA]
            struct.pack_into("<I", data, base + 4, len(bomb))
            data[base + HEADER_AREA : base + HEADER_AREA + len(bomb)] = bomb
    return bytes(data)


# --- running one case -------------------------------------------------------------------------------------------


class RecordingTarget(Target):
    """The real file target, remembering every span written or zeroed."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.spans: list[tuple[int, int]] = []

    def write(self, data, offset: int) -> None:
        self.spans.append((offset, len(data)))
        super().write(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self.spans.append((offset, length))
        super().zero(offset, length)


def covered_spans(image: bytes) -> list[tuple[int, int]]:
    """Byte ranges the decodable chunk headers of `image` describe (what restore may write)."""
    spans = []
    for index in range((len(image) + CHUNK_SIZE - 1) // CHUNK_SIZE):
        try:
            h = decode(image[index * CHUNK_SIZE : index * CHUNK_SIZE + HEADER_AREA], index)
        except NodeagentError:
            continue
        if h.first_sector is not None:
            spans.append((h.first_sector * SECTOR, h.last_sector * SECTOR))
        spans += [(start * SECTOR, (start + count) * SECTOR) for start, count in h.regions]
    return spans


def _inside(offset: int, length: int, spans) -> bool:
    return any(lo <= offset and offset + length <= hi for lo, hi in spans)


def _alarm(signum, frame):
    raise Hang()


def run_case(rng: random.Random, image: bytes, work: Path, report: Report, name: str) -> None:
    src = work / "case.ndz"
    src.write_bytes(image)
    out = work / "out.img"
    existing = rng.random() < 0.3
    if existing:
        out.write_bytes(b"\x77" * 4096)
    stdin = rng.random() < 0.3
    target = None
    failed = True
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        try:
            for _ in describe(str(src), regions=True, check=rng.random() < 0.5):
                pass
        except NodeagentError:
            pass
        if stdin:
            fd = os.open(src, os.O_RDONLY)
            source = StreamSource(fd, "stdin")
        else:
            fd, source = None, FileSource(str(src))
        try:
            target = RecordingTarget(str(out))
            restore(source, target, zero=rng.random() < 0.3, workers=2)
            failed = False
            report.accepted += 1
        finally:
            if target is not None:
                target.close(failed=failed)
            source.close()
            if fd is not None:
                os.close(fd)
    except NodeagentError as err:
        report.clean[err.kind] += 1
    except Hang:
        report.hangs.append(name)
    except Exception:
        report.tracebacks.append(f"{name}: {traceback.format_exc(limit=-3)}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if target is not None:
        spans = covered_spans(image)
        bad = [(o, n) for o, n in target.spans if not _inside(o, n, spans)]
        if bad:
            report.outside.append(f"{name}: {bad[:3]}")
    if failed and not existing and out.exists() and (target is None or not target.wrote):
        report.leftovers.append(f"{name}: {out.name} left by a run that wrote nothing")
    strays = sorted(p.name for p in work.iterdir() if p.name not in ("case.ndz", "out.img"))
    if strays:
        report.leftovers.append(f"{name}: {strays}")
    for p in work.iterdir():
        p.unlink()


# --- datagrams ---------------------------------------------------------------------------------------------------


def _datagram_seeds() -> list[bytes]:
    from agent.frisbee import packets as p

    messages = [
        p.Join(7), p.JoinReply(1000), p.Join2(7, 1000, 1024, 1024, 1000 * 1024, True),
        p.Join2(7, 0, 1024, 1024, 0, False), p.Leave(7, 3), p.Leave2(7, 3, bytes(p.STATS_BYTES)),
        p.Block(3, 5, bytes(p.BLOCK_SIZE)), p.Request(3, 0, 1024), p.PRequest(3, 0, b"\xff" * p.BITMAP_BYTES),
        p.Progress(7, 1, 2, 0, 1, False),
    ]
    seeds = []
    for msg in messages:
        try:
            seeds.append(p.encode(msg, "10.0.0.1"))
        except Exception:  # a message shape this version of packets.py does not take: fuzz the others
            continue
    return seeds


def run_datagrams(rng: random.Random, count: int, report: Report) -> None:
    from agent.frisbee import packets

    seeds = _datagram_seeds()
    for n in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                offset = 4 * rng.randrange(8)
                data[offset : offset + 4] = (rng.choice(EDGE_INTS) % (1 << 32)).to_bytes(4, "little")
            elif op == 2:
                del data[rng.randrange(len(data) + 1) :]
            else:
                data += rng.randbytes(rng.randint(1, 64))
        report.datagrams += 1
        try:
            packets.decode(bytes(data))
            report.datagram_accepted += 1
        except packets.PacketError:
            report.datagram_clean += 1
        except Exception:
            report.datagram_tracebacks.append(f"datagram {n} {bytes(data[:32]).hex()}: {traceback.format_exc(limit=-2)}")


# --- driver ------------------------------------------------------------------------------------------------------


def run(cases: int, datagrams: int, seed: int = 1, directory: str | None = None, progress=None) -> Report:
    rng = random.Random(seed)
    report = Report()
    old = signal.signal(signal.SIGALRM, _alarm)
    work = Path(tempfile.mkdtemp(prefix="nodeagent-fuzz-", dir=directory))
    try:
        seeds = [make_seed(rng) for _ in range(32)]
        for i, image in enumerate(seeds):  # the seeds themselves must restore
            before = len(report.tracebacks) + sum(report.clean.values())
            run_case(random.Random(i), image, work, report, f"seed {i}")
            assert len(report.tracebacks) + sum(report.clean.values()) == before, report.lines()
        report = Report()
        for n in range(cases):
            image = mutate(rng, rng.choice(seeds))
            report.cases += 1
            run_case(rng, image, work, report, f"case {n} (seed {seed})")
            if progress is not None and (n + 1) % 1000 == 0:
                progress(report)
        run_datagrams(rng, datagrams, report)
    finally:
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--datagrams", type=int, default=None, help="default: as many as --cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    started = time.monotonic()

    def say(report: Report) -> None:
        print(f"... {report.cases} cases, {time.monotonic() - started:.0f} s, defects {report.defects}", flush=True)

    report = run(args.cases, args.cases if args.datagrams is None else args.datagrams, args.seed, args.dir, say)
    print(f"fuzz: seed {args.seed}, {time.monotonic() - started:.0f} s")
    for line in report.lines():
        print(line)
    for what in (report.tracebacks, report.hangs, report.outside, report.leftovers, report.datagram_tracebacks):
        for item in what[:5]:
            print(item)
    return 1 if report.defects else 0


if __name__ == "__main__":
    sys.exit(main())
