"""Boot a kernel + initramfs in QEMU (TCG: KVM does not work on these hosts) and read the guest's verdict.

Verdict convention: the guest prints a line
    NODEAGENT-VERDICT: PASS
or  NODEAGENT-VERDICT: FAIL <why>
on the serial console (ttyS0) and powers off (busybox `poweroff -f`). The last verdict line counts.
The VM runs with -no-reboot and panic=-1, so a kernel panic or a reboot ends QEMU too; a hang is killed
after `timeout` seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

VERDICT_RE = re.compile(r"^NODEAGENT-VERDICT: (PASS|FAIL)\b[ \t]*(.*)$", re.M)

# Shell snippets for an /init run by busybox sh: `fail why...` prints a FAIL verdict and powers off,
# `pass` prints PASS and powers off.
SH_VERDICT_FUNCTIONS = """\
pass() { echo; echo "NODEAGENT-VERDICT: PASS"; sync; poweroff -f; sleep 10; }
fail() { echo; echo "NODEAGENT-VERDICT: FAIL $*"; sync; poweroff -f; sleep 10; }
"""


def sh_init(body: str) -> str:
    """A complete /init for busybox sh: PATH, the verdict functions, then body."""
    return "#!/bin/busybox sh\nexport PATH=/bin\n" + SH_VERDICT_FUNCTIONS + body


@dataclass
class VmResult:
    verdict: str | None  # "PASS", "FAIL" or None (no verdict line: hang, panic, init died)
    reason: str  # the text after FAIL, or what went wrong when there is no verdict
    log: str  # the serial console, \r removed
    log_path: Path
    elapsed: float  # seconds from QEMU start to its exit (or kill)
    returncode: int | None  # QEMU's exit status; None when killed on timeout
    timed_out: bool

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def summary(self) -> str:
        what = f"verdict {self.verdict} {self.reason}".rstrip() if self.verdict else f"no verdict: {self.reason}"
        return f"{what} after {self.elapsed:.1f} s (log {self.log_path})"

    def assert_pass(self, lines: int = 60) -> None:
        if not self.passed:
            raise AssertionError(f"VM {self.summary()}\n--- last {lines} console lines ---\n{self.tail(lines)}")


def qemu_command(kernel, initramfs, *, append: str = "", disks=(), memory: int = 512, smp: int = 2,
                 log_path, extra=()) -> list[str]:
    """The qemu-system-x86_64 command line: TCG, no network, serial console to log_path, no monitor."""
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-smp", str(smp),
        "-nographic", "-monitor", "none", "-serial", f"file:{log_path}", "-no-reboot", "-nic", "none",
        "-no-user-config",
        "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", f"console=ttyS0 panic=-1 {append}".strip(),
    ]
    for disk in disks:
        if isinstance(disk, (str, os.PathLike)):
            path = os.fspath(disk)
            if "," in path:
                raise ValueError(f"disk path {path!r} has a comma (QEMU option syntax)")
            spec = f"file={path},if=virtio,format=raw"
        else:
            spec = ",".join(f"{k}={v}" for k, v in disk.items())
        cmd += ["-drive", spec]
    return cmd + list(extra)


def boot_vm(kernel, initramfs, *, append: str = "", disks=(), timeout: float = 60, log_path,
            memory: int = 512, smp: int = 2, extra=()) -> VmResult:
    """Boot and wait for QEMU to end (at most `timeout` s, then kill it). `disks` are raw image paths, each
    attached as a virtio disk (/dev/vda, /dev/vdb, ...), or dicts of -drive options. Returns a VmResult."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 is not installed")
    log_path = Path(log_path)
    log_path.unlink(missing_ok=True)
    cmd = qemu_command(kernel, initramfs, append=append, disks=disks, memory=memory, smp=smp,
                       log_path=log_path, extra=extra)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the QEMU we started, nothing else
        out, _ = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    elapsed = time.monotonic() - start
    log = log_path.read_bytes().decode(errors="replace").replace("\r", "") if log_path.exists() else ""
    qemu_out = out.decode(errors="replace").strip()
    found = VERDICT_RE.findall(log)
    if found:
        verdict, reason = found[-1]
    else:
        verdict = None
        if timed_out:
            reason = f"killed after the {timeout:g} s time limit"
        elif "Kernel panic" in log:
            reason = "kernel panic: " + next(line for line in log.splitlines() if "Kernel panic" in line).strip()
        else:
            reason = f"QEMU exited with status {proc.returncode}"
        if qemu_out:
            reason += f"; QEMU said: {qemu_out[-500:]}"
    return VmResult(verdict=verdict, reason=reason.strip(), log=log, log_path=log_path, elapsed=elapsed,
                    returncode=None if timed_out else proc.returncode, timed_out=timed_out)
