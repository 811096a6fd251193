"""Benchmark: frisbee transfers between hosts in network namespaces on one bridge (run as root).

    sudo .venv/bin/python tests/bench/bench_frisbee.py [--runs 3]

Prints, with medians of --runs runs:
- receive throughput from `nodeagent serve -W 0` (unlimited) beside `nodeagent image FILE` of the same image;
- wall time (from the server's start; the receivers are already waiting) for 16 receivers against 1 receiver at 50 Mbit/s (`-W 50000000`, ORBIT's production setting),
  where the network and not the 2 shared cores is the limit (goal: at most 1.1 times);
- blocks the server sent per block the image has, for one receiver behind 10% packet loss;
- with NODEAGENT_FRISBEE/NODEAGENT_FRISBEED (the real Emulab programs): our client and the real one from an
  unlimited frisbeed and from `nodeagent serve -W 0`, their times, ratios and CPU seconds per received GiB.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
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


FRISBEE = os.environ.get("NODEAGENT_FRISBEE", "")
FRISBEED = os.environ.get("NODEAGENT_FRISBEED", "")


def race(image: Path, work: Path, port: int, server: str, client: str, bandwidth: str = "0") -> tuple[float, float, float]:
    """One receiver: (wall time from the server's start, the receiver's CPU seconds, the server's). server: "ours" (`nodeagent
    serve`) or "frisbeed"; client: "ours" (`nodeagent image`) or "frisbee" (the real C client)."""
    out = work / "race.img"
    with lan(2) as (srv_host, host):
        if client == "ours":
            argv = host.nodeagent("image", "-q", "-m", GROUP, "-p", port, "-i", host.addr, "-T", "60", out)
        else:
            argv = host.cmd(FRISBEE, "-m", GROUP, "-p", port, "-i", host.addr, "-T", "60", out)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = host.popen(argv)
        time.sleep(1)
        start = time.perf_counter()
        if server == "ours":
            sargv = srv_host.nodeagent("serve", "-m", GROUP, "-p", port, "-i", srv_host.addr, "-W", bandwidth, "-T", "3", image)
        else:
            sargv = srv_host.cmd(FRISBEED, "-m", GROUP, "-p", port, "-i", srv_host.addr, "-W", bandwidth, "-T", "3", image)
        srv = srv_host.popen(sargv)
        _, err = proc.communicate(timeout=900)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the server is still running: not counted
        if proc.returncode:
            raise SystemExit(f"{client} receiver failed: {err.decode()}")
        srv.terminate()
        srv.communicate(timeout=60)
        end = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.unlink()
    cpu = [r.ru_utime + r.ru_stime for r in (before, after, end)]
    return elapsed, cpu[1] - cpu[0], cpu[2] - cpu[1]


FRISBEED_UNLIMITED = "10000000000"  # frisbeed -W 0 sends one block per clock tick; 10 Gbit/s is its own "no cap"


def versus(work: Path, runs: int) -> None:
    """Our client and server beside the real ones, one receiver, no bandwidth limit, on the same image."""
    image = make_image(work, 128, 3, mixed=False)  # cheap to decode: the clients' receive paths are compared
    gib = image.stat().st_size / (1 << 30)
    med = statistics.median
    rows = {}
    for server, client in (("frisbeed", "frisbee"), ("frisbeed", "ours"), ("ours", "frisbee"), ("ours", "ours")):
        bandwidth = FRISBEED_UNLIMITED if server == "frisbeed" else "0"
        got = [race(image, work, 5110, server, client, bandwidth) for _ in range(runs)]
        rows[server, client] = med(g[0] for g in got), med(g[1] for g in got), med(g[2] for g in got)
    print(f"image of {gib * 1024:.0f} MiB, one receiver, unlimited server (frisbeed -W {FRISBEED_UNLIMITED}, "
          f"nodeagent serve -W 0):")
    for (server, client), (secs, cpu, _) in rows.items():
        print(f"  {server:8} -> {client:7}  {secs:6.2f} s  {gib * 1024 / secs:6.1f} MiB/s  "
              f"client CPU {cpu / gib:5.2f} s per GiB")
    ours, real = rows["frisbeed", "ours"][0], rows["frisbeed", "frisbee"][0]
    print(f"  from frisbeed: our client takes {ours / real:.2f} x the real client's time (goal <= 0.8)")
    by_us, by_them = rows["ours", "frisbee"][0], rows["frisbeed", "frisbee"][0]
    print(f"  the real client: from our server {by_us / by_them:.2f} x its time from frisbeed (goal <= 1.0)")


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

    if FRISBEE and FRISBEED:
        versus(work, args.runs)
    else:
        print("(set NODEAGENT_FRISBEE and NODEAGENT_FRISBEED for the rows against the real frisbee)")

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
