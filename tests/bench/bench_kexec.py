"""Benchmark: time from `kexec -e` to the second kernel's /init, in QEMU (TCG), host-side.

    sudo python3 tests/bench/bench_kexec.py [--runs 3]

For each loader -- nodeagent -s (kexec_file_load), nodeagent -c (kexec_load + our purgatory), kexec-tools
`kexec -s` and `kexec -c` -- boots the same 512 MiB VM whose /init loads Debian's kernel + a small busybox initrd,
prints a mark, then runs the exec step. The host polls the serial log and times from the first mark to the second
kernel's /init's mark. kexec-tools comes from `apt-get download kexec-tools` + `dpkg -x` into a temp dir (never
installed), with the libraries ldd names (its Xen libraries are fetched the same way). Prints medians and the
ratios nodeagent / kexec-tools.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "csrc"))

from staticbuild.debian_kernel import fetch_debian_kernel  # noqa: E402
from staticbuild.initramfs import InitramfsSpec, build_initramfs  # noqa: E402
from tests.vm.conftest import _static_busybox  # noqa: E402
from tests.vm.harness import qemu_command, sh_init  # noqa: E402
from tests.vm.pyruntime import add_agent, python_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXEC_MARK = "BENCH-EXEC-NOW"
SECOND_MARK = "BENCH-SECOND-INIT"
APPLETS = ("sh", "mount", "cat", "echo", "grep", "uname", "poweroff", "sync", "sleep")
KEXEC_TOOLS_DEBS = ["kexec-tools", "libxenmisc4.17", "libxentoollog1", "libxencall1", "libxenevtchn1",
                    "libxengnttab1", "libxenforeignmemory1", "libxendevicemodel1", "libxentoolcore1"]

PREAMBLE = """\
export PATH=/bin:/usr/bin:/sbin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sys /sys || fail "mount sysfs"
mount -t devtmpfs dev /dev || fail "mount devtmpfs"
"""
APPEND = "console=ttyS0 panic=-1 quiet"
LOADERS = {
    "nodeagent -s": f"""python3 -m agent kexec -s -l /second/vmlinuz --initrd /second/initrd.cpio --append "{APPEND}" \
|| fail load
python3 -c "from agent.kexec import load; print('{EXEC_MARK}', flush=True); load.execute()"
fail exec
""",
    "nodeagent -c": f"""python3 -m agent kexec -c -l /second/vmlinuz --initrd /second/initrd.cpio --append "{APPEND}" \
|| fail load
python3 -c "from agent.kexec import load; print('{EXEC_MARK}', flush=True); load.execute()"
fail exec
""",
    "kexec-tools -s": f"""LD_LIBRARY_PATH=/kt/lib /kt/kexec -s -l /second/vmlinuz --initrd=/second/initrd.cpio \
--append="{APPEND}" || fail load
echo {EXEC_MARK}; LD_LIBRARY_PATH=/kt/lib /kt/kexec -e
fail exec
""",
    "kexec-tools -c": f"""LD_LIBRARY_PATH=/kt/lib /kt/kexec -c -l /second/vmlinuz --initrd=/second/initrd.cpio \
--append="{APPEND}" || fail load
echo {EXEC_MARK}; LD_LIBRARY_PATH=/kt/lib /kt/kexec -e
fail exec
""",
}


def kexec_tools(work: Path) -> tuple[Path, list[Path]]:
    debs = work / "debs"
    debs.mkdir()
    subprocess.run(["apt-get", "download", *KEXEC_TOOLS_DEBS], cwd=debs, check=True, capture_output=True)
    root = work / "ktroot"
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    binary = root / "sbin/kexec"
    libdir = root / "usr/lib/x86_64-linux-gnu"
    out = subprocess.run(["ldd", str(binary)], env={**os.environ, "LD_LIBRARY_PATH": str(libdir)},
                         capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        if "=>" in line and "/" in line.split("=>")[1]:
            path = line.split("=>")[1].split("(")[0].strip()
            if "not found" in line:
                raise SystemExit(f"kexec-tools: {line.strip()}")
            libs.append(Path(path))
    return binary, libs


def build(work: Path, kernel, busybox: str, loader: str, kt) -> Path:
    second = InitramfsSpec()
    second.file("bin/busybox", src=busybox, mode=0o755)
    for a in APPLETS:
        second.symlink(f"bin/{a}", "busybox")
    for d in ("proc", "sys", "tmp", "etc"):
        second.dir(d)
    second.add_console_devices()
    second.file("init", data=sh_init(f"echo {SECOND_MARK}\npass\n"), mode=0o755)
    initrd = build_initramfs(second, work / "second.cpio", compression="gzip")

    spec = InitramfsSpec()
    spec.file("bin/busybox", src=busybox, mode=0o755)
    for a in APPLETS:
        spec.symlink(f"bin/{a}", "busybox")
    for d in ("proc", "sys", "tmp", "mnt", "sbin", "etc"):
        spec.dir(d)
    spec.add_console_devices()
    spec.tree(python_runtime())
    add_agent(spec, work)
    binary, libs = kt
    spec.file("kt/kexec", src=binary, mode=0o755)
    for lib in libs:
        spec.file(f"kt/lib/{lib.name}", src=lib, mode=0o755)
    spec.file("second/vmlinuz", src=kernel.vmlinuz)
    spec.file("second/initrd.cpio", src=initrd)
    spec.file("init", data=sh_init(PREAMBLE + LOADERS[loader]), mode=0o755)
    return build_initramfs(spec, work / "first.cpio", compression="none")


def run_once(kernel, initramfs: Path, log: Path, timeout: float = 180) -> float:
    log.unlink(missing_ok=True)
    cmd = qemu_command(kernel.vmlinuz, initramfs, log_path=log, memory=512)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t_exec = t_second = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and t_second is None:
            text = log.read_bytes().decode(errors="replace") if log.exists() else ""
            now = time.monotonic()
            if t_exec is None and EXEC_MARK + "\n" in text.replace("\r", ""):
                t_exec = now
            if t_exec is not None and SECOND_MARK + "\n" in text.replace("\r", ""):
                t_second = now
            if proc.poll() is not None and t_second is None:
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if t_exec is None or t_second is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        raise SystemExit(f"no timing (exec {t_exec}, second {t_second}); console tail:\n{tail}")
    return t_second - t_exec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    busybox = _static_busybox()
    if busybox is None or shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs qemu-system-x86_64 and a static busybox")
    subprocess.run([sys.executable, str(ROOT / "build.py"), "purgatory"], check=True, capture_output=True)
    kernel = fetch_debian_kernel(with_modules=False)
    with tempfile.TemporaryDirectory(prefix="bench-kexec-") as tmp:
        work = Path(tmp)
        kt = kexec_tools(work)
        medians = {}
        for loader in LOADERS:
            d = work / loader.replace(" ", "_")
            d.mkdir()
            first = build(d, kernel, busybox, loader, kt)
            times = [run_once(kernel, first, d / f"console-{i}.log") for i in range(args.runs)]
            medians[loader] = statistics.median(times)
            print(f"{loader:16s} kexec -e -> second /init: median {medians[loader]:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
        for m in ("-s", "-c"):
            print(f"ratio nodeagent {m} / kexec-tools {m}: {medians['nodeagent ' + m] / medians['kexec-tools ' + m]:.2f}")


if __name__ == "__main__":
    main()
