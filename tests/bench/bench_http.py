"""Benchmark: images over HTTP and TCP against the same work with local files.

    sudo .venv/bin/python tests/bench/bench_http.py [--runs 3] [--dir /dev/shm/nodeagent-bench-http]

The disk: bench_ndz's generator (ext4, a third text-like, a third random, a third half-zero files), 1 GiB with
640 MiB of files, saved once as the served image. Everything runs inside one network namespace (nginx from Debian
on the namespace's own address, i.e. over loopback); files live in tmpfs. Prints medians of --runs runs of:
- `image http://` from nginx against `image FILE` of the same image (goal: >= 0.9x the file's rate)
- the cost of a resume: bytes fetched twice per cut, through tests/fault_proxy.py cutting 4 times (goal: at most
  one chunk)
- `save tcp://` into `receive` against `save FILE` (wall time of the pair), and both commands' peak RSS
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]

import bench_ndz  # noqa: E402
from http_helpers import fault_proxy, nginx  # noqa: E402
from net_helpers import lan  # noqa: E402

from agent.ndz.header import CHUNK_SIZE  # noqa: E402

MiB = 1 << 20
PORT = 7071


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Wall time, peak RSS (GNU time) and stderr of one command (argv already inside the namespace)."""
    start = time.perf_counter()
    proc = subprocess.run(argv[:4] + ["/usr/bin/time", "-f", "%M"] + argv[4:], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr}")
    return elapsed, int(proc.stderr.split()[-1]) * 1024, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/nodeagent-bench-http"))
    args = parser.parse_args()
    work = args.dir
    if work.exists():
        shutil.rmtree(work)
    (work / "www").mkdir(parents=True)
    disk, image, target = work / "disk.ext4", work / "www" / "disk.ndz", work / "target"
    bench_ndz.make_disk(disk, work, disk_bytes=1 << 30, file_bytes=640 * MiB)
    agent = [sys.executable, "-m", "agent"]
    subprocess.run([*agent, "save", "-q", disk, image], check=True)
    size = image.stat().st_size
    print(f"image: {size / MiB:.0f} MiB ({size // CHUNK_SIZE} chunks) of a {disk.stat().st_size / MiB:.0f} MiB disk")
    try:
        with lan(1) as (host,), nginx(host, work / "www", work / "nginx") as web:

            def run(*cmd):
                return timed(host.cmd(*agent, *map(str, cmd)))

            def median(what, *cmd):
                runs = []
                for _ in range(args.runs):
                    target.unlink(missing_ok=True)
                    runs.append(run(*cmd))
                return statistics.median(r[0] for r in runs), max(r[1] for r in runs)

            file_s, file_rss = median("file", "image", "-q", image, target)
            http_s, http_rss = median("http", "image", "-q", f"{web.url}/disk.ndz", target)
            print(f"image FILE:    {file_s:6.2f} s  {size / MiB / file_s:7.1f} MiB/s of image  peak RSS {file_rss / MiB:.0f} MiB")
            print(f"image http://: {http_s:6.2f} s  {size / MiB / http_s:7.1f} MiB/s of image  peak RSS {http_rss / MiB:.0f} MiB")
            print(f"  http / file rate: {file_s / http_s:.2f}x (goal >= 0.9)")

            cuts = 4
            cut_after = size // (cuts + 2) + 123_457  # inside a chunk
            with fault_proxy(host, 9001, f"{host.addr}:{web.port}", "--cut-after", cut_after, "--cuts", cuts) as log:
                target.unlink(missing_ok=True)
                cut_s, _, err = run("image", "-q", "-T", 30, f"http://{host.addr}:9001/disk.ndz", target)
                conns = log()
            relayed = sum(int(line.split()[2]) for line in conns if "upstream" in line)
            twice = (relayed - size) / cuts  # the response heads (~300 bytes each) counted in too
            print(f"image http:// cut {cuts} times: {cut_s:.2f} s, {err.count('resuming at chunk')} resumes, "
                  f"{(relayed - size) / 1024:.0f} KiB fetched twice in all (heads included): "
                  f"{twice / 1024:.0f} KiB per cut (goal <= {CHUNK_SIZE // 1024} KiB)")

            saves, pairs = [], []
            for _ in range(args.runs):
                (work / "saved.ndz").unlink(missing_ok=True)
                saves.append(run("save", "-q", disk, work / "saved.ndz"))
                received = work / "received.ndz"
                received.unlink(missing_ok=True)
                start = time.perf_counter()
                receiver = subprocess.Popen(
                    host.cmd("/usr/bin/time", "-f", "%M", *agent, "receive", "-m", host.addr, "-p", PORT, received),
                    stderr=subprocess.PIPE, text=True,
                )
                assert "listening" in receiver.stderr.readline()
                _, save_rss, _ = run("save", "-q", disk, f"tcp://{host.addr}:{PORT}")
                err = receiver.communicate()[1]
                pairs.append((time.perf_counter() - start, save_rss, int(err.split()[-1]) * 1024))
                if receiver.returncode or received.read_bytes() != (work / "saved.ndz").read_bytes():
                    raise SystemExit(f"receive failed or differs: {err}")
            save_s = statistics.median(s[0] for s in saves)
            pair_s = statistics.median(p[0] for p in pairs)
            print(f"save FILE:              {save_s:6.2f} s  peak RSS {max(s[1] for s in saves) / MiB:.0f} MiB")
            print(f"save tcp:// + receive:  {pair_s:6.2f} s  peak RSS save {max(p[1] for p in pairs) / MiB:.0f} MiB, "
                  f"receive {max(p[2] for p in pairs) / MiB:.0f} MiB  (identical files)")
            print(f"  tcp / file rate: {save_s / pair_s:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
