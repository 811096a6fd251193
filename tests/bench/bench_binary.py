"""Benchmark: the static single-file binary (`python build.py static` -> dist/nodeagent) against the Python package.

    sudo .venv/bin/python tests/bench/bench_binary.py [--binary dist/nodeagent] [--runs 5] [--startup-runs 20]
                                                      [--dir /dev/shm/nodeagent-bench-bin] [--keep]

Both sides get the same inputs, and their runs alternate (binary first on even runs, package first on odd ones) to
spread the machine's noise over both. The package is `.venv/bin/python -m agent` (--python to choose another
interpreter). Measured, medians:
1. start-up: wall time of `X --version` and of `X info agent/demo/demo.ndz` (--startup-runs runs; goal for the
   binary: at most 50 ms);
2. imaging: `X image -q IMAGE OUT`, MiB/s of disk data written (the image's data bytes; goal: binary/package >= 1);
3. saving: `X save -q DISK OUT.ndz`, MiB/s of allocated data (the same figure; goal: binary/package >= 1);
4. peak RSS of every command (below), and CPU time of image and save.

The disk: a 1 GiB ext4 file in tmpfs holding about 600 MiB of files (a third text-like, a third random, a third half
zeros; mkfs.ext4 -d stores the zero blocks as holes, so ~550 MiB are allocated), made once by a child process (kept
with --keep and reused by the next run); IMAGE is that disk saved by the package. Correctness on the way: the two
sides' `image` outputs must be byte-identical (sha256), and so must the disks restored from the two sides' `save`
outputs; the script stops with exit status 1 otherwise. A --binary that does not exist: one line on stderr, exit
status 2.

Wall and CPU time come from os.wait4 of each child (started with subprocess.Popen). Peak RSS does not: on Linux a
child's ru_maxrss includes the peak RSS of the process it was forked from (exec keeps the maximum of the old memory
map, and vfork shares the parent's), here ~20 MiB of benchmark, more than `--version` needs. So the image, save and
(3 extra runs of the) start-up commands run under GNU /usr/bin/time, whose own wait4 of its child, forked from a
~2 MiB process, is exact; without it, the script falls back to ru_maxrss from os.wait4 and says so. Either way this
script never holds big data itself (the disk is made by a child, files are hashed in 1 MiB pieces).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "agent" / "demo" / "demo.ndz"
MiB = 1 << 20
DISK_BYTES = 1 << 30
FILE_BYTES = 600 * MiB
STARTUP_GOAL_MS = 50.0
RATIO_TOLERANCE = 0.97  # a throughput ratio at or above this counts as "not slower" (run-to-run noise is ~3%)


# ---------------------------------------------------------------------------------------------------------------
# The disk (made in a child process: see the docstring on peak RSS)


def make_disk(path: Path) -> None:
    """bench_ndz's disk and files, smaller; written as PATH.part and renamed, so a kept disk is always whole."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_ndz

    part = path.with_name(path.name + ".part")
    bench_ndz.make_disk(part, path.parent, disk_bytes=DISK_BYTES, file_bytes=FILE_BYTES)
    part.rename(path)


# ---------------------------------------------------------------------------------------------------------------
# Running the commands


class Failed(Exception):
    pass


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


