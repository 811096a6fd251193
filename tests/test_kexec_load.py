"""agent.kexec.load and `nodeagent kexec` on the host: every refusal happens before a system call, and the policy
(-s/-c/-a, the fallback, what is reported) is the library's. The syscalls go to a recording stand-in for
agent.linux; the real kexec_file_load / kexec_load / reboot are never called here (only in tests/vm/test_kexec.py,
inside QEMU). /proc and /sys are fake trees under tmp_path. CLI runs in a subprocess only use arguments that are
refused first."""

from __future__ import annotations

import errno
import os

import pytest
from test_bzimage import make_bzimage

from agent import cli
from agent.errors import KexecError, LinuxError
from agent.kexec.bzimage import parse_bzimage
from agent.kexec.load import KexecFileRefused, execute, kexec_cmdline, load_kernel, ram_ranges, unload

MiB = 1 << 20


def _opened(f):
    """The path of the file a descriptor handed to the fake syscall has open."""
    return None if f is None else os.readlink(f"/proc/self/fd/{f.fileno()}")


class FakeLinux:
    """Records what would have been called; never touches the kernel. fail_errno: kexec_file_load and reboot fail
    with it; load_errno: kexec_load fails with it."""

    KEXEC_FILE_UNLOAD = 1
    KEXEC_ARCH_DEFAULT = 0
    LINUX_REBOOT_CMD_KEXEC = 0x45584543

    class KexecSegment(tuple):
        def __new__(cls, buf, mem, memsz):
            return tuple.__new__(cls, (buf, mem, memsz))

    def __init__(self, fail_errno=None, load_errno=None):
        self.calls = []
        self.fail_errno = fail_errno
        self.load_errno = load_errno

    def kexec_file_load(self, kernel, initrd=None, cmdline="", flags=0):
        self.calls.append(("kexec_file_load", _opened(kernel), _opened(initrd), cmdline, flags))
        if self.fail_errno:
            raise LinuxError(self.fail_errno, "kexec_file_load x")

    def kexec_load(self, entry, segments, flags):
        self.calls.append(("kexec_load", entry, list(segments), flags))
        if self.load_errno:
            raise LinuxError(self.load_errno, "kexec_load")

    def sync(self):
        self.calls.append(("sync",))

    def reboot(self, cmd):
        self.calls.append(("reboot", cmd))
        if self.fail_errno:
            raise LinuxError(self.fail_errno, "reboot(KEXEC)")


def memmap(root, entries):
    """A fake tree at `root` with a /sys/firmware/memmap of entries (start, end_inclusive, type); returns the root."""
    for i, (start, end, kind) in enumerate(entries):
        d = root / "sys/firmware/memmap" / str(i)
        d.mkdir(parents=True)
        (d / "start").write_text(f"0x{start:x}\n")
        (d / "end").write_text(f"0x{end:x}\n")
        (d / "type").write_text(kind + "\n")
    return str(root)


QEMU_512M = [(0, 0x9FBFF, "System RAM"), (0x9FC00, 0x9FFFF, "Reserved"), (0xF0000, 0xFFFFF, "Reserved"),
             (0x100000, 0x1FFDFFFF, "System RAM"), (0x1FFE0000, 0x1FFFFFFF, "Reserved")]
RAM_1G = [(0, (1 << 30) - 1, "System RAM")]


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage())  # needs init_size 32 MiB at a 2 MiB boundary
    return str(path)


def test_ram_ranges_from_memmap(tmp_path):
    assert ram_ranges(memmap(tmp_path, QEMU_512M)) == [(0, 0x9FC00), (0x100000, 0x1FFE0000)]


def test_ram_ranges_from_iomem(tmp_path):
    (tmp_path / "proc").mkdir()
    iomem = tmp_path / "proc/iomem"
    iomem.write_text(
        "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n000a0000-000bffff : PCI Bus 0000:00\n"
        "00100000-1ffdffff : System RAM\n  0a000000-0b002596 : Kernel code\n1ffe0000-1fffffff : Reserved\n"
    )
    assert ram_ranges(str(tmp_path)) == [(0x1000, 0x9FC00), (0x100000, 0x1FFE0000)]
    hidden = tmp_path / "user/proc/iomem"  # what an unprivileged reader sees
    hidden.parent.mkdir(parents=True)
    hidden.write_text("00000000-00000000 : System RAM\n")
    assert ram_ranges(str(tmp_path / "user")) == []


