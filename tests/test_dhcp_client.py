"""agent.net.dhcp: the DHCP client engine without sockets; time, transaction ids and jitter are injected."""

from __future__ import annotations

import pytest

from agent.net import dhcp
from agent.net import dhcpmsg as m

MAC = bytes.fromhex("020000aabbcc")
SERVER = "10.0.0.1"


class Rng:
    """The engine's random source: xids 1000, 1001, ...; jitter fixed by `fraction` (0.5: none, 0: -1 s)."""

    def __init__(self, fraction: float = 0.5):
        self.fraction, self.xid = fraction, 999

    def random(self):
        return self.fraction

    def getrandbits(self, bits):
        self.xid += 1
        return self.xid


def server_reply(request: bytes, kind: int, *, address="10.0.0.50", server=SERVER, lease=120, t1=None, t2=None,
                 xid=None, mac=MAC, extra=None) -> bytes:
    """What a server answers to `request` (a datagram the client sent)."""
    req = m.decode(request)
    options = {m.MESSAGE_TYPE: bytes((kind,))}
    if server:
        options[m.SERVER_ID] = bytes(map(int, server.split(".")))
    if kind != m.NAK:
        options[m.SUBNET] = bytes((255, 255, 255, 0))
        options[m.ROUTER] = bytes((10, 0, 0, 1))
        if lease is not None:
            options[m.LEASE_TIME] = lease.to_bytes(4, "big")
        for code, value in ((m.T1, t1), (m.T2, t2)):
            if value is not None:
                options[code] = value.to_bytes(4, "big")
    options.update(extra or {})
    return m.encode(m.Message(m.BOOTREPLY, req.xid if xid is None else xid, mac, options,
                              yiaddr=address if kind != m.NAK else "0.0.0.0", siaddr=SERVER))


def sent(client) -> list[tuple[m.Message, tuple]]:
    return [(m.decode(data), dest) for data, dest in client.outgoing()]


def start(now=0.0, **kw):
    client = dhcp.DhcpClient(MAC, now, rng=Rng(kw.pop("fraction", 0.5)), **kw)
    assert client.next_deadline() == now
    assert client.timer(now) == []
    [(discover, dest)] = sent(client)
    return client, discover, dest


def bind(now=0.0, engine=None, **kw):
    """A client bound at `now` (lease options in kw, engine arguments in `engine`); returns it and its lease."""
    client, discover, _ = start(now, **(engine or {}))
    client.receive(server_reply(m.encode(discover), m.OFFER, **kw), (SERVER, 67), now)
    [(request, _)] = sent(client)
    [event] = client.receive(server_reply(m.encode(request), m.ACK, **kw), (SERVER, 67), now)
    assert isinstance(event, dhcp.Bound)
    return client, event.lease


def test_discover_offer_request_ack():
    client, discover, dest = start(now=100.0, hostname="node7")
    assert dest == ("255.255.255.255", 67)
    assert (discover.op, discover.type, discover.xid, discover.mac, discover.flags) == (
        m.BOOTREQUEST, m.DISCOVER, 1000, MAC, m.BROADCAST_FLAG)
    assert discover.options[m.CLIENT_ID] == b"\x01" + MAC and discover.text(m.HOSTNAME) == "node7"
    assert set(discover.options[m.PARAMS]) >= {1, 3, 6, 12, 51, 54, 58, 59, 66, 67}

    assert client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), 100.5) == []
    [(request, dest)] = sent(client)
    assert dest == ("255.255.255.255", 67) and request.type == m.REQUEST and request.xid == 1000
    assert request.address(m.REQUESTED_IP) == "10.0.0.50" and request.address(m.SERVER_ID) == SERVER
    assert request.ciaddr == "0.0.0.0" and request.flags == m.BROADCAST_FLAG

    ack = server_reply(m.encode(request), m.ACK, extra={m.DNS: bytes((10, 0, 0, 53)), m.HOSTNAME: b"n7",
                                                       m.DOMAIN: b"grid", m.BOOT_FILE: b"pxelinux.0"})
    [event] = client.receive(ack, (SERVER, 67), 100.6)
    assert event == dhcp.Bound(dhcp.Lease("10.0.0.50", "255.255.255.0", ("10.0.0.1",), ("10.0.0.53",), "n7", "grid",
                                          120, 60, 105, SERVER, SERVER, "pxelinux.0"))
    assert event.lease.prefix == 24 and event.lease.router == "10.0.0.1"
    assert client.next_deadline() == pytest.approx(160.6)  # T1: half the lease
    assert client.outgoing() == [] and client.timer(150.0) == []


def test_discover_backoff_4_8_16_capped_with_jitter():
    client, _, _ = start(fraction=0.5, max_interval=16, timeout=100)
    times, now = [], 0.0
    for _ in range(5):
        now = client.next_deadline()
        times.append(now)
        client.timer(now)
        assert len(sent(client)) == 1
    assert times == [4, 12, 28, 44, 60]
    low, _, _ = start(fraction=0.0)  # the jitter source's smallest value: 1 s early
    assert low.next_deadline() == 3.0
    high, _, _ = start(fraction=0.999)
    assert high.next_deadline() == pytest.approx(4.998)


