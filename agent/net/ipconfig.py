"""What the boot network should be, from the kernel command line's `ip=` and `BOOTIF=` values, pure.

  BOOTIF=01-aa-bb-cc-dd-ee-ff   pxelinux's IPAPPEND 2: the NIC we booted from (01: Ethernet)
  ip=CLIENT:SERVER:GATEWAY:NETMASK   pxelinux's IPAPPEND 1: a static address, no DHCP
  ip=CLIENT:SERVER:GW:NETMASK:HOST:DEVICE:AUTOCONF:DNS0:DNS1:NTP0   the kernel's form (any tail may be left out)
  ip=dhcp|on|any|bootp|both  DHCP;  ip=off|none  no network set-up

As the kernel does: a client address means a static set-up unless AUTOCONF asks for DHCP, a missing netmask is
the address's class default, 0.0.0.0 counts as not given. decide() turns these values (already split off the
command line) and the interfaces present into a Plan whose notes say, one console line each, what was decided and
from which value. A malformed value is a UsageError naming it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

from ..errors import NetworkError, UsageError
from .dhcp import classful_netmask

DHCP_WORDS = ("dhcp", "on", "any", "bootp", "both")  # the kernel's autoconf words for a dynamic set-up
OFF_WORDS = ("off", "none")


class Nic(NamedTuple):
    name: str
    mac: str  # "aa:bb:cc:dd:ee:ff", lower case
    link: bool  # carrier seen (IFF_RUNNING)


@dataclass(frozen=True)
class IpParam:
    method: str  # "static", "dhcp" or "off"
    address: Optional[str] = None
    server: Optional[str] = None
    gateway: Optional[str] = None
    netmask: Optional[str] = None
    hostname: Optional[str] = None
    device: Optional[str] = None
    dns: tuple = ()


@dataclass(frozen=True)
class Plan:
    method: str  # "static", "dhcp" or "off"
    interfaces: tuple  # static: the one interface; dhcp: where to run it (the first lease wins)
    static: Optional[IpParam]  # the address, netmask, gateway ... of a static set-up
    notes: tuple  # one console line per decision, naming the value it came from


def _address(value: str, field: str, text: str) -> Optional[str]:
    if not text:
        return None
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise UsageError(f"ip={value}: {field} {text!r} is not an IPv4 address") from None
    return None if addr.packed == bytes(4) else str(addr)


def prefix_of(netmask: str) -> int:
    return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def parse_ip(value: str) -> IpParam:
    """The kernel's or pxelinux's `ip=` value (what follows "ip=")."""
    fields = value.split(":")
    if len(fields) == 1 and fields[0] in DHCP_WORDS + OFF_WORDS:
        return IpParam("off" if fields[0] in OFF_WORDS else "dhcp")
    if len(fields) > 10:
        raise UsageError(f"ip={value}: {len(fields)} fields, at most 10")
    fields += [""] * (10 - len(fields))
    client, server, gateway, netmask, hostname, device, autoconf, dns0, dns1, ntp = fields
    address = _address(value, "client address", client)
    mask = _address(value, "netmask", netmask)
    if mask is not None:
        try:
            prefix_of(mask)
        except ValueError:
            raise UsageError(f"ip={value}: netmask {mask} is not a netmask") from None
    if hostname and not (hostname.isascii() and hostname.isprintable() and " " not in hostname and len(hostname) < 64):
        raise UsageError(f"ip={value}: host name {hostname!r} is not a host name")
    if device and (len(device) > 15 or "/" in device or not device.isprintable() or " " in device):
        raise UsageError(f"ip={value}: device {device!r} is not an interface name")
    if autoconf not in ("",) + DHCP_WORDS + OFF_WORDS:
        raise UsageError(f"ip={value}: autoconf {autoconf!r} is not one of off, none, dhcp, on, any, bootp, both")
    _address(value, "NTP server", ntp)
    dns = tuple(a for a in (_address(value, "DNS server", dns0), _address(value, "DNS server", dns1)) if a)
    if autoconf in DHCP_WORDS or address is None:
        method = "dhcp" if autoconf not in OFF_WORDS else "off"
    else:
        method = "static"
    return IpParam(method, address, _address(value, "server", server), _address(value, "gateway", gateway),
                   mask, hostname or None, device or None, dns)


def parse_bootif(value: str) -> str:
    """pxelinux's `BOOTIF=` value "01-aa-bb-cc-dd-ee-ff" -> the MAC "aa:bb:cc:dd:ee:ff"."""
    parts = value.lower().split("-")
    if len(parts) != 7 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise UsageError(f"BOOTIF={value}: not a hardware type and MAC such as 01-aa-bb-cc-dd-ee-ff")
    if parts[0] != "01":
        raise UsageError(f"BOOTIF={value}: hardware type {parts[0]}, not Ethernet (01)")
    return ":".join(parts[1:])


def decide(ip: Optional[str], bootif: Optional[str], nics: list) -> Plan:
    """What to do, given the `ip=` and `BOOTIF=` values (None: not on the command line) and the Ethernet
    interfaces present (Nic tuples). NetworkError when the interface they name is not there."""
    param = parse_ip(ip) if ip is not None else IpParam("dhcp")
    mac = parse_bootif(bootif) if bootif is not None else None
    source = f"ip={ip}" if ip is not None else "no ip="
    if param.method == "off":
        return Plan("off", (), None, (f"network: not configured ({source})",))
    by_mac = [n.name for n in nics if n.mac == mac]
    if param.device:
        if param.device not in [n.name for n in nics]:
            raise NetworkError(f"no interface {param.device} (the device of ip={ip})")
        if mac and by_mac != [param.device]:
            raise UsageError(f"ip={ip} names {param.device} but BOOTIF={bootif} is {by_mac[0] if by_mac else 'absent'}")
        names, why = (param.device,), f"from ip={ip}"
    elif mac:
        if not by_mac:
            raise NetworkError(f"no interface has MAC {mac} (BOOTIF={bootif})")
        names, why = (by_mac[0],), f"from BOOTIF={bootif}"
    else:
        linked = [n.name for n in nics if n.link]
        names = tuple(linked or [n.name for n in nics])
        if not names:
            raise NetworkError("no network interface")
        if param.method == "static" and len(names) > 1:
            raise NetworkError(f"ip={ip} does not say which interface, and {', '.join(names)} could be it "
                               "(add BOOTIF=, pxelinux's IPAPPEND 2, or ip='s device field)")
        why = ("(no link seen on any: all of them" if not linked else "(every one with a link" if len(names) > 1
               else "(the only one with a link") + "; no BOOTIF=)"
    interface = f"network: interface {', '.join(names)} {why}"
    if param.method == "dhcp":
        return Plan("dhcp", names, None, (interface, f"network: DHCP ({source})"))
    line = f"network: static {param.address}"
    if param.netmask is None:
        param = replace(param, netmask=classful_netmask(param.address))
        line += f"/{prefix_of(param.netmask)} (the class's netmask)"
    else:
        line += f"/{prefix_of(param.netmask)}"
    line += f" gateway {param.gateway}" if param.gateway else " no gateway"
    return Plan("static", names, param, (interface, f"{line} from ip={ip}"))
