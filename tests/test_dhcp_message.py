"""agent.net.dhcpmsg: DHCP messages decode, validate and encode; malformed datagrams are refused with a reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.net import dhcpmsg as m

MAC = bytes.fromhex("020000aabbcc")


def reply(options: bytes, *, op=2, htype=1, hlen=6, cookie=m.COOKIE, sname=b"", file=b"", yiaddr=b"\x0a\x00\x00\x05"):
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, htype, hlen, 0, 0x1234, 0, 0, bytes(4), yiaddr,
                       b"\x0a\x00\x00\x01", bytes(4), MAC, sname, file)
    return head + cookie + options


OFFER = bytes((53, 1, 2, 54, 4, 10, 0, 0, 1, 51, 4, 0, 0, 0x0E, 0x10, 1, 4, 255, 255, 255, 0, 255))


def test_decode_a_reply():
    msg = m.decode(reply(OFFER + bytes(40), file=b"pxelinux.0"))
    assert (msg.op, msg.xid, msg.mac, msg.type) == (m.BOOTREPLY, 0x1234, MAC, m.OFFER)
    assert (msg.yiaddr, msg.siaddr, msg.file, msg.sname) == ("10.0.0.5", "10.0.0.1", "pxelinux.0", "")
    assert msg.address(m.SERVER_ID) == "10.0.0.1" and msg.address(m.SUBNET) == "255.255.255.0"
    assert msg.number(m.LEASE_TIME) == 3600 and msg.address(m.ROUTER) is None and msg.text(m.HOSTNAME) is None


def test_round_trip_with_every_option_a_client_reads():
    options = {
        m.MESSAGE_TYPE: b"\x05", m.SERVER_ID: bytes((10, 0, 0, 1)), m.LEASE_TIME: (120).to_bytes(4, "big"),
        m.T1: (30).to_bytes(4, "big"), m.T2: (90).to_bytes(4, "big"), m.SUBNET: bytes((255, 255, 0, 0)),
        m.ROUTER: bytes((10, 0, 0, 1, 10, 0, 0, 2)), m.DNS: bytes((10, 0, 0, 53)), m.HOSTNAME: b"node7",
        m.DOMAIN: b"grid.example", m.TFTP_SERVER: b"10.0.0.9", m.BOOT_FILE: b"pxelinux.0", 43: b"\x01\x02",
    }
    msg = m.Message(m.BOOTREPLY, 99, MAC, options, secs=3, flags=m.BROADCAST_FLAG, yiaddr="10.0.0.7",
                    siaddr="10.0.0.9", sname="srv", file="boot/file")
    data = m.encode(msg)
    assert len(data) >= m.MIN_SIZE
    assert m.decode(data) == msg
    back = m.decode(data)
    assert back.addresses(m.ROUTER) == ("10.0.0.1", "10.0.0.2") and back.text(m.DOMAIN) == "grid.example"


def test_long_options_are_split_and_joined_again():
    """RFC 3396: an option longer than 255 bytes goes out as several, and repeated options are concatenated."""
    dns = bytes(range(200)) * 2  # 400 bytes: 100 addresses
    msg = m.Message(m.BOOTREPLY, 1, MAC, {m.MESSAGE_TYPE: b"\x02", m.DNS: dns})
    data = m.encode(msg)
    assert data.count(bytes((m.DNS, 255))) == 1 and bytes((m.DNS, 145)) in data
    assert m.decode(data).options[m.DNS] == dns


def test_overloaded_file_and_sname_fields_carry_options():
    file_options = bytes((m.HOSTNAME, 4)) + b"node" + b"\xff"
    sname_options = bytes((m.ROUTER, 4, 10, 0, 0, 1, 255))
    msg = m.decode(reply(OFFER[:-1] + bytes((m.OVERLOAD, 1, 3, 255)), file=file_options, sname=sname_options))
    assert msg.text(m.HOSTNAME) == "node" and msg.address(m.ROUTER) == "10.0.0.1"
    assert (msg.file, msg.sname) == ("", "") and m.OVERLOAD not in msg.options


def test_nul_terminated_text_option():
    msg = m.decode(reply(OFFER[:-1] + bytes((m.HOSTNAME, 6)) + b"node1\0" + b"\xff"))
    assert msg.text(m.HOSTNAME) == "node1"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "0 bytes, shorter than a DHCP message"),
        (reply(OFFER)[:239], "239 bytes"),
        (reply(OFFER, op=3), "op 3 is neither"),
        (reply(OFFER, htype=6), "hardware type 6 length 6, not Ethernet"),
        (reply(OFFER, hlen=16), "hardware type 1 length 16"),
        (reply(OFFER, cookie=b"\0\0\0\0"), "no DHCP magic cookie"),
        (reply(OFFER[:-1]), "no end option in the options"),
        (reply(bytes((53, 1, 2, 54, 4, 10, 0))), "option 54 runs past the end of the options"),
        (reply(bytes((53,))), "option 53 runs past the end"),
        (reply(bytes((54, 4, 10, 0, 0, 1, 255))), "no message type (option 53)"),
        (reply(bytes((53, 1, 9, 255))), "unknown message type 9"),
        (reply(bytes((53, 2, 2, 2, 255))), "option 53 (byte) has 2 bytes"),
        (reply(bytes((53, 1, 2, 51, 3, 0, 0, 1, 255))), "option 51 (32-bit number) has 3 bytes"),
        (reply(bytes((53, 1, 2, 3, 6, 10, 0, 0, 1, 10, 0, 255))), "option 3 (address) has 6 bytes"),
        (reply(bytes((53, 1, 2, 6, 0, 255))), "option 6 (address) has 0 bytes"),
        (reply(bytes((53, 1, 2, 54, 4, 10, 0, 0, 1, 54, 4, 10, 0, 0, 2, 255))), "option 54 (address) has 8 bytes"),
        (reply(bytes((53, 1, 2, 12, 3)) + b"a\nb" + b"\xff"), "option 12 is not printable ASCII"),
        (reply(bytes((53, 1, 2, 52, 1, 4, 255))), "option 52 (overload) is 04"),
        (reply(bytes((53, 1, 2, 52, 1, 1, 255)), file=b"\x03\x04"), "no end option in the file field"),
        (reply(OFFER, file=b"boot\x80file"), "the file field is not printable ASCII"),
        (reply(OFFER, sname=b"\x01"), "the sname field is not printable ASCII"),
    ],
)
def test_malformed_datagrams_are_refused_with_a_reason(data, reason):
    with pytest.raises(m.MessageError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        m.decode(data)


def test_encode_refuses_what_it_cannot_encode():
    with pytest.raises(m.MessageError, match="4-byte hardware address"):
        m.encode(m.Message(1, 1, b"\0" * 4))
    with pytest.raises(m.MessageError, match="ciaddr: not an IPv4 address"):
        m.encode(m.Message(1, 1, MAC, ciaddr="10.0.0.256"))
    with pytest.raises(m.MessageError, match="option code 255 out of range"):
        m.encode(m.Message(1, 1, MAC, {255: b""}))
    with pytest.raises(m.MessageError, match="cannot encode the header"):
        m.encode(m.Message(1, 1 << 32, MAC))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_anything_decodes_or_is_refused(data):
    try:
        m.decode(data)
    except m.MessageError:
        pass


_OPTION = st.tuples(st.integers(0, 255), st.binary(max_size=12)).map(lambda t: bytes((t[0], len(t[1]))) + t[1])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_OPTION | st.sampled_from([b"\0", b"\xff", bytes((52, 1, 3))]), max_size=12),
       st.binary(max_size=128), st.binary(max_size=64))
def test_fuzz_option_soup_decodes_or_is_refused(options, file, sname):
    """Options that look almost right (the random datagrams above rarely get past the cookie)."""
    try:
        msg = m.decode(reply(bytes((53, 1, 5)) + b"".join(options), file=file, sname=sname))
    except m.MessageError:
        return
    for code in (m.ROUTER, m.DNS):
        msg.addresses(code)
    for code in (m.HOSTNAME, m.DOMAIN, m.BOOT_FILE, m.TFTP_SERVER, m.MESSAGE):
        msg.text(code)
    for code in (m.LEASE_TIME, m.T1, m.T2):
        msg.number(code)
    m.encode(msg)  # whatever decoded encodes again