def test_early_timer_calls_send_nothing():
    client, _, _ = start()
    assert client.timer(3.9) == [] and client.outgoing() == []


def test_replies_to_others_and_garbage_are_ignored_and_counted():
    client, discover, _ = start()
    request_bytes = m.encode(discover)
    for data in (server_reply(request_bytes, m.OFFER, xid=7), server_reply(request_bytes, m.OFFER, mac=b"\1" * 6),
                 b"garbage", server_reply(request_bytes, m.ACK), m.encode(discover),
                 server_reply(request_bytes, m.OFFER, server=None)):
        assert client.receive(data, (SERVER, 67), 1.0) == []
        assert client.outgoing() == []
    assert client.stats.ignored == 6 and client.state == dhcp.SELECTING
    assert client.stats.last_ignored == "OFFER without an address or a server identifier"


def test_the_first_offer_wins():
    client, discover, _ = start()
    client.receive(server_reply(m.encode(discover), m.OFFER, address="10.0.0.60"), (SERVER, 67), 1.0)
    client.receive(server_reply(m.encode(discover), m.OFFER, address="10.0.0.70", server="10.0.0.2"), None, 1.1)
    [(request, _)] = sent(client)
    assert request.address(m.REQUESTED_IP) == "10.0.0.60"
    assert client.stats.last_ignored == "OFFER not expected while REQUESTING"
    # an ACK from the other server is not ours
    assert client.receive(server_reply(m.encode(request), m.ACK, server="10.0.0.2"), None, 1.2) == []


def test_nak_while_requesting_starts_over_with_a_new_xid():
    client, discover, _ = start()
    client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), 1.0)
    [(request, _)] = sent(client)
    assert client.receive(server_reply(m.encode(request), m.NAK, extra={m.MESSAGE: b"wrong network"}), None,
                          1.1) == []
    [(again, dest)] = sent(client)
    assert again.type == m.DISCOVER and again.xid == 1001 and client.state == dhcp.SELECTING
    # no server gives a lease: the reason is the NAK
    [event] = client.timer(60.0)
    assert event == dhcp.GaveUp("no lease in 60 s: server 10.0.0.1 refused 10.0.0.50 (NAK: wrong network)")


def test_repeated_naks_slow_down():
    client, discover, _ = start()
    for i, now in enumerate((1.0, 2.0)):
        client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), now)
        [(request, _)] = sent(client)
        client.receive(server_reply(m.encode(request), m.NAK), None, now)
        out = sent(client)
        if i == 0:
            [(discover, _)] = out  # the first NAK: DISCOVER at once
        else:
            assert out == [] and client.next_deadline() == 6.0  # the second: after the first interval


def test_request_unanswered_goes_back_to_discover():
    client, discover, _ = start(request_tries=2)
    client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), 1.0)
    assert len(sent(client)) == 1
    client.timer(client.next_deadline())
    [(again, _)] = sent(client)
    assert again.type == m.REQUEST and again.xid == 1000
    client.timer(client.next_deadline())
    [(rediscover, _)] = sent(client)
    assert rediscover.type == m.DISCOVER and rediscover.xid == 1001
    [event] = client.timer(60.0)
    assert event.reason == "no lease in 60 s: server 10.0.0.1 offered 10.0.0.50 but did not acknowledge it"


def test_gives_up_with_one_reason_when_no_server_answers():
    client, _, _ = start(timeout=30.0)
    events = []
    while client.next_deadline() != float("inf"):
        events += client.timer(client.next_deadline())
        client.outgoing()
    assert events == [dhcp.GaveUp("no DHCP server answered (4 DISCOVERs in 30 s)")]
    assert client.receive(b"x" * 300, None, 31.0) == [] and client.timer(100.0) == []


def test_ack_without_lease_time_is_ignored():
    client, discover, _ = start()
    client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), 1.0)
    [(request, _)] = sent(client)
    assert client.receive(server_reply(m.encode(request), m.ACK, lease=None), None, 1.1) == []
    assert client.stats.last_ignored == "ACK without a lease time" and client.state == dhcp.REQUESTING