def test_missing_kernel_refused_before_syscall(tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^kernel .*/nope: no such file$"):
        load_kernel(str(tmp_path / "nope"), linux=fake)
    assert fake.calls == []


def test_etc_passwd_is_not_a_kernel():
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^kernel /etc/passwd: not a bzImage"):
        load_kernel("/etc/passwd", linux=fake)
    assert fake.calls == []


def test_directory_device_and_fifo_refused(tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match="is a directory"):
        load_kernel(str(tmp_path), linux=fake)
    with pytest.raises(KexecError, match="not a regular file"):
        load_kernel("/dev/null", linux=fake)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: refused at once, not a hang in open()
    with pytest.raises(KexecError, match=r"^kernel .*/fifo: not a regular file$"):
        load_kernel(str(fifo), linux=fake)
    with pytest.raises(KexecError, match=r"^initrd .*/fifo: not a regular file$"):
        load_kernel(make_kernel(tmp_path), str(fifo), linux=fake, root=memmap(tmp_path / "root", RAM_1G))
    assert fake.calls == []


def test_missing_initrd_refused(kernel, tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"^initrd .*/initrd: no such file$"):
        load_kernel(kernel, str(tmp_path / "initrd"), linux=fake, root=memmap(tmp_path / "root", RAM_1G))
    assert fake.calls == []


def test_kernel_too_big_for_memory(kernel, tmp_path):
    # 24 MiB of RAM; the kernel needs 32 MiB (init_size) in one piece
    small = memmap(tmp_path / "root", [(0, 0x9FBFF, "System RAM"), (0x100000, 0x17FFFFF, "System RAM")])
    fake = FakeLinux()
    with pytest.raises(KexecError) as info:
        load_kernel(kernel, linux=fake, root=small)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"kernel {kernel} does not fit in 23 MiB of RAM: no room for the kernel")
    assert fake.calls == []


def test_initrd_too_big_for_memory(kernel, tmp_path):
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(600 * MiB)  # sparse
    root = memmap(tmp_path / "root", QEMU_512M)
    fake = FakeLinux()
    with pytest.raises(KexecError, match=r"does not fit in 511 MiB of RAM: no room for a 629145600-byte initrd"):
        load_kernel(kernel, str(initrd), linux=fake, root=root)
    assert fake.calls == []


def test_command_line_too_long(kernel, tmp_path):
    fake = FakeLinux()
    for mode in ("file", "load", "auto"):
        with pytest.raises(KexecError, match="command line is 3000 bytes, the kernel takes at most 2047"):
            load_kernel(kernel, cmdline="x" * 3000, mode=mode, linux=fake, root=memmap(tmp_path / mode, RAM_1G))
    assert fake.calls == []


