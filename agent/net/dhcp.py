"""The DHCP client (RFC 2131 section 4.4), sans-I/O: an agent.sansio.Engine for one interface.

    INIT -> SELECTING (DISCOVER, the first valid OFFER wins) -> REQUESTING (REQUEST for it) -> BOUND
    BOUND -> at T1 RENEWING (REQUEST unicast to the server) -> at T2 REBINDING (REQUEST broadcast) -> at the end
    of the lease: Expired, and SELECTING again

DISCOVERs and REQUESTs are sent again after 4, 8, 16 ... seconds (capped at `max_interval`), each wait moved by
up to +-1 s of jitter (RFC 2131 4.1) from an injectable random source, which also draws the transaction ids. A
reply counts only with our xid and our MAC; a NAK starts over. While renewing or rebinding, requests are repeated
after half the time left (at least `renew_interval`). Until a lease is bound, `timeout` seconds after the start
the engine gives up with one reason (GaveUp) and stays silent from then on.

The replies ask to be broadcast (the BROADCAST flag) while we have no address, so a plain UDP socket receives them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Optional

from ..sansio import Address, Engine, Outgoing
from . import dhcpmsg as m

SERVER_PORT, CLIENT_PORT = 67, 68
BROADCAST = ("255.255.255.255", SERVER_PORT)
INFINITE = 0xFFFFFFFF  # a lease time that never ends
# What we ask for (option 55): subnet, router, DNS, host name, domain, lease, server id, T1, T2, TFTP server, file
REQUESTED_PARAMS = bytes((1, 3, 6, 12, 15, 51, 54, 58, 59, 66, 67))

SELECTING, REQUESTING, BOUND, RENEWING, REBINDING, GAVE_UP = (
    "SELECTING", "REQUESTING", "BOUND", "RENEWING", "REBINDING", "GAVE_UP")


@dataclass(frozen=True)
class Lease:
    address: str
    netmask: str
    routers: tuple  # addresses, the first is the default route
    dns: tuple
    hostname: Optional[str]
    domain: Optional[str]
    lease_time: int  # seconds; INFINITE for a lease without end
    t1: int
    t2: int
    server_id: str
    next_server: Optional[str]  # siaddr, else option 66 (TFTP server name)
    boot_file: Optional[str]  # option 67, else the file field

    @property
    def prefix(self) -> int:
        return sum(bin(int(octet)).count("1") for octet in self.netmask.split("."))

    @property
    def router(self) -> Optional[str]:
        return self.routers[0] if self.routers else None


@dataclass(frozen=True)
class Bound:
    lease: Lease


@dataclass(frozen=True)
class Renewed:
    lease: Lease


@dataclass(frozen=True)
class Expired:
    reason: str  # the lease ran out, or the server refused to renew it: the address must not be used any more


@dataclass(frozen=True)
class GaveUp:
    reason: str


@dataclass
class ClientStats:
    sent: int = 0
    received: int = 0
    ignored: int = 0  # malformed, not ours, or not expected now
    last_ignored: str = ""


def classful_netmask(addr: str) -> str:
    first = int(addr.split(".")[0])
    return "255.0.0.0" if first < 128 else "255.255.0.0" if first < 192 else "255.255.255.0"


def lease_of(ack: m.Message) -> Lease:
    """The lease an ACK grants; MessageError when it lacks what a lease needs."""
    lease_time = ack.number(m.LEASE_TIME)
    if lease_time is None:
        raise m.MessageError("ACK without a lease time")
    if ack.yiaddr == "0.0.0.0":
        raise m.MessageError("ACK without an address")
    t2 = ack.number(m.T2)
    if t2 is None or t2 >= lease_time:
        t2 = lease_time * 7 // 8
    t1 = ack.number(m.T1)
    if t1 is None or t1 > t2:
        t1 = min(lease_time // 2, t2)
    return Lease(
        ack.yiaddr, ack.address(m.SUBNET) or classful_netmask(ack.yiaddr), ack.addresses(m.ROUTER),
        ack.addresses(m.DNS), ack.text(m.HOSTNAME), ack.text(m.DOMAIN), lease_time, t1, t2,
        ack.address(m.SERVER_ID) or "", ack.siaddr if ack.siaddr != "0.0.0.0" else ack.text(m.TFTP_SERVER),
        ack.text(m.BOOT_FILE) or ack.file or None,
    )


class DhcpClient(Engine):
    """DHCP for the interface with MAC `mac` (6 bytes or "aa:bb:..."), started at `now`."""

    def __init__(self, mac, now: float, *, timeout: float = 60.0, hostname: Optional[str] = None,
                 rng: Optional[random.Random] = None, first_interval: float = 4.0, max_interval: float = 64.0,
                 request_tries: int = 4, renew_interval: float = 60.0):
        self.mac = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else bytes(mac)
        if len(self.mac) != 6:
            raise ValueError(f"not an Ethernet address: {mac!r}")
        if hostname is not None and not (hostname.isascii() and hostname.isprintable() and 0 < len(hostname) < 256):
            raise ValueError(f"not a host name: {hostname!r}")
        self.timeout, self.hostname = timeout, hostname
        self.rng = rng or random.Random()
        self.first_interval, self.max_interval = first_interval, max_interval
        self.request_tries, self.renew_interval = request_tries, renew_interval
        self.stats = ClientStats()
        self.lease: Optional[Lease] = None
        self._out: list[Outgoing] = []
        self._restart(now, now + timeout)

    # ------------------------------------------------------------------ the Engine calls

    def receive(self, data: bytes, source: Optional[Address], now: float) -> list:
        self.stats.received += 1
        try:
            msg = m.decode(data)
        except m.MessageError as err:
            return self._ignore(str(err))
        if msg.op != m.BOOTREPLY or msg.xid != self.xid or msg.mac != self.mac:
            return self._ignore("not a reply to us (op, xid or MAC)")
        server = msg.address(m.SERVER_ID)
        if msg.type == m.OFFER and self.state == SELECTING:
            if msg.yiaddr == "0.0.0.0" or server is None:
                return self._ignore("OFFER without an address or a server identifier")
            self.offer, self.server = msg.yiaddr, server
            self.state, self.tries, self.retry_at = REQUESTING, 0, now
            return self.timer(now)
        if msg.type == m.ACK and self.state in (REQUESTING, RENEWING, REBINDING):
            if self.state == REQUESTING and server not in (None, self.server):
                return self._ignore(f"ACK from server {server}, not {self.server}")
            try:
                lease = lease_of(msg)
            except m.MessageError as err:
                return self._ignore(str(err))
            if not lease.server_id:
                lease = replace(lease, server_id=self.server)
            renewed = self.state != REQUESTING and self.lease is not None and lease.address == self.lease.address
            self._bind(lease, now)
            return [Renewed(lease) if renewed else Bound(lease)]
        if msg.type == m.NAK and self.state in (REQUESTING, RENEWING, REBINDING):
            if self.state != REBINDING and server not in (None, self.server):
                return self._ignore(f"NAK from server {server}, not {self.server}")
            why = msg.text(m.MESSAGE)
            problem = f"server {server or self.server} refused {self.offer}" + (f" (NAK: {why})" if why else " (NAK)")
            self.naks += 1
            if self.state == REQUESTING:
                self._restart(now, self.give_up_at, problem)
                return self.timer(now)
            self.lease = None
            self._restart(now, now + self.timeout, problem)
            return [Expired(problem), *self.timer(now)]
        name = m.TYPE_NAMES.get(msg.type, msg.type)
        return self._ignore(f"{name} not expected while {self.state}")

    def timer(self, now: float) -> list:
        state = self.state
        if state in (SELECTING, REQUESTING) and now >= self.give_up_at:
            self.state = GAVE_UP
            if self.problem:
                return [GaveUp(f"no lease in {self.timeout:g} s: {self.problem}")]
            plural = "s" if self.discovers != 1 else ""
            return [GaveUp(f"no DHCP server answered ({self.discovers} DISCOVER{plural} in {self.timeout:g} s)")]
        if state == BOUND and now >= self.t1_at:
            self.state, self.retry_at, self.started = RENEWING, now, now
            self.xid = self.rng.getrandbits(32)  # a new transaction: late replies to the last one are not taken
        if self.state == RENEWING and now >= self.t2_at:
            self.state, self.retry_at = REBINDING, now
        if self.state == REBINDING and now >= self.expires_at:
            reason = f"the lease of {self.lease.address} ran out"
            self.lease = None
            self._restart(now, now + self.timeout, reason)
            return [Expired(reason), *self.timer(now)]
        if self.state in (BOUND, GAVE_UP) or now < self.retry_at:
            return []
        self.tries += 1
        if self.state == SELECTING:
            self.discovers += 1
            self._send(m.DISCOVER, BROADCAST, now)
        elif self.state == REQUESTING:
            if self.tries > self.request_tries:
                problem = f"server {self.server} offered {self.offer} but did not acknowledge it"
                self._restart(now, self.give_up_at, problem)
                return self.timer(now)
            self._send(m.REQUEST, BROADCAST, now, {m.REQUESTED_IP: self.offer, m.SERVER_ID: self.server})
        else:  # renewing from the server that granted the lease, then rebinding from any
            end = self.t2_at if self.state == RENEWING else self.expires_at
            dest = (self.lease.server_id, SERVER_PORT) if self.state == RENEWING else BROADCAST
            self._send(m.REQUEST, dest, now, ciaddr=self.lease.address)
            self.retry_at = now + max((end - now) / 2, self.renew_interval)
            return []
        wait = min(self.first_interval * 2 ** (self.tries - 1), self.max_interval)
        self.retry_at = now + max(wait + self.rng.random() * 2 - 1, 0.5)
        return []

    def outgoing(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float:
        if self.state == GAVE_UP:
            return float("inf")
        if self.state == BOUND:
            return self.t1_at
        if self.state == RENEWING:
            return min(self.retry_at, self.t2_at)
        if self.state == REBINDING:
            return min(self.retry_at, self.expires_at)
        return min(self.retry_at, self.give_up_at)

    # ------------------------------------------------------------------ inside

    def _ignore(self, reason: str) -> list:
        self.stats.ignored += 1
        self.stats.last_ignored = reason
        return []

    def _restart(self, now: float, give_up_at: float, problem: str = "") -> None:
        """To SELECTING with a new xid; the first DISCOVER at once, or after a wait when NAKs keep coming."""
        self.state, self.xid, self.started = SELECTING, self.rng.getrandbits(32), now
        self.give_up_at, self.problem = give_up_at, problem
        self.tries = self.discovers = 0
        self.offer = self.server = None
        if not problem:
            self.naks = 0
        self.retry_at = now if self.naks < 2 else now + self.first_interval

    def _bind(self, lease: Lease, now: float) -> None:
        self.lease, self.state, self.naks = lease, BOUND, 0
        self.offer, self.server = lease.address, lease.server_id
        forever = lease.lease_time == INFINITE
        self.t1_at = float("inf") if forever else now + lease.t1
        self.t2_at = float("inf") if forever else now + lease.t2
        self.expires_at = float("inf") if forever else now + lease.lease_time

    def _send(self, kind: int, dest: Address, now: float, extra: Optional[dict] = None, ciaddr: str = "") -> None:
        options = {m.MESSAGE_TYPE: bytes((kind,)), m.CLIENT_ID: b"\x01" + self.mac}
        for code, addr in (extra or {}).items():
            options[code] = bytes(map(int, addr.split(".")))
        if self.hostname:
            options[m.HOSTNAME] = self.hostname.encode("ascii")
        options[m.PARAMS] = REQUESTED_PARAMS
        msg = m.Message(
            m.BOOTREQUEST, self.xid, self.mac, options, secs=min(int(now - self.started), 0xFFFF),
            flags=0 if ciaddr else m.BROADCAST_FLAG, ciaddr=ciaddr or "0.0.0.0",
        )
        self._out.append(Outgoing(m.encode(msg), dest))
        self.stats.sent += 1
