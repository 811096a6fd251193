"""Test hosts in network namespaces: a switch namespace with a bridge, one veth per host, optional packet loss.

Everything stays inside namespaces these helpers create (10.77.0.0/24 on a private bridge); no traffic leaves them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    ns: str
    addr: str

    def cmd(self, *args) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, args)]

    def nodeagent(self, *args) -> list[str]:
        exe = os.environ.get("NODEAGENT_BIN")  # the binary under test (conftest exports --nodeagent)
        return self.cmd(*([exe] if exe else [sys.executable, "-m", "agent"]), *args)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    def run(self, argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=timeout, **kw)

    def drop_incoming_udp(self, percent: int, port: int) -> None:
        """Drop `percent`% of UDP datagrams to `port` arriving at this host (nftables numgen, no netem here)."""
        rules = (
            "table inet loss {\n chain input {\n  type filter hook input priority 0;\n"
            f"  udp dport {port} numgen random mod 100 < {percent} drop\n }}\n}}\n"
        )
        subprocess.run(self.cmd("nft", "-f", "-"), input=rules.encode(), check=True, capture_output=True)


@contextlib.contextmanager
def lan(count: int):
    """`count` hosts on one bridge: hosts[i] has 10.77.0.(i+1)/24 and a multicast route."""
    tag = f"na{os.getpid() % 10000}x{next(_ids)}"
    switch = f"{tag}sw"
    hosts: list[Host] = []
    ip("netns", "add", switch)
    try:
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i in range(count):
            ns = f"{tag}h{i}"
            ip("netns", "add", ns)
            hosts.append(Host(ns, f"10.77.0.{i + 1}"))
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        yield hosts
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", switch], capture_output=True)


@contextlib.contextmanager
def dnsmasq(host: Host, workdir: Path, *options: str):
    """Debian's dnsmasq (package dnsmasq-base) as the DHCP server of `host`'s eth0 and nothing else (no DNS, no
    other interface, no config file), in the foreground; `options` are more --options (dhcp-range ...). Yields the
    process once it serves; its log is workdir/dnsmasq.log."""
    log = workdir / "dnsmasq.log"
    argv = host.cmd(
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
        "--bind-interfaces", "--except-interface=lo", "--no-ping", "--dhcp-authoritative", "--user=root",
        "--pid-file=", "--log-dhcp", f"--log-facility={log}", f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}",
        *options,
    )
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {proc.stderr.read().decode(errors='replace')}")
            if log.exists() and "DHCP, IP range" in log.read_text():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("dnsmasq did not start serving within 5 s")
        yield proc
    finally:
        proc.kill()
        proc.wait()
