"""agent.kexec.load and `nodeagent kexec` on the host: every refusal happens before a system call. The syscalls go to
a recording stand-in for agent.linux; the real kexec_file_load / kexec_load / reboot are never called here (only in
tests/vm/test_kexec.py, inside QEMU). CLI runs in a subprocess only use arguments that are refused first."""

from __future__ import annotations

import errno

import pytest
from test_bzimage import make_bzimage

from agent import cli
from agent.errors import LinuxError
from agent.kexec import load
from agent.kexec.load import KexecError, KexecFileRefused, check, execute, load_file, ram_ranges, unload

MiB = 1 << 20


class FakeLinux:
    """Records what would have been called; never touches the kernel."""

    KEXEC_FILE_UNLOAD = 1
    LINUX_REBOOT_CMD_KEXEC = 0x45584543

    def __init__(self, fail_errno=None):
        self.calls = []
        self.fail_errno = fail_errno

    def kexec_file_load(self, kernel, initrd=None, cmdline="", flags=0):
        self.calls.append(("kexec_file_load", getattr(kernel, "name", kernel), getattr(initrd, "name", initrd),
                           cmdline, flags))
        if self.fail_errno:
            raise LinuxError(self.fail_errno, "kexec_file_load x")

    def sync(self):
        self.calls.append(("sync",))

    def reboot(self, cmd):
        self.calls.append(("reboot", cmd))
        if self.fail_errno:
            raise LinuxError(self.fail_errno, "reboot(KEXEC)")


def memmap(tmp_path, entries):
    """A synthetic /sys/firmware/memmap: entries of (start, end_inclusive, type)."""
    root = tmp_path / "memmap"
    for i, (start, end, kind) in enumerate(entries):
        d = root / str(i)
        d.mkdir(parents=True)
        (d / "start").write_text(f"0x{start:x}\n")
        (d / "end").write_text(f"0x{end:x}\n")
        (d / "type").write_text(kind + "\n")
    return str(root)


QEMU_512M = [(0, 0x9FBFF, "System RAM"), (0x9FC00, 0x9FFFF, "Reserved"), (0xF0000, 0xFFFFF, "Reserved"),
             (0x100000, 0x1FFDFFFF, "System RAM"), (0x1FFE0000, 0x1FFFFFFF, "Reserved")]


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage())  # needs init_size 32 MiB at a 2 MiB boundary
    return str(path)


def test_ram_ranges_from_memmap(tmp_path):
    assert ram_ranges(memmap(tmp_path, QEMU_512M), "/nonexistent") == [(0, 0x9FC00), (0x100000, 0x1FFE0000)]


def test_ram_ranges_from_iomem(tmp_path):
    iomem = tmp_path / "iomem"
    iomem.write_text(
        "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n000a0000-000bffff : PCI Bus 0000:00\n"
        "00100000-1ffdffff : System RAM\n  0a000000-0b002596 : Kernel code\n1ffe0000-1fffffff : Reserved\n"
    )
    assert ram_ranges(str(tmp_path / "none"), str(iomem)) == [(0x1000, 0x9FC00), (0x100000, 0x1FFE0000)]
    hidden = tmp_path / "iomem-user"  # what an unprivileged reader sees
    hidden.write_text("00000000-00000000 : System RAM\n")
    assert ram_ranges(str(tmp_path / "none"), str(hidden)) == []