def test_load_calls_kexec_file_load(kernel, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701" + b"\0" * 100)
    fake = FakeLinux()
    root = memmap(tmp_path / "root", QEMU_512M)
    said = []
    for mode in ("file", "auto"):
        assert load_kernel(kernel, str(initrd), "console=ttyS0", mode, said.append, linux=fake, root=root) == \
            "kexec_file_load"
    assert fake.calls == [("kexec_file_load", kernel, str(initrd), "console=ttyS0", 0)] * 2
    assert said == [f"{kernel}: loaded with kexec_file_load"] * 2


def test_kernel_refusal_is_kexec_file_refused(kernel, tmp_path):
    fake = FakeLinux(fail_errno=errno.EPERM)
    with pytest.raises(KexecFileRefused, match="Operation not permitted.*lockdown") as info:
        load_kernel(kernel, mode="file", linux=fake, root=memmap(tmp_path, RAM_1G))
    assert info.value.errno == errno.EPERM
    assert isinstance(info.value, KexecError) and info.value.exit_status == 12
    assert [c[0] for c in fake.calls] == ["kexec_file_load"]  # -s: no fallback


def test_unload():
    fake = FakeLinux()
    assert unload(linux=fake) == "unloaded"
    assert fake.calls == [("kexec_file_load", None, None, None, FakeLinux.KEXEC_FILE_UNLOAD)]


def _kexec_loaded(root, text):
    (root / "sys/kernel").mkdir(parents=True)
    (root / "sys/kernel/kexec_loaded").write_text(text)
    return str(root)


def test_execute_syncs_then_reboots_and_reports_return(tmp_path):
    root = _kexec_loaded(tmp_path, "1\n")
    fake = FakeLinux()
    with pytest.raises(KexecError, match="no kernel loaded"):
        execute(root=root, linux=fake)
    assert fake.calls == [("sync",), ("reboot", FakeLinux.LINUX_REBOOT_CMD_KEXEC)]
    fake = FakeLinux(fail_errno=errno.EINVAL)
    with pytest.raises(KexecError, match="^no kernel loaded"):
        execute(root=root, linux=fake)


def test_execute_refuses_when_sysfs_says_nothing_loaded(tmp_path):
    fake = FakeLinux()
    with pytest.raises(KexecError, match="^no kernel loaded"):
        execute(root=_kexec_loaded(tmp_path, "0\n"), linux=fake)
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


def test_reuse_cmdline(tmp_path):
    (tmp_path / "proc").mkdir()
    proc = tmp_path / "proc/cmdline"
    proc.write_text("BOOT_IMAGE=/boot/vmlinuz-6.1 root=UUID=abc ro quiet initrd=\\initrd.img\n")
    root = str(tmp_path)
    assert kexec_cmdline(None, reuse=True, root=root) == "root=UUID=abc ro quiet"
    assert kexec_cmdline("x=1", reuse=True, root=root) == "root=UUID=abc ro quiet x=1"
    assert kexec_cmdline("x=1", root=root) == "x=1"
    proc.write_text('BOOT_IMAGE="/boot/my kernel" nodeagent.note="a b" ro\n')  # quoted blanks stay in their word
    assert kexec_cmdline(None, reuse=True, root=root) == 'nodeagent.note="a b" ro'
    with pytest.raises(KexecError, match="cannot read the running kernel's command line"):
        kexec_cmdline(None, reuse=True, root=str(tmp_path / "none"))


def make_kernel(where, name="vmlinuz"):
    path = where / name
    path.write_bytes(make_bzimage())
    return str(path)


def test_auto_falls_back_to_kexec_load(tmp_path):
    kernel = make_kernel(tmp_path)
    root = memmap(tmp_path / "root", QEMU_512M)
    fake = FakeLinux(fail_errno=errno.ENOSYS)
    said = []
    assert load_kernel(kernel, None, "x=1", "auto", said.append, root=root, linux=fake) == "kexec_load"
    assert said == [
        "kexec_file_load refused (kexec_file_load x: Function not implemented (the running kernel has no "
        "CONFIG_KEXEC_FILE)); falling back to kexec_load",
        f"{kernel}: loaded with kexec_load",
    ]
    assert [c[0] for c in fake.calls] == ["kexec_file_load", "kexec_load"]

    fake = FakeLinux(fail_errno=errno.ENOSYS, load_errno=errno.EPERM)
    said = []
    with pytest.raises(KexecError, match=r"^kexec_load: Operation not permitted"):
        load_kernel(kernel, None, "x=1", "auto", said.append, root=root, linux=fake)
    assert len(said) == 1 and said[0].startswith("kexec_file_load refused")
    with pytest.raises(KexecFileRefused, match=r"^kexec_file_load x: Function not implemented"):
        load_kernel(kernel, mode="file", root=root, linux=FakeLinux(fail_errno=errno.ENOSYS))


def test_kernel_read_and_checked_once(tmp_path):
    """The fallback loads the kernel that was checked: replacing the file after the first attempt changes nothing
    (the old code read and checked it again, and refused the replacement)."""
    kernel = make_kernel(tmp_path)
    original = open(kernel, "rb").read()
    root = memmap(tmp_path / "root", QEMU_512M)

    class ReplacedMeanwhile(FakeLinux):
        def kexec_file_load(self, *args):
            with open(kernel + ".new", "wb") as f:
                f.write(b"not a kernel")
            os.replace(kernel + ".new", kernel)
            super().kexec_file_load(*args)

    fake = ReplacedMeanwhile(fail_errno=errno.ENOSYS)
    assert load_kernel(kernel, root=root, linux=fake) == "kexec_load"
    (_, entry, segments, _) = fake.calls[-1]
    bz = parse_bzimage(original)
    assert any(bytes(buf) == original[bz.kernel_offset : bz.kernel_offset + bz.kernel_size] for buf, _, _ in segments)


def test_mode_load_never_tries_kexec_file_load(tmp_path):
    kernel = make_kernel(tmp_path)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"I" * 5000)
    fake = FakeLinux(fail_errno=errno.EPERM)  # kexec_file_load would fail: it must not be called
    said = []
    assert load_kernel(kernel, str(initrd), "a=1", "load", said.append, root=memmap(tmp_path / "r", QEMU_512M),
                       linux=fake) == "kexec_load"
    assert [c[0] for c in fake.calls] == ["kexec_load"]
    assert said == [f"{kernel}: loaded with kexec_load"]
    with pytest.raises(KexecError, match="unknown kexec mode"):
        load_kernel(kernel, mode="s", linux=fake)


@pytest.mark.parametrize("args, message, status", [
    (["-l", "/etc/passwd"], "nodeagent kexec: kernel /etc/passwd: not a bzImage", 12),
    (["-s", "-l", "/nonexistent/vmlinuz"], "nodeagent kexec: kernel /nonexistent/vmlinuz: no such file", 12),
    (["-c", "-l", "/etc/passwd"], "nodeagent kexec: kernel /etc/passwd: not a bzImage", 12),
    (["-l", "/etc/passwd", "--disk", "/dev/null"], "nodeagent kexec: give either -l KERNEL or --disk DEVICE", 2),
    ([], "nodeagent kexec: nothing to do", 2),
    (["-u", "-l", "/etc/passwd"], "nodeagent kexec: -u unloads: give it alone", 2),
    (["--disk", "/dev/null", "--initrd", "/i"], "nodeagent kexec: --initrd goes with -l KERNEL", 2),
])
def test_cli_refusals(run_cli, args, message, status):
    proc = run_cli("kexec", *args)
    assert proc.returncode == status
    assert proc.err.startswith(message) and proc.err.count("\n") == 1, proc.err