class Runner:
    """Runs one command: wall time (Popen to reaped) and CPU time from os.wait4 of the child; with rss=True, the
    command's own peak RSS too, through GNU time (see the docstring: the child's ru_maxrss includes this process's
    peak, /usr/bin/time's wait4 of its own child does not). Keeps stdout on request."""

    TIME = "/usr/bin/time"

    def __init__(self, work: Path):
        self.work = work
        self.err = work / "stderr.txt"
        self.out = work / "stdout.txt"
        self.rss_file = work / "rss.txt"
        self.have_time = os.access(self.TIME, os.X_OK)
        signal.signal(signal.SIGALRM, _alarm)

    def run(self, cmd: list[str], timeout: int = 900, keep_stdout: bool = False, rss: bool = False):
        """(wall s, CPU s, peak RSS MiB or None, stdout or None)"""
        argv = cmd
        if rss and self.have_time:
            argv = [self.TIME, "-f", "%M", "-o", str(self.rss_file), *cmd]
        with open(self.err, "wb") as err, open(self.out if keep_stdout else os.devnull, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.work)
            signal.alarm(timeout)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except _Timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise Failed(f"{' '.join(cmd)}: no exit after {timeout} s, killed") from None
            finally:
                signal.alarm(0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        if proc.returncode:
            message = self.err.read_text(errors="replace").strip()
            raise Failed(f"{' '.join(cmd)}: exit status {proc.returncode}: {message}")
        peak = None
        if rss:  # wait4's rusage of /usr/bin/time covers its reaped child too (CPU); the RSS is its child's own
            peak = int(self.rss_file.read_text().split()[-1]) / 1024 if self.have_time else usage.ru_maxrss / 1024
        stdout = self.out.read_text(errors="replace") if keep_stdout else None
        return wall, usage.ru_utime + usage.ru_stime, peak, stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def elf_kind(path: Path) -> str:
    """'static ELF', 'dynamic ELF' (it has a PT_INTERP) or 'not ELF' (a script, say)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only: what build.py makes
            return "not ELF" if ident[:4] != b"\x7fELF" else "32-bit ELF"
        e_phoff, = struct.unpack_from("<Q", ident, 32)
        e_phentsize, e_phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    for i in range(e_phnum):
        if struct.unpack_from("<I", table, i * e_phentsize)[0] == 3:  # PT_INTERP
            return "dynamic ELF"
    return "static ELF"


def data_bytes(info_text: str) -> int:
    m = re.search(r"^total: (\d+) data bytes", info_text, re.M)
    if not m:
        raise Failed(f"cannot read the data bytes from `info`: {info_text[-300:]!r}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------------------------


def median(values) -> float:
    return statistics.median(values)


def alternate(i: int, binary, package):
    """The two sides of run i, binary first on even runs, package first on odd ones."""
    return [("bin", binary), ("pkg", package)] if i % 2 == 0 else [("pkg", package), ("bin", binary)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, default=REPO / "dist" / "nodeagent", help="default: dist/nodeagent")
    parser.add_argument("--python", type=Path, default=None,
                        help="the package's interpreter (default: .venv/bin/python of the repository, else this one)")
    parser.add_argument("--runs", type=int, default=5, help="runs of image and save per side (default 5)")
    parser.add_argument("--startup-runs", type=int, default=20, help="runs of --version and info per side (default 20)")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/nodeagent-bench-bin"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its disk (reused by the next run)")
    parser.add_argument("--make-disk", type=Path, help=argparse.SUPPRESS)  # internal: the child that makes the disk
    args = parser.parse_args()
    if args.make_disk:
        make_disk(args.make_disk)
        return 0

    binary = args.binary.resolve()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        print(f"bench_binary: no executable binary at {args.binary} (build it with `python build.py static`)",
              file=sys.stderr)
        return 2
    python = args.python or (REPO / ".venv" / "bin" / "python")
    if not python.exists():
        python = Path(sys.executable)
    bin_cmd = [str(binary)]
    pkg_cmd = [str(python), "-m", "agent"]
    if args.runs < 1 or args.startup_runs < 1:
        parser.error("--runs and --startup-runs must be at least 1")

    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work)
    began = time.perf_counter()
    try:
        return bench(args, work, runner, binary, bin_cmd, pkg_cmd, began)
    except Failed as e:
        print(f"\nbench_binary: FAILED: {e}", file=sys.stderr)
        return 1
    finally:  # only what this script makes: --dir may name a directory that holds other things
        for name in ("ref.ndz", "out-bin.ndz", "out-pkg.ndz", "out-bin.img", "out-pkg.img", "check.img",
                     "out-bin.ndz.part", "out-pkg.ndz.part", "ref.ndz.part", "stdout.txt", "stderr.txt", "rss.txt",
                     "disk.img.part"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(work / "files", ignore_errors=True)
        if not args.keep:
            (work / "disk.img").unlink(missing_ok=True)
            try:
                work.rmdir()
            except OSError:
                pass


def bench(args, work: Path, runner: Runner, binary: Path, bin_cmd, pkg_cmd, began: float) -> int:
    sides = {"bin": bin_cmd, "pkg": pkg_cmd}
    kind = elf_kind(binary)
    print(f"binary:  {binary} ({kind}, {binary.stat().st_size / MiB:.1f} MiB)")
    print(f"package: {' '.join(pkg_cmd)}")
    if kind != "static ELF":
        print(f"  note: the binary is not a static ELF ({kind}): this is not the build.py static result")

    # Same answers to the small commands, before anything is timed.
    outputs = {}
    for side, cmd in sides.items():
        outputs[side] = (runner.run(cmd + ["--version"], 60, keep_stdout=True)[3],
                         runner.run(cmd + ["info", str(DEMO)], 60, keep_stdout=True)[3])
    if outputs["bin"][0] != outputs["pkg"][0]:
        print(f"  warning: --version differs: binary {outputs['bin'][0].strip()!r}, "
              f"package {outputs['pkg'][0].strip()!r}")
    if outputs["bin"][1] != outputs["pkg"][1]:
        raise Failed(f"`info {DEMO.name}` differs:\n--- binary\n{outputs['bin'][1]}--- package\n{outputs['pkg'][1]}")

    # 1. Start-up: timed without /usr/bin/time in between; the peak RSS from 3 more runs each through it.
    startup = {(what, side): [] for what in ("version", "info") for side in sides}
    startup_rss = {(what, side): 0.0 for what in ("version", "info") for side in sides}
    for i in range(args.startup_runs + 3):
        for what, extra in (("version", ["--version"]), ("info", ["info", str(DEMO)])):
            for side, cmd in alternate(i, bin_cmd, pkg_cmd):
                if i < args.startup_runs:
                    startup[what, side].append(runner.run(cmd + extra, 60)[0])
                else:
                    rss = runner.run(cmd + extra, 60, rss=True)[2]
                    startup_rss[what, side] = max(startup_rss[what, side], rss)

    # The disk and the image both sides restore.
    disk, ref = work / "disk.img", work / "ref.ndz"
    if not disk.exists():
        print("making the benchmark disk (1 GiB ext4, ~600 MiB of files) ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-disk", str(disk)], check=True)
        print(f"  made in {time.perf_counter() - t:.1f} s")
    runner.run(pkg_cmd + ["save", "-q", str(disk), str(ref)])
    ref_info = runner.run(pkg_cmd + ["info", str(ref)], keep_stdout=True)[3]
    data = data_bytes(ref_info)
    data_mib = data / MiB
    print(f"disk: {disk.stat().st_size / MiB:.0f} MiB ext4, {data_mib:.1f} MiB allocated (= the image's data); "
          f"image {ref.stat().st_size / MiB:.1f} MiB; {os.cpu_count()} cores; "
          f"{args.runs} runs, start-up {args.startup_runs} runs", flush=True)

    # 2. Imaging. The first run of each side, into a fresh file, is the correctness check; the timed runs then
    # write into an existing target, as onto a disk (a fresh tmpfs file would time page allocation too).
    outs = {"bin": work / "out-bin.img", "pkg": work / "out-pkg.img"}
    for side, cmd in sides.items():
        outs[side].unlink(missing_ok=True)
        runner.run(cmd + ["image", "-q", str(ref), str(outs[side])])
    digests = {side: sha256(path) for side, path in outs.items()}
    if digests["bin"] != digests["pkg"]:
        raise Failed(f"`image` outputs differ: binary {digests['bin']}, package {digests['pkg']} "
                     f"(sizes {outs['bin'].stat().st_size} and {outs['pkg'].stat().st_size} bytes)")
    restored_digest = digests["pkg"]
    print(f"check: `image` outputs identical (sha256 {restored_digest[:16]}...)", flush=True)
    image_t, image_c, image_r = ({side: [] for side in sides} for _ in range(3))
    for i in range(args.runs):
        for side, cmd in alternate(i, bin_cmd, pkg_cmd):
            wall, cpu, rss, _ = runner.run(cmd + ["image", "-q", str(ref), str(outs[side])], rss=True)
            image_t[side].append(wall)
            image_c[side].append(cpu)
            image_r[side].append(rss)
    for side, path in outs.items():
        if sha256(path) != restored_digest:
            who = "binary" if side == "bin" else "package"
            raise Failed(f"`image` output of the {who} changed over the timed runs")
        path.unlink()

    # 3. Saving.
    saved = {"bin": work / "out-bin.ndz", "pkg": work / "out-pkg.ndz"}
    save_t, save_c, save_r = ({side: [] for side in sides} for _ in range(3))
    for i in range(args.runs):
        for side, cmd in alternate(i, bin_cmd, pkg_cmd):
            wall, cpu, rss, _ = runner.run(cmd + ["save", "-q", str(disk), str(saved[side])], rss=True)
            save_t[side].append(wall)
            save_c[side].append(cpu)
            save_r[side].append(rss)
    if sha256(saved["bin"]) == sha256(saved["pkg"]):
        print("check: `save` outputs identical", flush=True)
    else:  # another zlib may compress differently: what matters is the disk they restore
        check = work / "check.img"
        for side in sides:
            check.unlink(missing_ok=True)
            runner.run(pkg_cmd + ["image", "-q", str(saved[side]), str(check)])
            if sha256(check) != restored_digest:
                raise Failed(f"the image saved by the {'binary' if side == 'bin' else 'package'} restores another disk")
        check.unlink()
        print(f"check: `save` outputs differ in bytes ({saved['bin'].stat().st_size} and "
              f"{saved['pkg'].stat().st_size} bytes) but restore identical disks", flush=True)
    for path in saved.values():
        path.unlink()

    # 4. The zstd extension (--zstd): save, then image what the package saved; restores checked identical.
    zref = work / "ref-zstd.ndz"
    runner.run(pkg_cmd + ["save", "-q", "--zstd", str(disk), str(zref)])
    zsave_t, zimage_t = ({side: [] for side in sides} for _ in range(2))
    for i in range(args.runs):
        for side, cmd in alternate(i, bin_cmd, pkg_cmd):
            zsave_t[side].append(runner.run(cmd + ["save", "-q", "--zstd", str(disk), str(saved[side])])[0])
            zimage_t[side].append(runner.run(cmd + ["image", "-q", str(zref), str(outs[side])])[0])
    for side in sides:
        if sha256(outs[side]) != restored_digest:
            raise Failed(f"the zstd image restored by the {'binary' if side == 'bin' else 'package'} differs")
        outs[side].unlink()
        saved[side].unlink()
    zref.unlink()
    print("check: zstd restores identical", flush=True)

    floor = runner.run(["/bin/true"], 60, rss=True)[2]  # what the method reports for a program of ~nothing

    # The table.
    def ms(side, what):
        return median(startup[what, side]) * 1000

    def rate(times, side):
        return data_mib / median(times[side])

    def verdict_ms(value):
        return "ok" if value <= STARTUP_GOAL_MS else "MISSED"

    def verdict_ratio(ratio):
        return "ok" if ratio >= RATIO_TOLERANCE else "SLOWER"

    def peak(rss, side):
        return max(rss[side])

    rows = [  # what, package, binary, format, ratio, goal, verdict
        ("`--version`, wall ms", ms("pkg", "version"), ms("bin", "version"), "{:.1f}", None,
         f"binary <= {STARTUP_GOAL_MS:.0f} ms", verdict_ms(ms("bin", "version"))),
        (f"`info {DEMO.name}`, wall ms", ms("pkg", "info"), ms("bin", "info"), "{:.1f}", None,
         f"binary <= {STARTUP_GOAL_MS:.0f} ms", verdict_ms(ms("bin", "info"))),
        ("`image`, MiB/s", rate(image_t, "pkg"), rate(image_t, "bin"), "{:.1f}", "rate", "ratio >= 1", None),
        ("  `image`, median wall s", median(image_t["pkg"]), median(image_t["bin"]), "{:.3f}", None, "", ""),
        ("  `image`, median CPU s", median(image_c["pkg"]), median(image_c["bin"]),
         "{:.3f}", None, "", ""),
        ("`save`, MiB/s", rate(save_t, "pkg"), rate(save_t, "bin"), "{:.1f}", "rate", "ratio >= 1", None),
        ("  `save`, median wall s", median(save_t["pkg"]), median(save_t["bin"]), "{:.3f}", None, "", ""),
        ("  `save`, median CPU s", median(save_c["pkg"]), median(save_c["bin"]),
         "{:.3f}", None, "", ""),
        ("`save --zstd`, MiB/s", rate(zsave_t, "pkg"), rate(zsave_t, "bin"), "{:.1f}", "rate", "ratio >= 1", None),
        ("`image` of a zstd image, MiB/s", rate(zimage_t, "pkg"), rate(zimage_t, "bin"), "{:.1f}", "rate",
         "ratio >= 1", None),
        ("peak RSS `image`, MiB", peak(image_r, "pkg"), peak(image_r, "bin"), "{:.1f}", None, "", ""),
        ("peak RSS `save`, MiB", peak(save_r, "pkg"), peak(save_r, "bin"), "{:.1f}", None, "", ""),
        ("peak RSS `--version`, MiB", startup_rss["version", "pkg"], startup_rss["version", "bin"], "{:.1f}",
         None, "", ""),
        (f"peak RSS `info {DEMO.name}`, MiB", startup_rss["info", "pkg"], startup_rss["info", "bin"], "{:.1f}",
         None, "", ""),
    ]
    print(f"\n{'what':34} {'package':>9} {'binary':>9} {'bin/pkg':>8}  goal")
    for what, pkg, bin_, fmt, kind_, goal, verdict in rows:
        ratio = bin_ / pkg if pkg else float("nan")
        if kind_ == "rate":
            verdict = verdict_ratio(ratio)
        tail = f"  {goal}: {verdict}" if goal else ""
        print(f"{what:34} {fmt.format(pkg):>9} {fmt.format(bin_):>9} {ratio:8.2f}{tail}")
    print(f"\n(rates: {data_mib:.1f} MiB of disk data over the median wall time; 'not slower' means "
          f"bin/pkg >= {RATIO_TOLERANCE}. Peak RSS: the max over the runs, ", end="")
    if runner.have_time:
        print(f"each the command's own, from {Runner.TIME}; /bin/true measures {floor:.1f} MiB that way)")
    else:
        print(f"from os.wait4, which includes this script's own peak: /bin/true measures {floor:.1f} MiB, "
              f"a figure at that floor means 'at most' it; install GNU time for exact figures)")

    v_pkg, v_bin = ms("pkg", "version"), ms("bin", "version")
    i_pkg, i_bin = ms("pkg", "info"), ms("bin", "info")
    im_pkg, im_bin = rate(image_t, "pkg"), rate(image_t, "bin")
    sv_pkg, sv_bin = rate(save_t, "pkg"), rate(save_t, "bin")
    print("\n--- README rows (markdown) ---")
    shown = binary.relative_to(REPO) if binary.is_relative_to(REPO) else binary
    print(f"**Static binary**: `sudo .venv/bin/python tests/bench/bench_binary.py` runs `{shown}` "
          f"({kind}, {binary.stat().st_size / MiB:.1f} MiB) and `python -m agent` alternately on the same inputs "
          f"(start-up: medians of {args.startup_runs}; a 1 GiB ext4 in tmpfs with {data_mib:.0f} MiB allocated: "
          f"medians of {args.runs}; `image` outputs, and the disks the `save` outputs restore, checked identical).")
    print()
    print("| what | package | binary | binary / package | goal |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `--version` | {v_pkg:.1f} ms | {v_bin:.1f} ms | {v_bin / v_pkg:.2f} | <= {STARTUP_GOAL_MS:.0f} ms |")
    print(f"| `info demo.ndz` | {i_pkg:.1f} ms | {i_bin:.1f} ms | {i_bin / i_pkg:.2f} | <= {STARTUP_GOAL_MS:.0f} ms |")
    print(f"| `image` | {im_pkg:.1f} MiB/s | {im_bin:.1f} MiB/s | {im_bin / im_pkg:.2f} | >= 1 |")
    print(f"| `save` (zlib level 4) | {sv_pkg:.1f} MiB/s | {sv_bin:.1f} MiB/s | {sv_bin / sv_pkg:.2f} | >= 1 |")
    zs_pkg, zs_bin = rate(zsave_t, "pkg"), rate(zsave_t, "bin")
    zi_pkg, zi_bin = rate(zimage_t, "pkg"), rate(zimage_t, "bin")
    print(f"| `save --zstd` | {zs_pkg:.1f} MiB/s | {zs_bin:.1f} MiB/s | {zs_bin / zs_pkg:.2f} | >= 1 |")
    print(f"| `image` (zstd image) | {zi_pkg:.1f} MiB/s | {zi_bin:.1f} MiB/s | {zi_bin / zi_pkg:.2f} | >= 1 |")
    print(f"| peak RSS `image` / `save` | {peak(image_r, 'pkg'):.1f} / {peak(save_r, 'pkg'):.1f} MiB "
          f"| {peak(image_r, 'bin'):.1f} / {peak(save_r, 'bin'):.1f} MiB "
          f"| {peak(image_r, 'bin') / peak(image_r, 'pkg'):.2f} / {peak(save_r, 'bin') / peak(save_r, 'pkg'):.2f} "
          f"| < 48 MiB |")
    print("--- end ---")
    kept = f"; work dir kept: {work}" if args.keep else ""
    print(f"\n(benchmark took {time.perf_counter() - began:.0f} s{kept})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
