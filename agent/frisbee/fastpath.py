"""The client's receive fast path: a batch of datagrams read in C (linux.FrisbeeBatch) fed to the Client.

The Client stays the owner of policy: before each scan it says which chunk's BLOCKs the C code may take
(Client.fast_target), and afterwards it accounts for them (Client.fast_blocks). Every datagram the scan leaves
(another message, the first block of another chunk, the block completing a chunk, anything malformed or from
another host) goes to Client.receive, in order, so the result is what feeding each datagram to receive() gives.
"""

from __future__ import annotations

from .. import linux
from .client import Client


def feed_batch(client: Client, batch: linux.FrisbeeBatch, now: float) -> list:
    """Feed what batch.recv() read (or what is left of it) to the client; return its events."""
    events: list = []
    while True:
        _arm(client, batch)
        i = batch.scan()
        client.fast_blocks(*batch.take(), now)
        if i < 0:
            return events
        data, source = batch.datagram(i)
        events += client.receive(data, source, now)


def _arm(client: Client, batch: linux.FrisbeeBatch) -> None:
    target = client.fast_target()
    if target is None:
        batch.disarm()
    else:
        batch.arm(client.server_ip, client.port, *target)
