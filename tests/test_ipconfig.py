"""agent.net.ipconfig: pxelinux's and the kernel's `ip=`, `BOOTIF=`, and the decision they lead to."""

from __future__ import annotations

import pytest

from agent.errors import NetworkError, UsageError
from agent.net.ipconfig import IpParam, Nic, decide, parse_bootif, parse_ip

NICS = [Nic("eth0", "52:54:00:12:34:56", True), Nic("eth1", "52:54:00:12:34:57", True),
        Nic("eth2", "52:54:00:12:34:58", False)]
PXE_IP = "10.78.0.111:10.78.0.1:10.78.0.1:255.255.255.0"


@pytest.mark.parametrize(
    "value, want",
    [
        (PXE_IP, IpParam("static", "10.78.0.111", "10.78.0.1", "10.78.0.1", "255.255.255.0")),
        ("10.0.0.5:0.0.0.0:0.0.0.0:255.255.0.0", IpParam("static", "10.0.0.5", netmask="255.255.0.0")),
        ("dhcp", IpParam("dhcp")), ("on", IpParam("dhcp")), ("any", IpParam("dhcp")), ("bootp", IpParam("dhcp")),
        ("off", IpParam("off")), ("none", IpParam("off")),
        ("10.0.0.2::10.0.0.1:255.0.0.0:node1:eth1:off", IpParam("static", "10.0.0.2", None, "10.0.0.1",
                                                                "255.0.0.0", "node1", "eth1")),
        ("10.0.0.2::10.0.0.1:255.0.0.0::eth1:off:10.0.0.53:10.0.0.54:10.0.0.123",
         IpParam("static", "10.0.0.2", None, "10.0.0.1", "255.0.0.0", None, "eth1", ("10.0.0.53", "10.0.0.54"))),
        (":::::eth1:dhcp", IpParam("dhcp", device="eth1")),
        ("::::::", IpParam("dhcp")), ("", IpParam("dhcp")),  # no client address: dynamic, as the kernel
        ("10.0.0.2:::::eth0:dhcp", IpParam("dhcp", "10.0.0.2", device="eth0")),
        (":::::eth0:off", IpParam("off", device="eth0")),
        ("10.1.2.3", IpParam("static", "10.1.2.3")),
    ],
)
def test_parse_ip(value, want):
    assert parse_ip(value) == want


@pytest.mark.parametrize(
    "value, reason",
    [
        ("dchp", "ip=dchp: client address 'dchp' is not an IPv4 address"),
        ("10.0.0.300:::", "ip=10.0.0.300:::: client address '10.0.0.300' is not an IPv4 address"),
        ("10.0.0.3:x::", "ip=10.0.0.3:x::: server 'x' is not an IPv4 address"),
        ("10.0.0.3::10.0.0:", "gateway '10.0.0' is not an IPv4 address"),
        ("10.0.0.3:::255.0.255.0", "netmask 255.0.255.0 is not a netmask"),
        ("10.0.0.3:::255.0.0.0:a b", "host name 'a b' is not a host name"),
        ("10.0.0.3:::255.0.0.0:h:eth/0", "device 'eth/0' is not an interface name"),
        ("10.0.0.3:::255.0.0.0:h:eth0123456789abc", "is not an interface name"),
        ("10.0.0.3:::255.0.0.0:h:eth0:rarp", "autoconf 'rarp' is not one of off, none, dhcp"),
        ("10.0.0.3:::255.0.0.0:h:eth0:off:8.8.8", "DNS server '8.8.8' is not an IPv4 address"),
        ("1:2:3:4:5:6:7:8:9:10:11", "11 fields, at most 10"),
    ],
)
def test_malformed_ip_is_a_usage_error_naming_the_value(value, reason):
    with pytest.raises(UsageError) as err:
        parse_ip(value)
    assert reason in str(err.value) and str(err.value).startswith(f"ip={value}: ")


