"""A TCP proxy that injects faults, for the HTTP resume tests: run it inside a test namespace.

    python tests/fault_proxy.py LISTEN_ADDR:PORT UPSTREAM_ADDR:PORT [--cut-after N] [--cuts K] [--lie-length D]

Connections are cut (both directions closed) when N bytes have come from the upstream, K times in all; then every
connection passes through.
--lie-length D adds D to every Content-Length of 64 KiB or more that the upstream sends. Prints `ready` once listening, and one
line per finished connection: `conn I: B bytes from upstream[, cut]`.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import threading


cuts_left = [0]
lock = threading.Lock()


def take_cut() -> bool:
    with lock:
        if cuts_left[0] > 0:
            cuts_left[0] -= 1
            return True
        return False


def lied(length: int, lie: int) -> int:
    return length + lie if length >= 65536 else length  # image bodies only, not error pages or sidecars


def pipe(src: socket.socket, dst: socket.socket, limit: int | None, lie: int, counter: list) -> None:
    head_done = lie == 0
    buf = b""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if not head_done:
                buf += data
                if b"\r\n\r\n" not in buf:
                    continue
                head, _, rest = buf.partition(b"\r\n\r\n")
                head = re.sub(rb"(?im)^(content-length:\s*)(\d+)", lambda m: m[1] + str(lied(int(m[2]), lie)).encode(), head)
                data, head_done = head + b"\r\n\r\n" + rest, True
            if limit and counter[0] + len(data) >= limit and take_cut():
                dst.sendall(data[: limit - counter[0]])
                counter[0] = limit
                counter[1] = True
                break
            dst.sendall(data)
            counter[0] += len(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("listen")
    parser.add_argument("upstream")
    parser.add_argument("--cut-after", type=int, default=0)
    parser.add_argument("--cuts", type=int, default=0)
    parser.add_argument("--lie-length", type=int, default=0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(16)
    print("ready", flush=True)
    cuts_left[0] = args.cuts
    number = 0
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((up_host, int(up_port)))
        limit = args.cut_after
        counter = [0, False]
        up = threading.Thread(target=pipe, args=(client, upstream, None, 0, [0, False]), daemon=True)
        up.start()

        def down(client=client, upstream=upstream, limit=limit, counter=counter, number=number):
            pipe(upstream, client, limit, args.lie_length, counter)
            client.close()
            upstream.close()
            print(f"conn {number}: {counter[0]} bytes from upstream{', cut' if counter[1] else ''}", flush=True)

        threading.Thread(target=down, daemon=True).start()
        number += 1


if __name__ == "__main__":
    sys.exit(main())
