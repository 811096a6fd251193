"""Bringing up the boot network, the shell around agent.net.dhcp: UDP sockets, real time, agent.netif.

DHCP runs over an ordinary UDP socket on port 68 per interface, bound to the interface (SO_BINDTODEVICE) so
several interfaces can run at once and a reply is taken only from the wire it came in on; requests ask for
broadcast replies until we have an address. acquire() runs the engine on one or several interfaces (the first
lease wins), apply_lease()/configure() set the address through agent.netif, and keep() renews the lease in a
background thread while a long job runs.
"""

from __future__ import annotations

import errno
import select
import socket
import sys
import threading
import time
from typing import Callable, Optional

from .. import netif
from ..errors import AddressInUseError, LinuxError, NetworkError
from .dhcp import CLIENT_PORT, Bound, DhcpClient, Expired, GaveUp, Lease, Renewed
from .ipconfig import Nic, Plan

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dhcp_socket(ifname: str) -> socket.socket:
    """A UDP socket on port 68 of interface `ifname` only, allowed to broadcast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        sock.bind(("0.0.0.0", CLIENT_PORT))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"{ifname}: UDP port {CLIENT_PORT} is taken (another DHCP client?)") from None
        raise NetworkError(f"{ifname}: cannot open the DHCP socket: {err.strerror}") from None
    return sock


class Session:
    """One interface's DHCP engine and socket."""

    def __init__(self, ifname: str, engine: DhcpClient, sock: socket.socket):
        self.ifname, self.engine, self.sock = ifname, engine, sock
        self.send_error = ""

    def flush(self) -> None:
        for data, dest in self.engine.outgoing():
            try:
                self.sock.sendto(data, dest)
            except OSError as err:  # e.g. no carrier yet: the engine sends again later
                self.send_error = f"{err.strerror} sending to {dest[0]}"

    def step(self, now: float, readable: bool) -> list:
        """Feed what arrived and what time it is to the engine, send what it wants sent; its events."""
        events = []
        while readable:
            try:
                data, source = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            events += self.engine.receive(data, source, now)
        if now >= self.engine.next_deadline():
            events += self.engine.timer(now)
        self.flush()
        return events

    def close(self) -> None:
        self.sock.close()


def _wait(sessions: list[Session], clock, limit: float = float("inf")) -> list[Session]:
    deadline = min([s.engine.next_deadline() for s in sessions] + [clock() + limit])
    ready, _, _ = select.select([s.sock for s in sessions], [], [], max(0.0, deadline - clock()))
    return [s for s in sessions if s.sock in ready]


def acquire(ifnames: list[str], *, timeout: float = 60.0, hostname: Optional[str] = None,
            clock: Callable[[], float] = time.monotonic, **engine_args) -> tuple[Session, Lease]:
    """Bring the interfaces up and run DHCP on all of them until the first lease: (its session, the lease). The
    other sessions are closed. NetworkError (one line, every interface's reason) when none gets a lease within
    `timeout` seconds."""
    if not ifnames:
        raise NetworkError("no interface to run DHCP on")
    sessions: list[Session] = []
    failures: list[str] = []
    try:
        for name in ifnames:
            netif.set_up(name)
            engine = DhcpClient(netif.get_mac(name), clock(), timeout=timeout, hostname=hostname, **engine_args)
            sessions.append(Session(name, engine, dhcp_socket(name)))
        while sessions:
            ready = _wait(sessions, clock)
            now = clock()
            for session in list(sessions):
                for event in session.step(now, session in ready):
                    if isinstance(event, Bound):
                        sessions.remove(session)
                        return session, event.lease
                    if isinstance(event, GaveUp):
                        sent = f" ({session.send_error})" if session.send_error else ""
                        failures.append(f"{session.ifname}: {event.reason}{sent}")
                        sessions.remove(session)
                        session.close()
        raise NetworkError("no DHCP lease: " + "; ".join(failures))
    finally:
        for session in sessions:
            session.close()


def configure(ifname: str, address: str, netmask: str, gateway: Optional[str] = None) -> None:
    """Give `ifname` the address and netmask, bring it up, and add the default route via `gateway`."""
    netif.set_address(ifname, address)
    netif.set_netmask(ifname, netmask)
    netif.set_up(ifname)
    if gateway:
        try:
            netif.add_default_route(gateway, ifname)
        except LinuxError as err:
            if err.errno != errno.EEXIST:  # a renewal re-applies the same lease
                raise