def test_parse_bootif():
    assert parse_bootif("01-52-54-00-12-34-56") == "52:54:00:12:34:56"
    assert parse_bootif("01-AA-BB-CC-DD-EE-FF") == "aa:bb:cc:dd:ee:ff"
    for bad, reason in (("52-54-00-12-34-56", "not a hardware type and MAC"), ("01-52-54-00-12-34-5g", "not a"),
                        ("01:52:54:00:12:34:56", "not a"), ("06-52-54-00-12-34-56", "hardware type 06, not Ethernet"),
                        ("", "not a")):
        with pytest.raises(UsageError, match=f"^BOOTIF={bad}: {reason}"):
            parse_bootif(bad)


def test_pxelinux_ipappend_3_static_on_the_boot_nic():
    plan = decide(PXE_IP, "01-52-54-00-12-34-57", NICS)
    assert (plan.method, plan.interfaces) == ("static", ("eth1",))
    assert plan.static.address == "10.78.0.111" and plan.static.gateway == "10.78.0.1"
    assert plan.notes == ("network: interface eth1 from BOOTIF=01-52-54-00-12-34-57",
                          f"network: static 10.78.0.111/24 gateway 10.78.0.1 from ip={PXE_IP}")


def test_bootif_only_dhcp_on_that_nic():
    plan = decide(None, "01-52-54-00-12-34-58", NICS)  # even without a link yet: it is the one we booted from
    assert (plan.method, plan.interfaces, plan.static) == ("dhcp", ("eth2",), None)
    assert plan.notes == ("network: interface eth2 from BOOTIF=01-52-54-00-12-34-58", "network: DHCP (no ip=)")


def test_nothing_given_dhcp_on_every_nic_with_a_link():
    plan = decide(None, None, NICS)
    assert (plan.method, plan.interfaces) == ("dhcp", ("eth0", "eth1"))
    assert plan.notes == ("network: interface eth0, eth1 (every one with a link; no BOOTIF=)",
                          "network: DHCP (no ip=)")
    plan = decide("dhcp", None, NICS[2:])
    assert plan.interfaces == ("eth2",) and plan.notes[0].endswith("(no link seen on any: all of them; no BOOTIF=)")
    assert decide(None, None, NICS[:1]).notes[0] == "network: interface eth0 (the only one with a link; no BOOTIF=)"


def test_kernel_form_with_device_and_class_netmask():
    plan = decide("10.0.0.2::10.0.0.1::node1:eth2:off", None, NICS)
    assert (plan.method, plan.interfaces, plan.static.netmask) == ("static", ("eth2",), "255.0.0.0")
    assert plan.notes == ("network: interface eth2 from ip=10.0.0.2::10.0.0.1::node1:eth2:off",
                          "network: static 10.0.0.2/8 (the class's netmask) gateway 10.0.0.1 "
                          "from ip=10.0.0.2::10.0.0.1::node1:eth2:off")


def test_static_without_gateway_on_the_only_linked_nic():
    plan = decide("192.168.1.9:::255.255.255.0", None, NICS[:1] + NICS[2:])
    assert plan.interfaces == ("eth0",) and plan.notes[1].startswith("network: static 192.168.1.9/24 no gateway")


def test_off():
    plan = decide("off", "01-52-54-00-12-34-56", NICS)
    assert (plan.method, plan.interfaces, plan.notes) == ("off", (), ("network: not configured (ip=off)",))


def test_refusals():
    with pytest.raises(NetworkError, match=r"^no interface has MAC 52:54:00:12:34:99 \(BOOTIF=01-52-54-00-12-34-99\)$"):
        decide(None, "01-52-54-00-12-34-99", NICS)
    with pytest.raises(NetworkError, match="^no interface eth7 \\(the device of ip=:::::eth7:dhcp\\)$"):
        decide(":::::eth7:dhcp", None, NICS)
    with pytest.raises(UsageError, match="names eth0 but BOOTIF=01-52-54-00-12-34-57 is eth1"):
        decide(":::::eth0:dhcp", "01-52-54-00-12-34-57", NICS)
    with pytest.raises(NetworkError, match="does not say which interface, and eth0, eth1 could be it"):
        decide(PXE_IP, None, NICS)
    with pytest.raises(NetworkError, match="^no network interface$"):
        decide(None, None, [])
    with pytest.raises(UsageError, match="^BOOTIF=x:"):
        decide(None, "x", NICS)
