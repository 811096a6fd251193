"""Progress lines for a serial console, and `nodeagent info`."""

from __future__ import annotations

import io

from agent.progress import Progress
from conftest import FIXTURES


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_serial_console_gets_a_line_every_interval_in_frisbee_form():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("written", total=1000 << 20, stream=out, clock=clock)
    assert not p.tty and p.interval == 5.0
    for step in range(1, 41):  # 40 updates over 20 s: 4 lines, not 40
        clock.t += 0.5
        p.update(step * (25 << 20))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("Progress: 25% written 250.0 of 1000.0 MiB")
    assert lines[-1].startswith("Progress: 100% ")
    p.finish("Wrote 1000 MiB")
    assert out.getvalue().splitlines()[-1].startswith("Wrote 1000 MiB in 20.0 s (50.0 MiB/s)")


def test_quiet_prints_nothing():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("read", stream=out, quiet=True, clock=clock)
    clock.t += 60
    p.update(5)
    p.finish("done")
    assert out.getvalue() == ""


def test_unknown_total():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("written", stream=out, clock=clock)
    clock.t += 6
    p.update(3 << 20)
    assert out.getvalue().startswith("Progress: written 3.0 MiB, 0.5 MiB/s")


def test_info_lists_chunks_regions_and_checks(run_cli):
    proc = run_cli("info", "-r", "-c", FIXTURES / "diskB-mbr-v3.ndz", check=True)
    lines = proc.out.splitlines()
    assert lines[0].endswith("3 chunks, V3, zlib, covered sector range [0-65535] (32.0 MiB)")
    assert "chunk 0: V3 zlib, 1043401 compressed bytes, sectors [0-28399], 4 regions" in proc.out
    assert "  region [43008-43071] 64 sectors" in lines
    assert lines[-1] == "check: all 3 chunks decompress to their regions"


def test_info_check_finds_a_corrupt_stream(tmp_path, run_cli):
    data = bytearray((FIXTURES / "fsA-raw-v3.ndz").read_bytes())
    data[(3 << 20) + 4096 + 70000] ^= 0xFF
    bad = tmp_path / "bad.ndz"
    bad.write_bytes(bytes(data))
    assert run_cli("info", bad).returncode == 0  # headers are fine
    proc = run_cli("info", "-c", bad)
    assert proc.returncode == 3 and "chunk 3" in proc.err and "Traceback" not in proc.err  # ImageFormatError


def test_fraction_from_other_units():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("written", stream=out, clock=clock)
    clock.t += 10
    p.update(40 << 20, fraction=0.25)
    assert out.getvalue().startswith("Progress: 25% written 40.0 MiB, 4.0 MiB/s, 0:00:10 elapsed, ETA 0:00:30")


def test_info_shows_the_v5_image_id_as_a_uuid(tmp_path, run_cli):
    import uuid

    from agent.ndz.header import decode

    disk = tmp_path / "disk.img"
    disk.write_bytes(b"nodeagent" * 100000)
    image = tmp_path / "disk.ndz"
    run_cli("save", "-q", "-r", "--v5", disk, image, check=True)
    raw = decode(image.read_bytes()[:4096]).image_id
    proc = run_cli("info", image, check=True)
    assert f"image id {uuid.UUID(bytes=raw)}" in proc.out
