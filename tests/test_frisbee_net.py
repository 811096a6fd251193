"""Frisbee end to end: our server and clients on hosts in network namespaces (a bridge, real multicast)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.frisbee import packets
from conftest import FIXTURES, loop_device, needs_root
from net_helpers import lan

pytestmark = needs_root
GROUP = "239.192.1.9"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def big_image(tmp_path_factory, cli_command):
    """A 24-chunk image of incompressible data (long enough to kill a server in the middle), and its restore."""
    work = tmp_path_factory.mktemp("frisbee")
    disk = work / "disk.bin"
    disk.write_bytes(random.Random(9).randbytes(24 << 20))
    image = work / "disk.ndz"
    subprocess.run([*cli_command, "save", "-q", "-r", disk, image], check=True)
    return image, sha(disk)


def reference(image: Path, tmp_path: Path, cli_command) -> str:
    out = tmp_path / "reference.img"
    subprocess.run([*cli_command, "image", "-q", image, out], check=True)
    return sha(out)


def serve(server, image: Path, port: int, *flags):
    return server.popen(server.nodeagent("serve", "-m", GROUP, "-p", port, "-i", server.addr, "-T", "60", *flags, image))


def receive(host, port: int, target: Path, *flags):
    return host.popen(host.nodeagent("image", "-m", GROUP, "-p", port, "-i", host.addr, "-T", "60", *flags, target))


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("receivers", [1, 8])
def test_receivers_get_the_same_bytes_as_a_file_restore(receivers, tmp_path, cli_command):
    image = FIXTURES / "diskB-mbr-v3.ndz"
    expected = reference(image, tmp_path, cli_command)
    with lan(receivers + 1) as hosts:
        server = serve(hosts[0], image, 5001)
        try:
            clients = [receive(h, 5001, tmp_path / f"out{i}.img") for i, h in enumerate(hosts[1:])]
            logs = [finish(c) for c in clients]
        finally:
            stop(server)
    for i in range(receivers):
        assert sha(tmp_path / f"out{i}.img") == expected
    assert all("Progress: " in log or "Wrote" in log for log in logs)
    # The socket's drop count (SO_RXQ_OVFL) is in the summary: a slow disk is told from a lossy network.
    assert all(re.search(r"Wrote .* \d+ datagrams dropped by the full receive buffer in ", log) for log in logs)


@pytest.mark.parametrize("loss", [10, 30])
def test_packet_loss_on_the_receivers(loss, tmp_path, cli_command):
    image = FIXTURES / "fsA-raw-v3.ndz"
    expected = reference(image, tmp_path, cli_command)
    with lan(3) as hosts:
        for h in hosts[1:]:
            h.drop_incoming_udp(loss, 5002)
        server = serve(hosts[0], image, 5002)
        try:
            clients = [receive(h, 5002, tmp_path / f"out{i}.img") for i, h in enumerate(hosts[1:])]
            for c in clients:
                finish(c, timeout=240)
        finally:
            stop(server)
    assert sha(tmp_path / "out0.img") == sha(tmp_path / "out1.img") == expected


def test_server_restart_and_late_joiner(big_image, tmp_path):
    image, expected = big_image
    with lan(3) as hosts:
        server = serve(hosts[0], image, 5003, "-W", "40000000")
        early = receive(hosts[1], 5003, tmp_path / "early.img")
        time.sleep(2.5)
        assert early.poll() is None  # mid-transfer: 24 MiB at 40 Mbit/s take about 5 s
        stop(server)
        time.sleep(1.5)
        server = serve(hosts[0], image, 5003, "-W", "40000000")
        late = receive(hosts[2], 5003, tmp_path / "late.img")
        try:
            finish(early, timeout=180)
            finish(late, timeout=180)
        finally:
            stop(server)
    assert sha(tmp_path / "early.img") == sha(tmp_path / "late.img") == expected


def test_no_server_gives_up_after_T(tmp_path):
    with lan(1) as hosts:
        start = time.monotonic()
        proc = hosts[0].run(hosts[0].nodeagent("image", "-m", GROUP, "-p", 5004, "-i", hosts[0].addr, "-T", "3", tmp_path / "x.img"))
        elapsed = time.monotonic() - start
    err = proc.stderr.decode()
    assert proc.returncode == 6 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # network
    assert err.endswith(f"no packets from the frisbee server {GROUP}:5004 for 3 s\n"), err  # -T's value, not the port's
    assert 3 <= elapsed < 30
    assert not (tmp_path / "x.img").exists() or (tmp_path / "x.img").stat().st_size == 0


def test_target_too_small_is_refused_before_any_write(big_image, tmp_path):
    image, _ = big_image
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\x5a" * (8 << 20))
    with loop_device(backing) as dev, lan(2) as hosts:
        server = serve(hosts[0], image, 5005)
        try:
            proc = hosts[1].run(hosts[1].nodeagent("image", "-m", GROUP, "-p", 5005, "-i", hosts[1].addr, "-T", "30", dev))
        finally:
            stop(server)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "needs" in err and "Traceback" not in err, err
    assert backing.read_bytes() == b"\x5a" * (8 << 20)


def test_blocks_from_a_third_host_are_ignored(big_image, tmp_path):
    image, expected = big_image
    with lan(3) as hosts:
        server = serve(hosts[0], image, 5006, "-W", "40000000")
        client = receive(hosts[1], 5006, tmp_path / "out.img")
        # The third host floods the group with BLOCKs of garbage for every chunk while the transfer runs.
        forger = hosts[2].popen(hosts[2].cmd(
            "python3", "-c",
            "import socket,sys,time\n"
            "sys.path.insert(0, %r)\n"
            "from agent.frisbee import packets\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(%r))\n"
            "s.bind((%r, 5006))\n"
            "end = time.time() + 8\n"
            "while time.time() < end:\n"
            "  for c in range(24):\n"
            "    for b in range(0, 1024, 7):\n"
            "      s.sendto(packets.encode(packets.Block(c, b, b'\\xee' * 1024), %r), (%r, 5006))\n"
            "  time.sleep(0.01)\n" % (str(Path(__file__).resolve().parent.parent), hosts[2].addr, hosts[2].addr, hosts[2].addr, GROUP)
        ))
        try:
            finish(client, timeout=180)
        finally:
            stop(server)
            stop(forger)
    assert sha(tmp_path / "out.img") == expected
