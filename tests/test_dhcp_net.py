"""The DHCP client and the static ip= set-up on real networks: Debian's dnsmasq serving a bridge in a network
namespace, our client in another, the result checked with `ip -n NS addr/route`. Nothing leaves the namespaces
(tests/net_helpers.py); dnsmasq serves only the server namespace's eth0.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from net_helpers import ROOT, dnsmasq, ip, lan

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (Debian dnsmasq-base)")

RANGE = "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,2m"  # dnsmasq's shortest lease is 2 minutes
# so renewal is driven by T1/T2 (options 58/59): dnsmasq takes values above 2 s and moves both earlier by a random
# "fuzz" of at most T1/8 s, which is 0 for a T1 below 8 s.
OPTIONS = ("--dhcp-option=option:router,10.77.0.1", "--dhcp-option=option:dns-server,10.77.0.53",
           "--dhcp-boot=pxelinux.0")

# The node's side, as the init will run it: decide from ip=/BOOTIF= and the interfaces, bring the network up, keep
# the lease while "the job" runs (until a log line contains `until`, or `hold` seconds), one line on failure.
CLIENT = """
import json, sys, time
from agent.errors import NodeagentError
from agent.net import bringup, ipconfig
args = json.loads(sys.argv[1])
t0 = time.monotonic()
lines = []
def log(line):
    lines.append(line)
    print(f"{time.monotonic() - t0:.2f} {line}", flush=True)
try:
    plan = ipconfig.decide(args["ip"], args["bootif"], bringup.present_nics(link_wait=2))
    keeper = bringup.bring_up(plan, timeout=args["timeout"], log=log)
except NodeagentError as err:
    print(err, file=sys.stderr)
    sys.exit(err.exit_status)
while time.monotonic() < t0 + args["hold"] and not any(args["until"] in line for line in lines[len(plan.notes) + 1:]):
    time.sleep(0.05)
if keeper:
    keeper.stop()