def apply_lease(ifname: str, lease: Lease) -> None:
    configure(ifname, lease.address, lease.netmask, lease.router)


def describe(ifname: str, lease: Lease) -> str:
    """One console line: what the lease gave and where it came from."""
    parts = [f"{ifname} {lease.address}/{lease.prefix}"]
    if lease.router:
        parts.append(f"router {lease.router}")
    if lease.dns:
        parts.append("dns " + ",".join(lease.dns))
    if lease.hostname:
        parts.append(f"host name {lease.hostname}")
    length = "no end" if lease.lease_time == 0xFFFFFFFF else f"{lease.lease_time} s"
    line = " ".join(parts) + f" from DHCP server {lease.server_id} (lease {length}"
    if lease.next_server:
        line += f", next server {lease.next_server}"
    if lease.boot_file:
        line += f", boot file {lease.boot_file}"
    return line + ")"


class LeaseKeeper(threading.Thread):
    """Keeps a bound session's lease: renews at T1, rebinds at T2, re-applies what changed, and removes the address
    when the lease is lost (then looks for a new one). One log line per change."""

    def __init__(self, session: Session, lease: Lease, log: Callable[[str], None] = _stderr,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"dhcp-{session.ifname}", daemon=True)
        self.session, self.lease, self.log, self.clock = session, lease, log, clock
        self._stopping = threading.Event()

    def run(self) -> None:
        session = self.session
        try:
            while not self._stopping.is_set():
                ready = _wait([session], self.clock, limit=0.5)  # wakes up now and then to see stop()
                for event in session.step(self.clock(), bool(ready)):
                    self._handle(event)
        except Exception as err:  # noqa: BLE001 -- a background thread must say why it stopped, in one line
            self.log(f"{session.ifname}: DHCP lease keeping stopped: {err}")
        finally:
            session.close()

    def _handle(self, event) -> None:
        name = self.session.ifname
        if isinstance(event, (Bound, Renewed)):
            old, self.lease = self.lease, event.lease
            if old is None or (old.address, old.netmask, old.router) != (event.lease.address, event.lease.netmask,
                                                                          event.lease.router):
                apply_lease(name, event.lease)
            what = "renewed" if isinstance(event, Renewed) else "new lease"
            self.log(f"network: {what}: {describe(name, event.lease)}")
        elif isinstance(event, Expired):
            self.lease = None
            netif.clear_address(name)
            self.log(f"network: {name} lost its address: {event.reason}")
        elif isinstance(event, GaveUp):
            self.log(f"network: {name}: {event.reason}")
            self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def present_nics(link_wait: float = 0.0) -> list[Nic]:
    """The Ethernet interfaces, brought up, with whether each has a link; waits up to `link_wait` seconds for the
    first link (a NIC's carrier comes some time after it is brought up)."""
    names = [name for name, _ in netif.macs()]
    for name in names:
        netif.set_up(name)
    end = time.monotonic() + link_wait
    while True:
        nics = [Nic(name, mac, netif.has_link(name)) for name, mac in netif.macs() if name in names]
        if any(nic.link for nic in nics) or time.monotonic() >= end:
            return nics
        time.sleep(0.05)


def bring_up(plan: Plan, *, timeout: float = 60.0, log: Callable[[str], None] = _stderr,
             hostname: Optional[str] = None) -> Optional[LeaseKeeper]:
    """Carry out a Plan of agent.net.ipconfig.decide(): log its notes, set the static address or get and apply a
    DHCP lease; for a lease, the LeaseKeeper renewing it. NetworkError when no lease comes."""
    for note in plan.notes:
        log(note)
    if plan.method == "static":
        param = plan.static
        configure(plan.interfaces[0], param.address, param.netmask, param.gateway)
        return None
    if plan.method != "dhcp":
        return None
    session, lease = acquire(list(plan.interfaces), timeout=timeout, hostname=hostname)
    apply_lease(session.ifname, lease)
    log(f"network: {describe(session.ifname, lease)}")
    return keep(session, lease, log)


def keep(session: Session, lease: Lease, log: Callable[[str], None] = _stderr) -> LeaseKeeper:
    """Start keeping `lease` on `session` in the background (stop() ends it)."""
    keeper = LeaseKeeper(session, lease, log)
    keeper.start()
    return keeper
