"""Benchmark: imaging and saving a 2 GiB ext4 disk against single-threaded baselines run in the same script.

    sudo .venv/bin/python tests/bench/bench_ndz.py [--runs 5] [--dir /dev/shm/nodeagent-bench]

The disk: 2 GiB ext4 holding about 1.3 GiB of files, a third text-like, a third random, a third half zeros. Files
live in tmpfs by default, so the figures measure the agent's CPU work and not this machine's virtual disk.
Prints medians of --runs runs and the ratios the imaging issue sets goals for:
- imaging rate / rate of inflating the same chunks one after another in one thread (goal >= 1.6)
- saving rate / rate of compressing the allocated data in one thread (goal >= 1.5)
- peak RSS of `nodeagent image` and `nodeagent save` (goal < 48 MiB)
- zstd image decode speed / zlib image decode speed (goal >= 3)
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import fs  # noqa: E402
from agent.ndz import codec  # noqa: E402
from agent.ndz.header import CHUNK_SIZE, HEADER_AREA, decode  # noqa: E402

MiB = 1 << 20
DISK_BYTES = 2 << 30
FILE_BYTES = 1300 * MiB


def make_files(root: Path, seed: int = 1) -> None:
    """~1.3 GiB: text-like files (slices of Python's own sources, shuffled), random files, half-zero files."""
    rng = random.Random(seed)
    corpus = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))
    third = FILE_BYTES // 3
    for kind in ("text", "random", "halfzero"):
        (root / kind).mkdir(parents=True)
        made = 0
        i = 0
        while made < third:
            size = rng.randrange(64 << 10, 24 << 20)
            if kind == "text":
                parts, n = [], 0
                while n < size:
                    start = rng.randrange(0, len(corpus) - 65536)
                    piece = corpus[start : start + rng.randrange(4096, 65536)]
                    parts.append(piece)
                    n += len(piece)
                data = b"".join(parts)[:size]
            elif kind == "random":
                data = rng.randbytes(size)
            else:
                block = bytearray()
                for _ in range(size // 8192 + 1):
                    block += rng.randbytes(4096) + bytes(4096)
                data = bytes(block[:size])
            (root / kind / f"f{i:04d}").write_bytes(data)
            made += size
            i += 1


def make_disk(path: Path, work: Path) -> None:
    files = work / "files"
    if files.exists():
        shutil.rmtree(files)
    make_files(files)
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(path)], check=True)
    shutil.rmtree(files)


def run_cli(*args) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one nodeagent run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "agent", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if status:
        raise SystemExit(f"nodeagent {' '.join(map(str, args))} failed: {err}")
    return elapsed, usage.ru_maxrss * 1024


def chunks_of(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


def inflate_one_thread(path: Path) -> tuple[float, int]:
    """Baseline: inflate every chunk one after another in one thread, no writes."""
    start = time.perf_counter()
    total = 0
    for i, chunk in enumerate(chunks_of(path)):
        h = decode(chunk, i)
        for piece in codec.decompress(h.codec, memoryview(chunk)[HEADER_AREA : HEADER_AREA + h.size], h.data_bytes, i):
            total += len(piece)
    return time.perf_counter() - start, total


def compress_one_thread(disk: Path, ranges) -> tuple[float, int]:
    """Baseline: read the allocated data and deflate it (level 4, like imagezip) as one stream in one thread."""
    start = time.perf_counter()
    total = 0
    deflater = zlib.compressobj(4)
    fd = os.open(disk, os.O_RDONLY)
    try:
        for sector, count in ranges:
            offset, left = sector * 512, count * 512
            while left:
                data = os.pread(fd, min(left, 128 << 10), offset)
                deflater.compress(data)
                offset += len(data)
                left -= len(data)
                total += len(data)
        deflater.flush()
    finally:
        os.close(fd)
    return time.perf_counter() - start, total


def median(values):
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/nodeagent-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark disk for the next run")
    args = parser.parse_args()
    work = args.dir
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "disk.img"
    if not disk.exists():
        print("making the benchmark disk ...", flush=True)
        make_disk(disk, work)
    fd = os.open(disk, os.O_RDONLY)
    size = os.fstat(fd).st_size
    disk_map = fs.scan_disk(lambda off, n: os.pread(fd, n, off), size // 512)
    os.close(fd)
    allocated = sum(n for _, n in disk_map.ranges) * 512
    print(f"disk: {size / MiB:.0f} MiB, {allocated / MiB:.0f} MiB allocated, {os.cpu_count()} cores, {args.runs} runs")

    zlib_img, zstd_img, target = work / "disk.ndz", work / "disk-zstd.ndz", work / "restored.img"
    save_t, save_rss, base_c = [], [], []
    for _ in range(args.runs):
        t, rss = run_cli("save", "-q", disk, zlib_img)
        save_t.append(t)
        save_rss.append(rss)
        base_c.append(compress_one_thread(disk, disk_map.ranges)[0])
    zstd_t = [run_cli("save", "-q", "--zstd", disk, zstd_img)[0] for _ in range(args.runs)]

    image_t, image_rss, base_i, zlib_dec, zstd_dec = [], [], [], [], []
    for _ in range(args.runs):
        if target.exists():
            target.unlink()
        t, rss = run_cli("image", "-q", zlib_img, target)
        image_t.append(t)
        image_rss.append(rss)
        t, _ = inflate_one_thread(zlib_img)
        base_i.append(t)
        zlib_dec.append(t)
        zstd_dec.append(inflate_one_thread(zstd_img)[0])
    img_mb = allocated / MiB

    rows = [
        ("save (nodeagent, zlib 4)", median(save_t), img_mb / median(save_t)),
        ("  baseline: deflate in one thread", median(base_c), img_mb / median(base_c)),
        ("save --zstd", median(zstd_t), img_mb / median(zstd_t)),
        ("image (nodeagent, zlib)", median(image_t), img_mb / median(image_t)),
        ("  baseline: inflate in one thread", median(base_i), img_mb / median(base_i)),
        ("decode zlib image, one thread", median(zlib_dec), img_mb / median(zlib_dec)),
        ("decode zstd image, one thread", median(zstd_dec), img_mb / median(zstd_dec)),
    ]
    print(f"\n{'what':40} {'median s':>9} {'MiB/s':>8}")
    for what, t, rate in rows:
        print(f"{what:40} {t:9.2f} {rate:8.1f}")
    print(f"\nimage sizes: zlib {zlib_img.stat().st_size / MiB:.0f} MiB, zstd {zstd_img.stat().st_size / MiB:.0f} MiB, "
          f"raw data {img_mb:.0f} MiB")
    print("ratios (goal):")
    print(f"  imaging / one-thread inflate   {median(base_i) / median(image_t):5.2f}  (>= 1.6)")
    print(f"  saving / one-thread deflate    {median(base_c) / median(save_t):5.2f}  (>= 1.5)")
    print(f"  zstd decode / zlib decode      {median(zlib_dec) / median(zstd_dec):5.2f}  (>= 3)")
    print(f"  peak RSS image {max(image_rss) / MiB:.1f} MiB, save {max(save_rss) / MiB:.1f} MiB  (< 48)")
    for p in (zlib_img, zstd_img, target):
        p.unlink(missing_ok=True)
    if not args.keep:
        disk.unlink()


if __name__ == "__main__":
    main()
