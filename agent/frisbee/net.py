"""UDP sockets for frisbee, set up exactly as Emulab's frisbee/frisbeed set them up (network.c). (The rule on
which datagrams to believe is packets.accept_source, applied by the engines.)

The mode follows the address: 224.0.0.0/4 is multicast, `broadcast=True` is broadcast (255.255.255.255 narrowed to
the interface's subnet broadcast when an interface is given), anything else is unicast (then the server's address
is the client's IP and the client's is the server's). Every datagram goes to that one address and port, in both
directions.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from .. import linux
from ..errors import AddressInUseError, LinuxError, NetworkError
from ..netif import IPv4Interface, ipv4_interfaces

MCAST_TTL = 5
SOCKBUF = 1 << 20  # frisbee's SOCKBUFSIZE
NOBUF_DELAY = 0.001  # frisbee sleeps one clock tick when the send queue is full
RECV_SIZE = 2048  # more than a Packet_t (1080): longer datagrams are cut, and decode judges by datalen

_IP_RECVERR = 11  # Linux <linux/in.h>; not exported by the socket module
_SO_RXQ_OVFL = 40  # <asm-generic/socket.h>: every datagram carries the socket's drop count
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33
# ICMP errors a peer's absence reports through IP_RECVERR: the datagram is lost, the session goes on.
_PEER_ERRORS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENONET}

Role = Literal["server", "client"]
Mode = Literal["multicast", "broadcast", "unicast"]


def is_multicast(addr: str) -> bool:
    return ipaddress.IPv4Address(addr).is_multicast


def mode_of(addr: str, broadcast: bool) -> Mode:
    if is_multicast(addr):
        return "multicast"  # a group address wins over -b, as in frisbee
    return "broadcast" if broadcast else "unicast"


# --- interfaces -------------------------------------------------------------------------------------------------------


def subnet_broadcast(ifaddr: str, found: list[IPv4Interface] | None = None) -> str | None:
    """The broadcast address of the up, broadcast-capable interface holding ifaddr (frisbee's GetBcastAddr)."""
    wanted = linux.IFF_UP | linux.IFF_BROADCAST
    for itf in ipv4_interfaces() if found is None else found:
        if itf.addr == ifaddr and itf.flags & wanted == wanted:
            return itf.broadcast
    return None


# --- endpoints --------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One side of a frisbee session. send() goes to the session address; recv() listens on every socket the
    role binds (a client also hears unicast replies on its interface address)."""

    role: Role
    mode: Mode
    dest: tuple[str, int]  # session address (after broadcast narrowing) and port
    local_ip: str  # what goes into our packets' srcip
    port: int  # the bound port (differs from the asked one only for port 0)
    _send_sock: socket.socket
    _socks: list[socket.socket] = field(default_factory=list)
    _gso: bool = True  # UDP_SEGMENT in send_blocks until refused

    def send(self, datagram: bytes, to: str | None = None) -> None:
        """Send to the session address (or to one host, as frisbee's PacketReply), waiting while the send queue
        is full; a datagram the network reports undeliverable (ICMP) is dropped like any lost datagram."""
        target = (to, self.port) if to is not None else self.dest
        while True:
            try:
                self._send_sock.sendto(datagram, target)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    pass
                elif err.errno in _PEER_ERRORS:
                    _drain_errors(self._send_sock)
                    return
                else:
                    raise NetworkError(f"send to {target[0]}:{target[1]}: {err.strerror}") from None
            time.sleep(NOBUF_DELAY)

    def send_blocks(self, prefix: bytes, chunk: int, block: int, data: bytes) -> None:
        """A run of BLOCKs to the session address in batches (linux.send_frisbee_blocks; prefix: what the engine
        puts before chunk and block), with UDP segmentation offload until the kernel or the route refuses it, and
        as send() does when the send queue is full or the network reports a datagram undeliverable."""
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            try:
                n = linux.send_frisbee_blocks(
                    self._send_sock, prefix, self.dest, chunk, block + sent // 1024, view[sent:], self._gso
                )
            except LinuxError as err:
                if self._gso and err.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self._gso = False  # this kernel, device or route does not segment UDP: one datagram each
                    continue
                if err.errno in (errno.EAGAIN, errno.ENOBUFS):
                    n = 0
                elif err.errno in _PEER_ERRORS:
                    _drain_errors(self._send_sock)
                    n = 1  # that datagram is lost, as in send()
                else:
                    raise NetworkError(f"send to {self.dest[0]}:{self.dest[1]}: {os.strerror(err.errno)}") from None
            sent += n * 1024
            if not n:
                time.sleep(NOBUF_DELAY)

    def recv(self, timeout: float | None) -> tuple[bytes, tuple[str, int]] | None:
        """The next datagram and its (ip, port), or None after timeout seconds (None: wait; 0: just look)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        while True:
            for sock in self._socks:
                got = _recv_one(sock)
                if got is not None:
                    return got
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                select.select(self._socks, [], [], left)
            except InterruptedError:
                pass

    def wait(self, timeout: float | None) -> None:
        """Until a datagram is waiting on one of our sockets, or timeout seconds (None: no limit)."""
        try:
            select.select(self._socks, [], [], timeout)
        except InterruptedError:
            pass

    def recv_batch(self, batch: linux.FrisbeeBatch) -> tuple[int, list[tuple[bytes, tuple[str, int]]]]:
        """What is waiting, without waiting: a batch read from the main socket (its count), and the datagrams of
        the other sockets (a multicast client's interface socket: unicast replies)."""
        try:
            n = batch.recv(self._socks[0])
        except LinuxError as err:
            if err.errno not in _PEER_ERRORS:
                raise NetworkError(f"receive: {os.strerror(err.errno)}") from None
            _drain_errors(self._socks[0])
            n = 0
        others = []
        for sock in self._socks[1:]:
            while (got := _recv_one(sock)) is not None:
                others.append(got)
        return n, others

    def fileno(self) -> int:
        return self._socks[0].fileno()

    def close(self) -> None:
        for sock in {id(s): s for s in [*self._socks, self._send_sock]}.values():
            sock.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recv_one(sock: socket.socket) -> tuple[bytes, tuple[str, int]] | None:
    while True:
        try:
            return sock.recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            if err.errno not in _PEER_ERRORS:
                raise NetworkError(f"receive: {err.strerror}") from None
            _drain_errors(sock)  # an ICMP error reported through IP_RECVERR: read past it


def _drain_errors(sock: socket.socket) -> None:
    """Empty the IP_RECVERR error queue (it is charged to the receive buffer)."""
    for _ in range(1024):
        try:
            sock.recvmsg(RECV_SIZE, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            return


def open_endpoint(
    role: Role,
    addr: str,
    port: int,
    ifaddr: str | None = None,
    broadcast: bool = False,
    loop: bool = False,
    *,
    reuse_addr: bool | None = None,
    sockbuf: int = SOCKBUF,
    log: Callable[[str], None] = lambda line: None,
) -> Endpoint:
    """Open the sockets of a frisbee server or client for session address addr:port.

    Server: one socket bound to INADDR_ANY:port (port 0: any free port). Client: multicast binds group:port
    with SO_REUSEADDR plus a socket on ifaddr:port that it sends from (so the source address is the interface,
    which servers check); other modes bind INADDR_ANY:port. loop: receive our own multicast (tests on one host).
    reuse_addr: SO_REUSEADDR on the main socket; default as frisbee (client in multicast mode only). Raises
    NetworkError (AddressInUseError when the port is taken)."""
    group = _resolve(addr, "address")
    iface = _resolve(ifaddr, "interface address") if ifaddr else None
    if not 0 <= port < 65536 or (port == 0 and role == "client"):
        raise NetworkError(f"bad port {port}")
    mode = mode_of(group, broadcast)
    local_ip = iface or _host_address()
    if reuse_addr is None:
        reuse_addr = role == "client" and mode == "multicast"

    sock = _udp_socket(sockbuf)
    socks = [sock]
    try:
        if mode == "multicast":
            _join_group(sock, group, iface, loop)
            log(f"Using Multicast {group}")
        elif mode == "broadcast":
            if group == "255.255.255.255":
                narrowed = subnet_broadcast(iface) if iface else None
                if narrowed:
                    log(f"Limiting broadcasts using {narrowed}")
                    group = narrowed
                else:
                    log("WARNING: will broadcast to ALL configured interfaces!")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A multicast client binds the group itself, so unrelated INADDR_ANY users of the port do not get its data.
        bind_ip = group if role == "client" and mode == "multicast" else "0.0.0.0"
        _bind(sock, bind_ip, port)
        port = sock.getsockname()[1]
        if role == "client":
            # The drop count of the receive queue rides along with every datagram: the fast path reports it.
            sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
        if role == "server":
            # Report ENOBUFS on send instead of dropping silently when the device queue is full (as frisbeed).
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        send_sock = sock
        if role == "client" and mode == "multicast":
            send_sock = _udp_socket(sockbuf)
            socks.append(send_sock)
            send_sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MCAST_TTL)
            send_sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
            if iface:
                send_sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
            send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(send_sock, local_ip, port)
    except BaseException:
        for s in socks:
            s.close()
        raise
    log(f"Bound to {group}:{port}")
    return Endpoint(role, mode, (group, port), local_ip, port, send_sock, socks)


def _resolve(name: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(name)  # frisbee's GetIP also takes a host name
    except (OSError, UnicodeError):
        raise NetworkError(f"{what} {name!r}: not an IPv4 address or known host") from None


def _host_address() -> str:
    """Without -i, frisbee tags its packets with the address of the machine's host name."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as err:
        raise NetworkError(f"cannot find this host's address (give the interface address): {err}") from None


def _udp_socket(sockbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setblocking(False)
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, sockbuf)  # past the sysctl cap when privileged
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, sockbuf)
    return sock


def _join_group(sock: socket.socket, group: str, iface: str | None, loop: bool) -> None:
    mreq = socket.inet_aton(group) + socket.inet_aton(iface or "0.0.0.0")
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MCAST_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
        if iface:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
    except OSError as err:
        where = f"interface {iface}" if iface else "the default interface"
        raise NetworkError(f"cannot join multicast group {group} on {where}: {err.strerror}") from None


def _bind(sock: socket.socket, ip: str, port: int) -> None:
    try:
        sock.bind((ip, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot bind {ip}:{port}: address already in use") from None
        raise NetworkError(f"cannot bind {ip}:{port}: {err.strerror}") from None
