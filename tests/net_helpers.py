"""Test hosts in network namespaces, the one set of helpers every test and benchmark uses.

`netns()` makes one empty namespace; `lan(n)` makes n hosts on a bridge of their own (10.77.0.0/24, a switch
namespace in between), optionally with packet loss. Everything stays inside namespaces these helpers create: no
traffic leaves them. Names carry the process id and a counter, so parallel runs never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"  # lan(): host i is SUBNET.(i+1)/24
BROADCAST = f"{SUBNET}.255"
_CLONE_NEWNET = 0x40000000
_ids = itertools.count()


def ip(*args: str) -> str:
    """Run iproute2's ip; its stdout. Raises CalledProcessError on failure."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def netns():
    """A fresh network namespace with only lo (up); yields its name. On exit, whatever still runs in it is killed
    and it is deleted."""
    name = f"na{os.getpid()}n{next(_ids)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def enter_netns(ns: str) -> None:
    """Move the calling thread into namespace ns: the sockets it (and threads it starts) creates live there.
    (Python 3.11 has no os.setns; this is test scaffolding, the agent itself never changes namespace.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn):
    """fn() on a thread inside namespace ns; its result (or exception) here."""
    box: dict = {}

    def run():
        try:
            enter_netns(ns)
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Host:
    ns: str
    addr: str

    def cmd(self, *args) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, args)]

    def nodeagent(self, *args) -> list[str]:
        exe = os.environ.get("NODEAGENT_BIN")  # the binary under test (conftest exports --nodeagent)
        return self.cmd(*([exe] if exe else [sys.executable, "-m", "agent"]), *args)

    def python(self, code: str) -> list[str]:
        """argv running Python code in this host, with the source tree and tests/ importable."""
        return self.cmd(sys.executable, "-c", code)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw = {"cwd": ROOT, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": _env(), **kw}
        return subprocess.Popen(argv, **kw)

    def run(self, argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, **{"cwd": ROOT, "capture_output": True, "timeout": timeout, "env": _env(), **kw})

    def call(self, fn):
        """fn() in this process, on a thread inside this host's namespace."""
        return in_netns(self.ns, fn)

    def drop_incoming_udp(self, percent: int, port: int) -> None:
        """Drop `percent`% of UDP datagrams to `port` arriving at this host (nftables numgen, no netem here)."""
        rules = (
            "table inet loss {\n chain input {\n  type filter hook input priority 0;\n"
            f"  udp dport {port} numgen random mod 100 < {percent} drop\n }}\n}}\n"
        )
        subprocess.run(self.cmd("nft", "-f", "-"), input=rules.encode(), check=True, capture_output=True)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@contextlib.contextmanager
def lan(count: int):
    """`count` hosts on one bridge: hosts[i] has SUBNET.(i+1)/24 (broadcast BROADCAST) and a multicast route."""
    with contextlib.ExitStack() as stack:
        switch = stack.enter_context(netns())
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        hosts: list[Host] = []
        for i in range(count):
            host = Host(stack.enter_context(netns()), f"{SUBNET}.{i + 1}")
            ip("-n", host.ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "broadcast", BROADCAST, "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            ip("-n", host.ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            hosts.append(host)
        yield hosts


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