"""


def client_argv(host, *, ip=None, bootif=None, timeout=20.0, hold=0.0, until="\0") -> list[str]:
    args = dict(ip=ip, bootif=bootif, timeout=timeout, hold=hold, until=until)
    return host.cmd(sys.executable, "-c", CLIENT, json.dumps(args))


def run_client(host, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(client_argv(host, **kw), cwd=ROOT, capture_output=True, text=True, timeout=120)


def addresses(host) -> list[str]:
    out = subprocess.run(["ip", "-n", host.ns, "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    return re.findall(r"inet (\S+)", out)


def routes(host) -> list[str]:
    out = subprocess.run(["ip", "-n", host.ns, "-4", "route"], capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split()) for line in out.splitlines()]


def mac_of(host) -> str:
    out = subprocess.run(["ip", "-n", host.ns, "-o", "link", "show", "eth0"], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r"link/ether (\S+)", out).group(1)


def count_udp(host, match: str, verdict: str = "") -> None:
    """An nftables counter (and optional verdict) for UDP packets matching `match` leaving or entering `host`."""
    hook = "output" if "daddr" in match and verdict else "input"
    rules = (f"table inet dhcptest {{\n chain c {{\n  type filter hook {hook} priority 0;\n"
             f"  {match} counter {verdict}\n }}\n}}\n")
    subprocess.run(host.cmd("nft", "-f", "-"), input=rules.encode(), check=True, capture_output=True)


def counted(host) -> int:
    out = subprocess.run(host.cmd("nft", "list", "table", "inet", "dhcptest"), capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r"packets (\d+)", out).group(1))


@pytest.fixture
def net(tmp_path):
    """A server host (10.77.0.1) and a client host whose eth0 has no address yet."""
    with lan(2) as (server, client):
        ip("-n", client.ns, "addr", "flush", "dev", "eth0")
        ip("-n", client.ns, "link", "set", "eth0", "down")
        yield server, client


def test_lease_is_applied_and_renewed_at_t1(net, tmp_path):
    server, client = net
    count_udp(server, "ip daddr 10.77.0.1 udp dport 67")  # unicast to the server: the renewal
    with dnsmasq(server, tmp_path, RANGE, *OPTIONS, "--dhcp-option=58,3", "--dhcp-option=59,30"):
        proc = run_client(client, hold=15, until="renewed")
        log = (tmp_path / "dnsmasq.log").read_text()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in out[:2]] == [
        "network: interface eth0 (the only one with a link; no BOOTIF=)", "network: DHCP (no ip=)"]
    [address] = addresses(client)
    assert re.fullmatch(r"10\.77\.0\.1([0-4]\d|50)/24", address)
    lease = (f"eth0 {address} router 10.77.0.1 dns 10.77.0.53 from DHCP server 10.77.0.1 (lease 120 s, "
             "next server 10.77.0.1, boot file pxelinux.0)")
    assert out[2].split(" ", 1)[1] == f"network: {lease}"
    elapsed, renewed = out[3].split(" ", 1)
    assert renewed == f"network: renewed: {lease}"
    assert 2.5 <= float(elapsed) - float(out[2].split()[0]) < 5  # at T1 after the lease (and its application)
    assert "default via 10.77.0.1 dev eth0" in routes(client)
    assert counted(server) == 1  # the renewal went to the server by unicast
    mac = mac_of(client)
    assert log.count(f"DHCPACK(eth0) {address.split('/')[0]} {mac}") == 2
    assert f"DHCPDISCOVER(eth0) {mac}" in log


def test_rebinding_by_broadcast_when_the_server_is_unreachable_by_unicast(net, tmp_path):
    server, client = net
    count_udp(client, "ip daddr 10.77.0.1 udp dport 67", "drop")  # the unicast renewal is lost
    with dnsmasq(server, tmp_path, RANGE, *OPTIONS, "--dhcp-option=58,3", "--dhcp-option=59,5"):
        proc = run_client(client, hold=15, until="renewed")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    elapsed, line = out[3].split(" ", 1)
    assert line.startswith("network: renewed: eth0 10.77.0.1")
    assert 4.5 <= float(elapsed) - float(out[2].split()[0]) < 7  # at T2
    assert counted(client) == 1  # one unicast REQUEST (the next would be 60 s later), then the broadcast at T2


def test_nak_on_renewal_starts_over_with_a_new_lease(net, tmp_path):
    """The server is replaced by one for another range: it refuses the renewal (NAK) and leases a new address."""
    server, client = net
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    proc = None
    try:
        with dnsmasq(server, first, RANGE, *OPTIONS, "--dhcp-option=58,3"):
            proc = subprocess.Popen(client_argv(client, hold=20, until="new lease"), cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            lines = [proc.stdout.readline() for _ in range(3)]  # the lease is applied: replace the server
        with dnsmasq(server, second, "--dhcp-range=10.77.0.200,10.77.0.250,255.255.255.0,2m", *OPTIONS):
            out, err = proc.communicate(timeout=60)
            log = (second / "dnsmasq.log").read_text()
    finally:
        if proc and proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [line.split(" ", 1)[1] for line in "".join(lines + [out]).splitlines()]
    old = re.match(r"network: eth0 (10\.77\.0\.1\d\d)/24 ", lines[2]).group(1)
    assert re.fullmatch(rf"network: eth0 lost its address: server 10\.77\.0\.1 refused {old} \(NAK: .+\)", lines[3])
    assert re.match(r"network: new lease: eth0 10\.77\.0\.2\d\d/24 router 10\.77\.0\.1 ", lines[4])
    assert f"DHCPNAK(eth0) {old}" in log
    assert addresses(client) == [lines[4].split()[4]]  # the old address is gone
    assert "default via 10.77.0.1 dev eth0" in routes(client)


def test_no_server_gives_up_with_one_line(net):
    _, client = net
    start = time.monotonic()
    proc = run_client(client, timeout=3.0)
    assert 3.0 <= time.monotonic() - start < 10
    assert (proc.returncode, proc.stderr) == (6, "no DHCP lease: eth0: no DHCP server answered (1 DISCOVER in 3 s)\n")
    assert addresses(client) == []


def test_first_lease_wins_on_several_interfaces(net, tmp_path):
    """No BOOTIF=: DHCP on every interface with a link; one has no server behind it, the other gets the lease."""
    server, client = net
    # a veth pair: both ends sort before eth0, and nobody answers on them
    ip("-n", client.ns, "link", "add", "aa0", "type", "veth", "peer", "name", "aa1")
    ip("-n", client.ns, "link", "set", "aa0", "up")
    ip("-n", client.ns, "link", "set", "aa1", "up")  # both linked before the client looks
    with dnsmasq(server, tmp_path, RANGE, *OPTIONS):
        proc = run_client(client)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split(" ", 1)[1] for line in proc.stdout.splitlines()]
    assert lines[0] == "network: interface aa0, aa1, eth0 (every one with a link; no BOOTIF=)"
    assert lines[2].startswith("network: eth0 10.77.0.1")
    assert len(addresses(client)) == 1


def test_static_from_pxelinux_ip_and_bootif(net):
    """IPAPPEND 3: ip=client:server:gateway:netmask and BOOTIF= pick the NIC and the address; no DHCP at all."""
    _, client = net
    ip("-n", client.ns, "link", "add", "aa0", "type", "veth", "peer", "name", "aa1")  # another NIC, not the boot one
    bootif = "01-" + mac_of(client).replace(":", "-")
    value = "10.77.0.42:10.77.0.1:10.77.0.1:255.255.255.0"
    proc = run_client(client, ip=value, bootif=bootif)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" ", 1)[1] for line in proc.stdout.splitlines()] == [
        f"network: interface eth0 from BOOTIF={bootif}",
        f"network: static 10.77.0.42/24 gateway 10.77.0.1 from ip={value}"]
    assert addresses(client) == ["10.77.0.42/24"]
    assert "default via 10.77.0.1 dev eth0" in routes(client)


def test_malformed_ip_value_is_one_usage_line(net):
    _, client = net
    proc = run_client(client, ip="10.77.0.300:::255.255.255.0")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "ip=10.77.0.300:::255.255.255.0: client address '10.77.0.300' is not an IPv4 address\n"


def test_a_lost_lease_takes_the_address_and_its_routes_away(net):
    """What the lease keeper does on Expired (netif.clear_address), on a configured interface."""
    _, client = net
    code = "from agent.net import bringup\nbringup.configure('eth0', '10.77.0.9', '255.255.255.0', '10.77.0.1')\n"
    subprocess.run(client.cmd(sys.executable, "-c", code), cwd=ROOT, check=True)
    assert addresses(client) == ["10.77.0.9/24"] and "default via 10.77.0.1 dev eth0" in routes(client)
    subprocess.run(client.cmd(sys.executable, "-c", "from agent import netif; netif.clear_address('eth0')"),
                   cwd=ROOT, check=True)
    assert addresses(client) == [] and routes(client) == []
