"""The one contract every protocol engine follows (frisbee client and server, DHCP, HTTP, the controller).

Engines are sans-I/O, in the manner of h11: they never touch a socket, a clock or a file. A thin shell owns the
socket and the clock and drives the engine with four calls:

    events = engine.receive(data, source, now)   # what arrived: a datagram from `source`, or stream bytes
                                                 #   (source None; b"" means the peer closed the stream)
    events = engine.timer(now)                   # time passed: retransmissions, heartbeats, deadlines fire
    for data, dest in engine.outgoing():         # what to transmit now, drained: datagrams with their
        sock.sendto(data, dest)                  #   destination (None: the engine's default peer/session),
                                                 #   stream bytes with dest None
    deadline = engine.next_deadline()            # when timer() must next be called (inf: only on input)

Events are small frozen dataclasses of the engine's module. Input that is merely ignored (a foreign or malformed
datagram) is counted in the engine's stats; input that ends the conversation (a malformed HTTP response, a forged
controller frame) raises the engine's NodeagentError subclass, whose kind says what failed. Engines may add calls
of their own for the application's side (h11's send(event)), e.g. `chunk_taken` for a consumer's progress.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

Address = Tuple[str, int]


class Outgoing(NamedTuple):
    data: bytes
    dest: Optional[Any]  # an Address, an engine-specific destination (frisbee: an IP, same port), or None


class Engine:
    """Base of the sans-I/O engines: documents the contract; subclasses implement all four calls."""

    def receive(self, data: bytes, source: Optional[Address], now: float) -> list:
        raise NotImplementedError

    def timer(self, now: float) -> list:
        raise NotImplementedError

    def outgoing(self) -> list[Outgoing]:
        raise NotImplementedError

    def next_deadline(self) -> float:
        raise NotImplementedError