def test_renew_at_t1_unicast_then_rebind_at_t2_broadcast():
    client, lease = bind(now=10.0, lease=100, t1=20, t2=80)
    assert (lease.t1, lease.t2) == (20, 80) and client.next_deadline() == 30.0
    assert client.timer(30.0) == []
    [(renew, dest)] = sent(client)
    assert dest == (SERVER, 67) and renew.type == m.REQUEST and renew.ciaddr == "10.0.0.50"
    assert renew.flags == 0 and m.REQUESTED_IP not in renew.options and m.SERVER_ID not in renew.options
    assert renew.xid == 1001 and client.state == dhcp.RENEWING
    # unanswered: again after half the time left to T2, at least renew_interval (60 s) ... but never past T2
    assert client.next_deadline() == 90.0
    client.timer(90.0)
    [(rebind, dest)] = sent(client)
    assert dest == ("255.255.255.255", 67) and rebind.ciaddr == "10.0.0.50" and client.state == dhcp.REBINDING
    [event] = client.receive(server_reply(m.encode(rebind), m.ACK, server="10.0.0.2", lease=300), None, 95.0)
    assert event == dhcp.Renewed(dhcp.Lease("10.0.0.50", "255.255.255.0", ("10.0.0.1",), (), None, None, 300, 150,
                                            262, "10.0.0.2", SERVER, None))
    assert client.state == dhcp.BOUND and client.next_deadline() == 245.0


def test_renewal_answered():
    client, _ = bind(lease=3600)
    client.timer(1800.0)
    [(renew, _)] = sent(client)
    [event] = client.receive(server_reply(m.encode(renew), m.ACK), (SERVER, 67), 1800.1)
    assert isinstance(event, dhcp.Renewed) and event.lease.lease_time == 120
    assert client.next_deadline() == pytest.approx(1860.1)


def test_renewal_with_another_address_is_a_new_binding():
    client, _ = bind(lease=100)
    client.timer(50.0)
    [(renew, _)] = sent(client)
    [event] = client.receive(server_reply(m.encode(renew), m.ACK, address="10.0.0.99"), None, 50.0)
    assert isinstance(event, dhcp.Bound) and event.lease.address == "10.0.0.99"


def test_nak_while_renewing_expires_the_lease_and_starts_over():
    client, _ = bind(lease=100)
    client.timer(50.0)
    [(renew, _)] = sent(client)
    events = client.receive(server_reply(m.encode(renew), m.NAK), (SERVER, 67), 50.5)
    assert events == [dhcp.Expired("server 10.0.0.1 refused 10.0.0.50 (NAK)")]
    [(discover, _)] = sent(client)
    assert discover.type == m.DISCOVER and discover.ciaddr == "0.0.0.0" and client.lease is None
    assert client.next_deadline() == 54.5  # the next DISCOVER; the new deadline is 60 s from the NAK


def test_lease_runs_out():
    client, _ = bind(lease=100, t1=50, t2=60, engine={"renew_interval": 10})
    for now in (50.0, 60.0, 80.0, 90.0):
        assert client.next_deadline() == now
        client.timer(now)
        assert len(sent(client)) == 1
    [event] = client.timer(100.0)
    assert event == dhcp.Expired("the lease of 10.0.0.50 ran out")
    [(discover, _)] = sent(client)
    assert discover.type == m.DISCOVER and client.state == dhcp.SELECTING


def test_infinite_lease_never_renews():
    client, lease = bind(lease=dhcp.INFINITE)
    assert client.next_deadline() == float("inf") and lease.lease_time == dhcp.INFINITE


@pytest.mark.parametrize("t1, t2, want", [(None, None, (60, 105)), (200, None, (60, 105)), (90, 80, (60, 80)),
                                          (10, 200, (10, 105)), (0, 0, (0, 0))])
def test_t1_t2_defaults_and_nonsense(t1, t2, want):
    _, lease = bind(lease=120, t1=t1, t2=t2)
    assert (lease.t1, lease.t2) == want


def test_missing_subnet_is_the_class_netmask():
    client, discover, _ = start()
    offer = m.decode(server_reply(m.encode(discover), m.OFFER, address="172.16.5.5"))
    del offer.options[m.SUBNET]
    client.receive(m.encode(offer), None, 1.0)
    [(request, _)] = sent(client)
    ack = m.decode(server_reply(m.encode(request), m.ACK, address="172.16.5.5"))
    del ack.options[m.SUBNET]
    [event] = client.receive(m.encode(ack), None, 1.0)
    assert event.lease.netmask == "255.255.0.0" and event.lease.prefix == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="not an Ethernet address"):
        dhcp.DhcpClient("02:00", 0.0)
    with pytest.raises(ValueError, match="not a host name"):
        dhcp.DhcpClient(MAC, 0.0, hostname="n\u00e9ud")


def test_ack_without_server_id_keeps_the_offering_server():
    client, discover, _ = start()
    client.receive(server_reply(m.encode(discover), m.OFFER), (SERVER, 67), 1.0)
    [(request, _)] = sent(client)
    [event] = client.receive(server_reply(m.encode(request), m.ACK, server=None), None, 1.1)
    assert event.lease.server_id == SERVER
    client.timer(client.next_deadline())
    [(_, dest)] = sent(client)
    assert dest == (SERVER, 67)  # the renewal goes to it


def test_is_an_engine():
    from agent.sansio import Engine

    assert isinstance(dhcp.DhcpClient(MAC, 0.0), Engine)