def test_missing_kernel_refused_before_syscall(tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^kernel .*/nope: no such file$"):
        load_file(str(tmp_path / "nope"), linux=fake)
    assert fake.calls == []


def test_etc_passwd_is_not_a_kernel():
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^kernel /etc/passwd: not a bzImage"):
        load_file("/etc/passwd", linux=fake)
    assert fake.calls == []


def test_directory_and_device_refused(tmp_path):
    with pytest.raises(KexecError, match="is a directory"):
        check(str(tmp_path))
    with pytest.raises(KexecError, match="not a regular file"):
        check("/dev/null")


def test_missing_initrd_refused(kernel, tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^initrd .*/initrd: no such file$"):
        load_file(kernel, str(tmp_path / "initrd"), linux=fake, ranges=[(0, 1 << 30)])
    assert fake.calls == []


def test_kernel_too_big_for_memory(kernel, tmp_path):
    # 24 MiB of RAM; the kernel needs 32 MiB (init_size) in one piece
    small = ram_ranges(memmap(tmp_path, [(0, 0x9FBFF, "System RAM"), (0x100000, 0x17FFFFF, "System RAM")]), "/x")
    fake = FakeLinux()
    with pytest.raises(KexecError) as info:
        load_file(kernel, linux=fake, ranges=small)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"kernel {kernel} does not fit in 23 MiB of RAM: no room for the kernel")
    assert fake.calls == []


def test_initrd_too_big_for_memory(kernel, tmp_path):
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(600 * MiB)  # sparse
    ranges = ram_ranges(memmap(tmp_path, QEMU_512M), "/x")
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"does not fit in 511 MiB of RAM: no room for a 629145600-byte initrd"):
        load_file(kernel, str(initrd), linux=fake, ranges=ranges)
    assert fake.calls == []


def test_command_line_too_long(kernel):
    with pytest.raises(KexecError, match="command line is 3000 bytes, the kernel takes at most 2047"):
        load_file(kernel, cmdline="x" * 3000, linux=FakeLinux(), ranges=[(0, 1 << 30)])


