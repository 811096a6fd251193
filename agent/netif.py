"""Network interfaces of the boot environment: list them, read MACs and IPv4 addresses, and configure the boot
interface (address, netmask, up, default route) without iproute2, through the classic ioctls in agent.linux.

Everything acts on the network namespace of the calling process.  Interfaces are listed with if_nameindex(3)
(netlink), not /sys/class/net, which shows the namespace of whoever mounted sysfs.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from . import linux
from .errors import LinuxError, NetworkError, NodeagentError


class NoInterfaceError(NetworkError):
    """The named network interface does not exist (in this network namespace)."""


@contextlib.contextmanager
def _ioctl_socket() -> Iterator[socket.socket]:
    """An AF_INET datagram socket, the usual handle for interface ioctls (it is never bound or used to send)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        yield sock


def _no_such(name: str, err: LinuxError) -> NodeagentError:
    if err.errno == errno.ENODEV:
        return NoInterfaceError(f"no interface {name}")
    return err


def interface_names() -> list[str]:
    """Names of all network interfaces (lo included), sorted."""
    return sorted(name for _, name in socket.if_nameindex())


@dataclass(frozen=True)
class IPv4Interface:
    """An interface with an IPv4 address: its primary address, IFF_* flags and broadcast address (None without
    IFF_BROADCAST)."""

    name: str
    addr: str
    flags: int
    broadcast: str | None


def ipv4_interfaces() -> list[IPv4Interface]:
    """Every interface that has an IPv4 address (SIOCGIFADDR, SIOCGIFFLAGS, SIOCGIFBRDADDR), sorted by name."""
    found = []
    with _ioctl_socket() as sock:
        for name in interface_names():
            try:
                addr = linux.ipv4_address(sock, name)
                flags = linux.interface_flags(sock, name)
                bcast = linux.ipv4_broadcast(sock, name) if flags & linux.IFF_BROADCAST else None
            except (LinuxError, ValueError):
                continue  # no IPv4 address, gone since it was listed, or a name the ioctls cannot carry
            found.append(IPv4Interface(name, addr, flags, bcast))
    return found


def _format_mac(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def get_mac(name: str) -> str:
    """The MAC address of Ethernet interface `name` as "02:00:00:aa:bb:cc" (SIOCGIFHWADDR).

    NoInterfaceError when there is no such interface; NetworkError when it has no Ethernet address (tun,
    wireguard, ...).
    """
    try:
        with _ioctl_socket() as sock:
            family, data = linux.hardware_address(sock, name)
    except ValueError:  # not even a possible interface name
        raise NoInterfaceError(f"no interface {name}") from None
    except LinuxError as err:
        raise _no_such(name, err) from None
    if family not in (linux.ARPHRD_ETHER, linux.ARPHRD_LOOPBACK):
        raise NetworkError(f"{name} has no Ethernet address (link type {family})")
    return _format_mac(data[:6])


def macs(name: str | None = None) -> list[tuple[str, str]]:
    """(interface, MAC) for `name`, or for every Ethernet interface when None (loopback and interfaces without an
    Ethernet address left out), sorted by name."""
    if name is not None:
        return [(name, get_mac(name))]
    result = []
    with _ioctl_socket() as sock:
        for ifname in interface_names():
            try:
                family, data = linux.hardware_address(sock, ifname)
            except LinuxError as err:
                if err.errno == errno.ENODEV:  # went away since it was listed
                    continue
                raise
            if family == linux.ARPHRD_ETHER:
                result.append((ifname, _format_mac(data[:6])))
    return result


def _configure(name: str, call, *args) -> None:
    try:
        with _ioctl_socket() as sock:
            call(sock, name, *args)
    except LinuxError as err:
        raise _no_such(name, err) from None


def set_address(name: str, addr: str) -> None:
    """Give interface `name` the IPv4 address `addr` (SIOCSIFADDR; the kernel sets the classful netmask, so call
    set_netmask() after it)."""
    _configure(name, linux.set_ipv4_address, addr)


def clear_address(name: str) -> None:
    """Remove interface `name`'s IPv4 address, and the routes through it (SIOCSIFADDR with 0.0.0.0), e.g. when a
    DHCP lease is lost."""
    _configure(name, linux.set_ipv4_address, "0.0.0.0")


def set_netmask(name: str, netmask: str) -> None:
    """Set the netmask ("255.255.255.0") of interface `name`'s IPv4 address (SIOCSIFNETMASK)."""
    _configure(name, linux.set_ipv4_netmask, netmask)


def set_up(name: str, up: bool = True) -> None:
    """Bring interface `name` up (or down): read its flags, change IFF_UP, write them back."""

    def change(sock, ifname):
        flags = linux.interface_flags(sock, ifname)
        new = flags | linux.IFF_UP if up else flags & ~linux.IFF_UP
        if new != flags:
            linux.set_interface_flags(sock, ifname, new)

    _configure(name, change)


def is_up(name: str) -> bool:
    """Whether interface `name` is administratively up (IFF_UP)."""
    try:
        with _ioctl_socket() as sock:
            return bool(linux.interface_flags(sock, name) & linux.IFF_UP)
    except LinuxError as err:
        raise _no_such(name, err) from None


def has_link(name: str) -> bool:
    """Whether interface `name` is up and has a carrier (IFF_RUNNING): a cable, a peer, a bridge port."""
    try:
        with _ioctl_socket() as sock:
            return bool(linux.interface_flags(sock, name) & linux.IFF_RUNNING)
    except LinuxError as err:
        raise _no_such(name, err) from None


def add_default_route(gateway: str, name: str | None = None, metric: int = 0) -> None:
    """Add the IPv4 default route via `gateway` (out of interface `name`, or whichever reaches the gateway)
    (SIOCADDRT).  The interface needs an address on the gateway's subnet first."""
    with _ioctl_socket() as sock:
        try:
            linux.add_ipv4_route(sock, "0.0.0.0", "0.0.0.0", gateway=gateway, ifname=name, metric=metric)
        except LinuxError as err:
            raise _no_such(name, err) if name is not None else err from None
