"""Benchmark: imaging and saving a 2 GiB ext4 disk against single-threaded baselines run in the same script.

    sudo .venv/bin/python tests/bench/bench_ndz.py [--runs 5] [--dir /dev/shm/nodeagent-bench]

The disk: 2 GiB ext4 holding about 1.3 GiB of files, a third text-like, a third random, a third half zeros. Files
live in tmpfs by default, so the figures measure the agent's CPU work and not this machine's virtual disk.
Rates are timed in this process (the library calls the CLI makes, and the baselines, side by side); the commands
themselves are run too, for their wall time (with interpreter start-up) and peak RSS.
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

from agent import fs, linux  # noqa: E402
from agent.io.image import restore  # noqa: E402
from agent.io.save import save  # noqa: E402
from agent.io.sources import FileSource  # noqa: E402
from agent.io.target import Target  # noqa: E402
from agent.ndz import codec  # noqa: E402
from agent.ndz.header import CHUNK_SIZE, HEADER_AREA, decode  # noqa: E402

MiB = 1 << 20
DISK_BYTES = 2 << 30
FILE_BYTES = 1300 * MiB


def make_files(root: Path, seed: int = 1, total: int = FILE_BYTES) -> None:
    """`total` bytes (~1.3 GiB by default): text-like files (slices of Python's own sources, shuffled), random
    files, half-zero files."""
    rng = random.Random(seed)
    corpus = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))
    third = total // 3
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


def make_disk(path: Path, work: Path, disk_bytes: int = DISK_BYTES, file_bytes: int = FILE_BYTES) -> None:
    """An ext4 file system of `disk_bytes` at `path` holding make_files(total=file_bytes)."""
    files = work / "files"
    if files.exists():
        shutil.rmtree(files)
    make_files(files, total=file_bytes)
    with open(path, "wb") as f:
        f.truncate(disk_bytes)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(path)], check=True)
    shutil.rmtree(files)


def run_cli(*args) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one nodeagent run.

    GNU time reports the RSS: a child's own ru_maxrss would include this big benchmark process, copied at fork.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "agent", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"nodeagent {' '.join(map(str, args))} failed: {proc.stderr}")
    return elapsed, int(proc.stderr.split()[-1]) * 1024


def chunks_of(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


def inflate_one_thread(path: Path, preloaded: list[bytes] | None = None) -> tuple[float, int]:
    """Baseline: read and inflate every chunk one after another in one thread, no writes (with `preloaded`
    chunks, inflate only)."""
    start = time.perf_counter()
    total = 0
    for i, chunk in enumerate(preloaded if preloaded is not None else chunks_of(path)):
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
    linux.keep_big_buffers()  # as the CLI does at start

    def save_in_process(dest, codec_name="zlib") -> float:
        start = time.perf_counter()
        save(str(disk), str(dest), codec=codec_name)
        return time.perf_counter() - start

    def image_in_process() -> float:
        source, tgt = FileSource(str(zlib_img)), Target(str(target))
        start = time.perf_counter()
        restore(source, tgt)
        elapsed = time.perf_counter() - start
        tgt.close()
        source.close()
        return elapsed

    save_t, base_c, zstd_t = [], [], []
    for _ in range(args.runs):
        save_t.append(save_in_process(zlib_img))
        base_c.append(compress_one_thread(disk, disk_map.ranges)[0])
        zstd_t.append(save_in_process(zstd_img, "zstd"))
    # The target exists before the timed runs, as a disk does: a fresh tmpfs file would time page allocation.
    image_in_process()
    image_t, base_i = [], []
    for _ in range(args.runs):
        image_t.append(image_in_process())
        base_i.append(inflate_one_thread(zlib_img)[0])
    cli_save = [run_cli("save", "-q", disk, zlib_img) for _ in range(args.runs)]
    cli_image = [run_cli("image", "-q", zlib_img, target) for _ in range(args.runs)]
    zlib_chunks, zstd_chunks = list(chunks_of(zlib_img)), list(chunks_of(zstd_img))
    zlib_dec = [inflate_one_thread(zlib_img, zlib_chunks)[0] for _ in range(args.runs)]
    zstd_dec = [inflate_one_thread(zstd_img, zstd_chunks)[0] for _ in range(args.runs)]
    del zlib_chunks, zstd_chunks
    img_mb = allocated / MiB

    rows = [
        ("save (zlib level 4)", median(save_t), img_mb / median(save_t)),
        ("  baseline: deflate in one thread", median(base_c), img_mb / median(base_c)),
        ("save --zstd", median(zstd_t), img_mb / median(zstd_t)),
        ("image (zlib image)", median(image_t), img_mb / median(image_t)),
        ("  baseline: read + inflate in one thread", median(base_i), img_mb / median(base_i)),
        ("decode zlib image in memory, one thread", median(zlib_dec), img_mb / median(zlib_dec)),
        ("decode zstd image in memory, one thread", median(zstd_dec), img_mb / median(zstd_dec)),
        ("`nodeagent save` command, wall", median(t for t, _ in cli_save), img_mb / median(t for t, _ in cli_save)),
        ("`nodeagent image` command, wall", median(t for t, _ in cli_image), img_mb / median(t for t, _ in cli_image)),
    ]
    print(f"\n{'what':44} {'median s':>9} {'MiB/s':>8}")
    for what, t, rate in rows:
        print(f"{what:44} {t:9.2f} {rate:8.1f}")
    print(f"\nimage sizes: zlib {zlib_img.stat().st_size / MiB:.0f} MiB, zstd {zstd_img.stat().st_size / MiB:.0f} MiB, "
          f"allocated data {img_mb:.0f} MiB")
    print("ratios (goal):")
    print(f"  imaging / one-thread inflate   {median(base_i) / median(image_t):5.2f}  (>= 1.6)")
    print(f"  saving / one-thread deflate    {median(base_c) / median(save_t):5.2f}  (>= 1.5)")
    print(f"  zstd decode / zlib decode      {median(zlib_dec) / median(zstd_dec):5.2f}  (>= 3)")
    print(f"  peak RSS of the commands: image {max(r for _, r in cli_image) / MiB:.1f} MiB, "
          f"save {max(r for _, r in cli_save) / MiB:.1f} MiB  (< 48)")
    for p in (zlib_img, zstd_img, target):
        p.unlink(missing_ok=True)
    if not args.keep:
        disk.unlink()


if __name__ == "__main__":
    main()
