"""Benchmark: frisbee transfers between hosts in network namespaces on one bridge (run as root).

    sudo .venv/bin/python tests/bench/bench_frisbee.py [--runs 3]

Prints, with medians of --runs runs:
- receive throughput from `nodeagent serve -W 0` (unlimited) beside `nodeagent image FILE` of the same image;
- wall time (from the server's start; the receivers are already waiting) for 16 receivers against 1 receiver at 50 Mbit/s (`-W 50000000`, ORBIT's production setting),
  where the network and not the 2 shared cores is the limit (goal: at most 1.1 times);
- blocks the server sent per block the image has, for one receiver behind 10% packet loss.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from net_helpers import lan  # noqa: E402

GROUP = "239.192.1.7"
MiB = 1 << 20


def make_image(work: Path, mib: int, seed: int, mixed: bool = True) -> Path:
    """A raw image of `mib` MiB: a third random, a third text-like, a third zeros; or all random (cheap to
    decode: 16 receivers on 2 cores then spend the cores on the network, as 16 real nodes would not)."""
    rng = random.Random(seed)
    disk = work / f"disk{mib}.bin"
    if mixed:
        words = [rng.randbytes(rng.randrange(2, 8)).hex().encode() for _ in range(500)]
        third = mib * MiB // 3
        text = b" ".join(rng.choice(words) for _ in range(third // 6))[:third]
        disk.write_bytes(rng.randbytes(third) + text.ljust(third, b".") + bytes(mib * MiB - 2 * third))
    else:
        disk.write_bytes(rng.randbytes(mib * MiB))
    image = work / f"disk{mib}.ndz"
    subprocess.run([sys.executable, "-m", "agent", "save", "-q", "-r", str(disk), str(image)], check=True)
    disk.unlink()
    return image


def timed(argv, **kw) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kw)
    return time.perf_counter() - start


def transfer(image: Path, receivers: int, work: Path, port: int, bandwidth: str, loss: int = 0) -> tuple[float, str]:
    """Wall time from the server's start until every receiver has finished, and the server's log.

    The receivers start first and wait for the server (they keep sending JOINs), so Python's start-up on the 2
    shared cores is not timed: only the transfer is.
    """
    with lan(receivers + 1) as hosts:
        server, clients = hosts[0], hosts[1:]
        for h in clients:
            if loss:
                h.drop_incoming_udp(loss, port)
        procs = [
            h.popen(h.nodeagent("image", "-q", "-m", GROUP, "-p", port, "-i", h.addr, "-T", "60", work / f"t{i}.img"))
            for i, h in enumerate(clients)
        ]
        time.sleep(1 + 0.3 * receivers)
        start = time.perf_counter()
        srv = server.popen(server.nodeagent("serve", "-m", GROUP, "-p", port, "-i", server.addr, "-W", bandwidth, "-T", "3", image))
        for p in procs:
            _, err = p.communicate(timeout=900)
            if p.returncode:
                raise SystemExit(f"receiver failed: {err.decode()}")
        elapsed = time.perf_counter() - start
        _, log = srv.communicate(timeout=60)
    for i in range(receivers):
        (work / f"t{i}.img").unlink()
    return elapsed, log.decode()


def blocks_sent(log: str) -> int:
    match = re.search(r"(\d+) blocks? sent", log) or re.search(r"sent (\d+) blocks", log)
    if not match:
        raise SystemExit(f"no block count in the server's log:\n{log}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nodeagent-bench-", dir="/dev/shm"))
    med = statistics.median

    big = make_image(work, 256, 1)
    file_t = [timed([sys.executable, "-m", "agent", "image", "-q", str(big), str(work / "f.img")]) for _ in range(args.runs)]
    net_t = [transfer(big, 1, work, 5100, "0")[0] for _ in range(args.runs)]
    size = big.stat().st_size / MiB
    print(f"image of {size:.0f} MiB ({big.stat().st_size // 1024} blocks)")
    print(f"  nodeagent image FILE        {med(file_t):6.2f} s  {size / med(file_t):7.1f} MiB/s of image")
    print(f"  frisbee, unlimited server   {med(net_t):6.2f} s  {size / med(net_t):7.1f} MiB/s   ratio {med(file_t) / med(net_t):.2f}")

    small = make_image(work, 20, 2, mixed=False)
    one = [transfer(small, 1, work, 5101, "50000000")[0] for _ in range(args.runs)]
    many = [transfer(small, 16, work, 5102, "50000000")[0] for _ in range(args.runs)]
    print(f"image of {small.stat().st_size / MiB:.0f} MiB at 50 Mbit/s: 1 receiver {med(one):.2f} s, "
          f"16 receivers {med(many):.2f} s, ratio {med(many) / med(one):.2f} (goal <= 1.1)")

    needed = small.stat().st_size // 1024
    ratios = []
    for _ in range(args.runs):
        _, log = transfer(small, 1, work, 5103, "50000000", loss=10)
        ratios.append(blocks_sent(log) / needed)
    print(f"10% loss, 1 receiver: {med(ratios):.3f} blocks sent per block needed")
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