def test_load_calls_kexec_file_load(kernel, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701" + b"\0" * 100)
    fake = FakeLinux()
    ranges = ram_ranges(memmap(tmp_path, QEMU_512M), "/x")
    assert load_file(kernel, str(initrd), "console=ttyS0", linux=fake, ranges=ranges) == "loaded with kexec_file_load"
    assert fake.calls == [("kexec_file_load", kernel, str(initrd), "console=ttyS0", 0)]


def test_kernel_refusal_is_kexec_file_refused(kernel):
    fake = FakeLinux(fail_errno=errno.EPERM)
    with pytest.raises(KexecFileRefused, match="Operation not permitted.*lockdown") as info:
        load_file(kernel, linux=fake, ranges=[(0, 1 << 30)])
    assert info.value.errno == errno.EPERM


def test_unload():
    fake = FakeLinux()
    assert unload(linux=fake) == "unloaded"
    assert fake.calls == [("kexec_file_load", None, None, None, FakeLinux.KEXEC_FILE_UNLOAD)]


def test_execute_syncs_then_reboots_and_reports_return(monkeypatch):
    monkeypatch.setattr(load, "kexec_loaded", lambda: True)
    fake = FakeLinux()
    with pytest.raises(KexecError, match="no kernel loaded"):
        execute(linux=fake)
    assert fake.calls == [("sync",), ("reboot", FakeLinux.LINUX_REBOOT_CMD_KEXEC)]
    fake = FakeLinux(fail_errno=errno.EINVAL)
    with pytest.raises(KexecError, match="^no kernel loaded"):
        execute(linux=fake)


def test_execute_refuses_when_sysfs_says_nothing_loaded(monkeypatch):
    monkeypatch.setattr(load, "kexec_loaded", lambda: False)
    fake = FakeLinux()
    with pytest.raises(KexecError, match="^no kernel loaded"):
        execute(linux=fake)
    assert fake.calls == []


# -- the command line -----------------------------------------------------------------------------------------


def parse(*argv):
    return cli.build_parser().parse_args(["kexec", *argv])


def test_parse_kexec_tools_flags():
    a = parse("-s", "-l", "/k", "--initrd", "/i", "--append", "console=ttyS0", "-e")
    assert (a.load, a.initrd, a.append, a.syscall, a.exec, a.unload) == ("/k", "/i", "console=ttyS0", "s", True, False)
    a = parse("--load", "/k", "--ramdisk", "/i", "--command-line", "quiet", "-c")
    assert (a.load, a.initrd, a.append, a.syscall) == ("/k", "/i", "quiet", "c")
    assert parse("-l", "/k").syscall == "a"  # the default
    assert parse("-a", "-l", "/k").syscall == "a"
    assert parse("-u").unload and parse("-e").exec
    a = parse("--disk", "/dev/sda", "-e")
    assert a.disk == "/dev/sda" and a.exec and a.load is None
    with pytest.raises(SystemExit):
        parse("-s", "-c", "-l", "/k")


def test_reuse_cmdline(tmp_path, monkeypatch):
    proc = tmp_path / "cmdline"
    proc.write_text("BOOT_IMAGE=/boot/vmlinuz-6.1 root=UUID=abc ro quiet initrd=\\initrd.img\n")
    original = cli._reuse_cmdline
    monkeypatch.setattr(cli, "_reuse_cmdline", lambda: original(str(proc)))
    assert cli.kexec_cmdline(parse("-l", "/k", "--reuse-cmdline")) == "root=UUID=abc ro quiet"
    assert cli.kexec_cmdline(parse("-l", "/k", "--reuse-cmdline", "--append", "x=1")) == "root=UUID=abc ro quiet x=1"
    assert cli.kexec_cmdline(parse("-l", "/k", "--append", "x=1")) == "x=1"


def test_auto_falls_back_to_kexec_load(monkeypatch, capsys):
    def refused(*a, **kw):
        raise KexecFileRefused("kexec_file_load /k: Function not implemented", errno.ENOSYS)

    legacy = []
    monkeypatch.setattr(load, "load_file", refused)
    monkeypatch.setattr(load, "load_legacy", lambda k, i, c: legacy.append((k, i, c)) or "loaded with kexec_load")
    assert cli.main(["kexec", "-l", "/k", "--append", "x=1"]) == 0
    out = capsys.readouterr().out
    assert out == ("nodeagent kexec: kexec_file_load refused (kexec_file_load /k: Function not implemented); "
                   "falling back to kexec_load\nnodeagent kexec: /k: loaded with kexec_load\n")
    assert legacy == [("/k", None, "x=1")]

    def legacy_refused(*a):
        raise KexecError("kexec_load: Operation not permitted")

    monkeypatch.setattr(load, "load_legacy", legacy_refused)
    assert cli.main(["kexec", "-l", "/k"]) == 1
    err = capsys.readouterr().err
    assert err == "nodeagent kexec: kexec_load: Operation not permitted\n"
    assert cli.main(["kexec", "-s", "-l", "/k"]) == 1
    err = capsys.readouterr().err
    assert err == "nodeagent kexec: kexec_file_load /k: Function not implemented\n"


def test_cli_says_which_syscall(monkeypatch, capsys):
    monkeypatch.setattr(load, "load_file", lambda k, i, c: "loaded with kexec_file_load")
    assert cli.main(["kexec", "-l", "/k", "--append", "quiet"]) == 0
    assert capsys.readouterr().out == "nodeagent kexec: /k: loaded with kexec_file_load\n"


@pytest.mark.parametrize("args, message", [
    (["-l", "/etc/passwd"], "nodeagent kexec: kernel /etc/passwd: not a bzImage"),
    (["-s", "-l", "/nonexistent/vmlinuz"], "nodeagent kexec: kernel /nonexistent/vmlinuz: no such file"),
    (["-c", "-l", "/etc/passwd"], "nodeagent kexec: kernel /etc/passwd: not a bzImage"),
    (["-l", "/etc/passwd", "--disk", "/dev/null"], "nodeagent kexec: give either -l KERNEL or --disk DEVICE"),
    ([], "nodeagent kexec: nothing to do"),
    (["-u", "-l", "/etc/passwd"], "nodeagent kexec: -u unloads: give it alone"),
])
def test_cli_refusals(run_cli, args, message):
    proc = run_cli("kexec", *args)
    assert proc.returncode == 1
    assert proc.err.startswith(message) and proc.err.count("\n") == 1, proc.err
