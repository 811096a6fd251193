"""agent.netif and the interface ioctls of agent.linux, only inside network namespaces these tests create.

Every ioctl runs in a child process entered into the namespace with `ip netns exec`; the host's own interfaces and
routes are never touched.  Each namespace holds one veth pair (v0, v1) with fixed MACs and is deleted in a finally.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from net_helpers import ip, netns

ROOT = Path(__file__).resolve().parent.parent
MAC0, MAC1 = "02:00:00:aa:bb:cc", "02:00:00:aa:bb:dd"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (network namespaces)"
)


@contextlib.contextmanager
def veth_namespace():
    """A fresh network namespace with veth pair v0/v1 (MAC0/MAC1, down, no addresses); yields its name."""
    with netns() as ns:
        ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("-n", ns, "link", "set", "v0", "address", MAC0)
        ip("-n", ns, "link", "set", "v1", "address", MAC1)
        yield ns


@pytest.fixture
def ns():
    with veth_namespace() as name:
        yield name


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)


def py_in_ns(ns: str, code: str) -> str:
    """Run Python `code` in the namespace; returns its stdout, fails the test with its stderr."""
    proc = in_ns(ns, sys.executable, "-c", textwrap.dedent(code))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ----------------------------------------------------------------- getmac


def test_getmac_lists_every_ethernet_interface(ns, cli_command):
    proc = in_ns(ns, *cli_command, "getmac")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"v0 {MAC0}\nv1 {MAC1}\n"


def test_getmac_one_interface(ns, cli_command):
    proc = in_ns(ns, *cli_command, "getmac", "v1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"v1 {MAC1}\n", "")


@pytest.mark.parametrize("name", ["eth9", "x" * 40, "a/b"])
def test_getmac_unknown_interface(ns, name, cli_command):
    proc = in_ns(ns, *cli_command, "getmac", name)
    assert (proc.returncode, proc.stdout, proc.stderr) == (6, "", f"nodeagent getmac: no interface {name}\n")


def test_getmac_skips_interfaces_without_ethernet_address(ns, cli_command):
    ip("-n", ns, "link", "add", "br9", "type", "bridge")  # Ethernet: listed
    ip("-n", ns, "tuntap", "add", "dev", "tun0", "mode", "tun")  # no hardware address: left out
    out = py_in_ns(ns, "from agent import netif; print(netif.macs())")
    assert "br9" in out and "tun0" not in out and "'lo'" not in out
    proc = in_ns(ns, *cli_command, "getmac", "tun0")
    assert proc.returncode == 6 and proc.stderr.startswith("nodeagent getmac: tun0 has no Ethernet address")


def test_getmac_empty_namespace(cli_command):
    """Only lo: nothing to print, success."""
    with veth_namespace() as ns:
        ip("-n", ns, "link", "del", "v0")
        proc = in_ns(ns, *cli_command, "getmac")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# ----------------------------------------------------------------- configuring an interface


def test_configure_boot_interface(ns):
    out = py_in_ns(
        ns,
        """
        from agent import netif
        print(netif.is_up("v0"))
        netif.set_address("v0", "10.99.0.2")
        netif.set_netmask("v0", "255.255.255.0")
        netif.set_up("v0")
        netif.set_up("v1")
        print(netif.is_up("v0"))
        netif.add_default_route("10.99.0.1")
        """,
    )
    assert out.split() == ["False", "True"]
    addr = ip("-n", ns, "-4", "-o", "addr", "show", "dev", "v0")
    assert "inet 10.99.0.2/24 " in addr
    assert "UP" in ip("-n", ns, "link", "show", "v0").split(">")[0]
    routes = ip("-n", ns, "-4", "route").splitlines()
    assert "default via 10.99.0.1 dev v0" in [r.split(" linkdown")[0].strip() for r in routes]
    assert any(r.startswith("10.99.0.0/24 dev v0 ") for r in routes)


def test_default_route_with_interface_and_metric(ns):
    py_in_ns(
        ns,
        """
        from agent import netif
        netif.set_address("v1", "10.98.0.5")
        netif.set_netmask("v1", "255.255.0.0")
        netif.set_up("v1")
        netif.add_default_route("10.98.7.1", "v1", metric=5)
        """,
    )
    assert "inet 10.98.0.5/16 " in ip("-n", ns, "-4", "-o", "addr", "show", "dev", "v1")
    assert ip("-n", ns, "-4", "route", "show", "default").split()[:7] == [
        "default", "via", "10.98.7.1", "dev", "v1", "metric", "5"
    ]


def test_ipv4_interfaces(ns):
    """Only interfaces with an IPv4 address, with their flags and broadcast address (SIOCGIFADDR/FLAGS/BRDADDR)."""
    ip("-n", ns, "addr", "add", "10.96.1.2/16", "broadcast", "10.96.255.255", "dev", "v0")
    ip("-n", ns, "link", "set", "v0", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    out = py_in_ns(
        ns,
        """
        import errno, socket
        from agent import netif, linux
        from agent.errors import LinuxError
        for i in netif.ipv4_interfaces():
            print(i.name, i.addr, i.broadcast, bool(i.flags & linux.IFF_UP), bool(i.flags & linux.IFF_BROADCAST))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for name in ("v1", "eth9"):
                try:
                    linux.ipv4_address(s, name)
                except LinuxError as err:
                    print(name, errno.errorcode[err.errno], err)
        """,
    ).splitlines()
    assert out[:2] == ["lo 127.0.0.1 None True False", "v0 10.96.1.2 10.96.255.255 True True"]
    assert out[2].startswith("v1 EADDRNOTAVAIL SIOCGIFADDR v1: ")
    assert out[3].startswith("eth9 ENODEV SIOCGIFADDR eth9: ")
    assert len(out) == 4


def test_set_down(ns):
    ip("-n", ns, "link", "set", "v0", "up")
    py_in_ns(ns, "from agent import netif; netif.set_up('v0', False); assert not netif.is_up('v0')")
    assert "UP" not in ip("-n", ns, "link", "show", "v0").split(">")[0].split("<")[1].split(",")


def test_configuration_errors(ns):
    out = py_in_ns(
        ns,
        """
        import errno
        from agent import netif, linux
        from agent.errors import LinuxError

        def error(call, *args, **kw):
            try:
                call(*args, **kw)
            except Exception as err:
                return f"{type(err).__name__}:{getattr(err, 'errno', '')}:{err}"
            return "ok"

        print(error(netif.set_address, "eth9", "10.0.0.1"))
        print(error(netif.set_up, "eth9"))
        print(error(netif.add_default_route, "10.97.0.1"))              # no interface reaches it
        print(error(netif.set_address, "v0", "10.0.0.300"))              # refused before the ioctl
        print(error(netif.set_netmask, "v0", "not-a-mask"))
        print(error(netif.add_default_route, "10.97.0.1", metric=-1))
        netif.set_address("v0", "10.97.0.2"); netif.set_netmask("v0", "255.255.255.0"); netif.set_up("v0")
        netif.add_default_route("10.97.0.1")
        print(error(netif.add_default_route, "10.97.0.1"))               # already there
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            print(error(linux.set_interface_flags, s, "v0", 1 << 16))   # more than ifr_flags holds
            print(error(linux.hardware_address, s, "v0\\0x"))
        """,
    ).splitlines()
    assert out[0] == "NoInterfaceError::no interface eth9"
    assert out[1] == "NoInterfaceError::no interface eth9"
    assert out[2].startswith("LinuxError:101:SIOCADDRT 0.0.0.0/0.0.0.0 via 10.97.0.1: ")  # ENETUNREACH
    assert out[3].startswith("ValueError:") and out[4].startswith("ValueError:") and out[5].startswith("ValueError:")
    assert out[6].startswith("LinuxError:17:SIOCADDRT")  # EEXIST
    assert out[7].startswith("LinuxError:22:SIOCSIFFLAGS v0: ")  # EINVAL
    assert out[8].startswith("ValueError:")
    assert "10.97.0.2" not in ip("-4", "-o", "addr")  # the host saw none of it
