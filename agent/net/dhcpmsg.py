"""DHCP messages (RFC 2131, options of RFC 2132): decode, validate and encode, pure.

A message is the 236-byte BOOTP header, the magic cookie and options. Only Ethernet (htype 1, hlen 6) is spoken.
Decoding is strict: anything malformed raises MessageError with the reason, and nothing else does; receivers drop
such a datagram and count it. Options a client reads are checked for their length and kind here, so the client
never sees a 3-byte lease time or a router list that is not whole addresses. Options are kept raw (RFC 3396:
repeated options are concatenated), including those from the `file` and `sname` fields when option 52 (overload)
says so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
TYPE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE", 8: "INFORM"}
BROADCAST_FLAG = 0x8000

# option codes
PAD, SUBNET, ROUTER, DNS, HOSTNAME, DOMAIN, REQUESTED_IP, LEASE_TIME, OVERLOAD = 0, 1, 3, 6, 12, 15, 50, 51, 52
MESSAGE_TYPE, SERVER_ID, PARAMS, MESSAGE, T1, T2, CLIENT_ID, TFTP_SERVER, BOOT_FILE, END = (
    53, 54, 55, 56, 58, 59, 61, 66, 67, 255)

COOKIE = b"\x63\x82\x53\x63"
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # op htype hlen hops xid secs flags ci yi si gi chaddr sname file
MIN_SIZE = 300  # BOOTP's minimum message: some servers and relays drop shorter ones

# How each option a client interprets must look: (least length, multiple of, kind)
_ADDR, _U32, _TEXT, _BYTE = "address", "32-bit number", "text", "byte"
_SHAPE = {
    SUBNET: (4, 4, _ADDR), ROUTER: (4, 4, _ADDR), DNS: (4, 4, _ADDR), SERVER_ID: (4, 4, _ADDR),
    REQUESTED_IP: (4, 4, _ADDR), LEASE_TIME: (4, 4, _U32), T1: (4, 4, _U32), T2: (4, 4, _U32),
    MESSAGE_TYPE: (1, 1, _BYTE), OVERLOAD: (1, 1, _BYTE), HOSTNAME: (1, 1, _TEXT), DOMAIN: (1, 1, _TEXT),
    MESSAGE: (1, 1, _TEXT), TFTP_SERVER: (1, 1, _TEXT), BOOT_FILE: (1, 1, _TEXT),
}
_SINGLE = {SUBNET, SERVER_ID, REQUESTED_IP, LEASE_TIME, T1, T2, MESSAGE_TYPE, OVERLOAD}  # exactly one value


class MessageError(ValueError):
    """A datagram that is not a valid DHCP message (the reason says why), or a message that cannot be encoded."""


@dataclass(frozen=True)
class Message:
    op: int
    xid: int
    mac: bytes  # chaddr: the client's 6-byte Ethernet address
    options: dict = field(default_factory=dict)  # code -> raw bytes (without END, PAD or OVERLOAD)
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    sname: str = ""  # the server host name field, when it is not used for options
    file: str = ""  # the boot file name field, when it is not used for options

    @property
    def type(self) -> int | None:
        value = self.options.get(MESSAGE_TYPE)
        return value[0] if value else None

    def address(self, code: int) -> str | None:
        value = self.options.get(code)
        return _ntoa(value[:4]) if value else None

    def addresses(self, code: int) -> tuple[str, ...]:
        value = self.options.get(code, b"")
        return tuple(_ntoa(value[i:i + 4]) for i in range(0, len(value), 4))

    def number(self, code: int) -> int | None:
        value = self.options.get(code)
        return int.from_bytes(value, "big") if value else None

    def text(self, code: int) -> str | None:
        value = self.options.get(code, b"").rstrip(b"\0")  # some servers NUL-terminate
        return value.decode("ascii") if value else None  # ASCII checked when decoded


def _ntoa(data: bytes) -> str:
    return ".".join(map(str, data))


def _aton(addr: str, what: str) -> bytes:
    parts = addr.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise MessageError(f"{what}: not an IPv4 address: {addr!r}")
    return bytes(map(int, parts))


def _field_text(data: bytes, what: str) -> str:
    text = data.split(b"\0", 1)[0]
    if any(b < 0x20 or b > 0x7E for b in text):
        raise MessageError(f"the {what} field is not printable ASCII")
    return text.decode("ascii")


def _parse_options(data: bytes, where: str, options: dict) -> None:
    """Add the options in `data` to `options` (repeated codes concatenated); stops at END, which must be there."""
    i = 0
    while i < len(data):
        code = data[i]
        if code == END:
            return
        if code == PAD:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise MessageError(f"option {code} runs past the end of the {where}")
        options[code] = options.get(code, b"") + data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    raise MessageError(f"no end option in the {where}")


def _check_option(code: int, value: bytes) -> None:
    least, multiple, kind = _SHAPE[code]
    if len(value) < least or len(value) % multiple or (code in _SINGLE and len(value) != least):
        raise MessageError(f"option {code} ({kind}) has {len(value)} bytes")
    if kind == _TEXT and any(b < 0x20 or b > 0x7E for b in value.rstrip(b"\0")):
        raise MessageError(f"option {code} is not printable ASCII")


def decode(datagram: bytes) -> Message:
    """The DHCP message in `datagram`; MessageError with the reason if it is not a valid one."""
    if len(datagram) < HEADER.size + 4:
        raise MessageError(f"{len(datagram)} bytes, shorter than a DHCP message ({HEADER.size + 4})")
    op, htype, hlen, _hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file = HEADER.unpack_from(datagram)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MessageError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if (htype, hlen) != (1, 6):
        raise MessageError(f"hardware type {htype} length {hlen}, not Ethernet")
    if datagram[HEADER.size:HEADER.size + 4] != COOKIE:
        raise MessageError("no DHCP magic cookie (a plain BOOTP message)")
    options: dict = {}
    _parse_options(datagram[HEADER.size + 4:], "options", options)
    overload = options.pop(OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MessageError(f"option 52 (overload) is {overload.hex()}, not 1, 2 or 3")
        if overload[0] & 1:
            _parse_options(file, "file field", options)
        if overload[0] & 2:
            _parse_options(sname, "sname field", options)
    for code, value in options.items():
        if code in _SHAPE:
            _check_option(code, value)
    kind = options.get(MESSAGE_TYPE)
    if kind is None:
        raise MessageError("no message type (option 53)")
    if kind[0] not in TYPE_NAMES:
        raise MessageError(f"unknown message type {kind[0]}")
    overloaded = overload[0] if overload else 0
    return Message(
        op, xid, chaddr[:6], options, secs, flags, _ntoa(ci), _ntoa(yi), _ntoa(si), _ntoa(gi),
        "" if overloaded & 2 else _field_text(sname, "sname"), "" if overloaded & 1 else _field_text(file, "file"),
    )


def encode(msg: Message) -> bytes:
    """The datagram for `msg` (options longer than 255 bytes are split, RFC 3396), padded to BOOTP's 300 bytes."""
    if len(msg.mac) != 6:
        raise MessageError(f"a {len(msg.mac)}-byte hardware address, not Ethernet")
    try:
        head = HEADER.pack(
            msg.op, 1, 6, 0, msg.xid, msg.secs, msg.flags, _aton(msg.ciaddr, "ciaddr"), _aton(msg.yiaddr, "yiaddr"),
            _aton(msg.siaddr, "siaddr"), _aton(msg.giaddr, "giaddr"), msg.mac, msg.sname.encode("ascii"),
            msg.file.encode("ascii"),
        )
    except (struct.error, UnicodeEncodeError) as err:
        raise MessageError(f"cannot encode the header: {err}") from None
    out = [head, COOKIE]
    for code, value in msg.options.items():
        if not 0 < code < END:
            raise MessageError(f"option code {code} out of range")
        for i in range(0, max(len(value), 1), 255):
            piece = value[i:i + 255]
            out.append(bytes((code, len(piece))) + piece)
    out.append(bytes((END,)))
    data = b"".join(out)
    return data + bytes(max(0, MIN_SIZE - len(data)))
