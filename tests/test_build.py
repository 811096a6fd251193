"""The build side: the size accounting (check-size, csrc/staticbuild/sizes.py) on real artefacts: a GNU ld map from linking a real program, Nuitka's
report format, the pyproject budget."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def build():
    from staticbuild import sizes

    return sizes


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """A static program linked with a map: two objects of ours, one with a big table, plus libc and zlib."""
    d = tmp_path_factory.mktemp("link")
    (d / "big.c").write_text("const unsigned char big_table[200000] = {1};\nint use_big(int i) { return big_table[i]; }\n")
    (d / "main.c").write_text('#include <zlib.h>\nint use_big(int);\n'
                              'int main(int c, char **v) { return use_big(c) + (zlibVersion()[0] == 0); }\n')
    for name in ("big", "main"):
        subprocess.run(["gcc", "-Os", "-c", "-o", d / f"{name}.o", d / f"{name}.c"], check=True, capture_output=True)
    subprocess.run(["gcc", "-static", "-o", d / "prog", d / "main.o", d / "big.o", "-lz",
                    f"-Wl,-Map={d / 'prog.map'}"], check=True, capture_output=True)
    return d


def test_link_map_sizes(build, linked):
    sizes = build.parse_link_map((linked / "prog.map").read_text())
    by_name = {build.contributor_label(path): size for path, size in sizes.items()}
    big = next(size for (group, item), size in by_name.items() if item.endswith("big.o"))
    assert 200000 <= big < 201000  # the table, in .rodata, and the little function
    assert any(group == "libz.a" for group, _ in by_name)
    assert any(group == "libc.a" for group, _ in by_name)
    size_out = subprocess.run(["size", "-A", linked / "prog"], capture_output=True, text=True, check=True).stdout
    alloc = sum(int(line.split()[1]) for line in size_out.splitlines()[2:]
                if line.split() and line.split()[0].startswith(".") and not line.split()[0].startswith((".bss", ".tbss", ".comment")))
    total = sum(sizes.values())
    assert 0.9 * alloc <= total <= alloc  # everything but linker-made sections (.got, .eh_frame_hdr, ...)


def test_link_map_refuses_other_text(build):
    with pytest.raises(ValueError, match="not a GNU ld map"):
        build.parse_link_map("hello\n")


def test_size_table_groups_and_ranks(build):
    sizes = {"/x/libpython3.11.a(ceval.o)": 300_000, "/x/libpython3.11.a(_decimal.o)": 100_000,
             "/x/libc.a(malloc.o)": 20_000, "/b/module.agent.cli.o": 50_000}
    lines = build.size_table(sizes, top=3)
    text = "\n".join(lines)
    assert "libpython3.11.a" in text and "compiled Python (Nuitka)" in text
    ranked = lines[lines.index(next(line for line in lines if line.startswith("biggest"))) + 1:]
    labels = [line.rsplit(None, 2)[0].strip() for line in ranked]
    assert labels == ["libpython3.11.a: ceval.o", "libpython3.11.a: _decimal.o", "compiled Python (Nuitka): agent.cli"]


def test_excluded_modules_found(build):
    report = ('<nuitka-compilation-report><module name="agent.cli" kind="CompiledPythonModule"/>'
              '<module name="email.parser" kind="CompiledPythonModule"/><module name="xmlrpc" kind="x"/>'
              '<module name="emailx" kind="x"/></nuitka-compilation-report>')
    assert build.excluded_modules_found(report, ["email", "xml", "xmlrpc"]) == ["email.parser", "xmlrpc"]


def test_budget_is_in_pyproject(build):
    budget = build.size_budget()
    assert budget["binary"] > 0 and budget["initramfs"] > 0
    assert "unittest" in budget["excluded-modules"]


def test_check_size_without_a_kernel_says_so_in_one_line(tmp_path):
    """No cached kernel and no apt-get to fetch one: one line, exit status 1, no traceback."""
    binary = tmp_path / "nodeagent"
    binary.write_bytes(b"\x7fELF" + bytes(100))
    env = {"PATH": str(tmp_path), "NODEAGENT_CACHE": str(tmp_path / "cache")}  # no apt-get on this PATH
    proc = subprocess.run([sys.executable, ROOT / "build.py", "check-size", "--binary", binary], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("check-size: the node initramfs: cannot fetch Debian's kernel: no apt-get")


@pytest.fixture(scope="module")
def build_py():
    """build.py itself, loaded as pip's backend loader would (from the checkout's top)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nodeagent_build_py", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_build_py_with_options_is_the_static_build_and_initramfs(build_py):
    args = build_py.parse_args(["-v", "-j", "1"])
    assert (args.command, args.verbose, args.jobs) == ("all", True, 1)  # static, then initramfs
    assert build_py.parse_args([]).command == "all"
    assert build_py.parse_args(["static", "-v"]).func is build_py.cmd_static
    assert build_py.parse_args(["check-size", "--top", "3"]).top == 3


def test_purgatory_verbose_shows_its_commands():
    proc = subprocess.run([sys.executable, ROOT / "build.py", "purgatory", "-f", "-v"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "gcc -c" in proc.stdout and "objcopy -O binary" in proc.stdout
    quiet = subprocess.run([sys.executable, ROOT / "build.py", "purgatory", "-f"], capture_output=True, text=True,
                           cwd=ROOT)
    assert quiet.returncode == 0 and "gcc" not in quiet.stdout and "purgatory.bin" in quiet.stdout


def test_wheel_builds_without_the_static_build_and_carries_none_of_it(tmp_path):
    """pip's backend must import nothing of csrc/staticbuild: a copy of the checkout whose staticbuild package
    fails on import still builds a wheel, and the wheel holds the agent package only."""
    import shutil
    import zipfile

    tree = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "generated", "purgatory.bin")
    for name in ("agent", "csrc"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("build.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copyfile(ROOT / name, tree / name)
    (tree / "csrc" / "staticbuild" / "__init__.py").write_text("raise RuntimeError('the static build was imported')\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "wheel", tree],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheel, = (tmp_path / "wheel").glob("nodeagent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent/cli.py" in names and any(n.startswith("agent/_linux") for n in names)
    assert "agent/kexec/purgatory.bin" in names
    assert [n for n in names if not n.startswith(("agent/", "nodeagent-"))] == []
    assert not any("initramfs" in n or "staticbuild" in n or "cpio" in n for n in names)


THREAD_EXIT_C = r"""
#include <pthread.h>
#include <stdio.h>
static int cleaned;
static void cleanup(void *arg) { (void)arg; cleaned++; }
__attribute__((noinline)) static void deep(int n) {
    if (n == 0)
        pthread_exit((void *)42);  /* CPython's PyThread_exit_thread, from a thread woken during finalization */
    deep(n - 1);
    __asm__ volatile("");  /* not a tail call: every level stays on the stack */
}
static void *run(void *arg) {
    pthread_cleanup_push(cleanup, arg);
    deep(8);
    pthread_cleanup_pop(0);
    return 0;
}
int main(void) {
    for (int i = 0; i < 200; i++) {
        pthread_t t;
        void *result = 0;
        if (pthread_create(&t, 0, run, 0) || pthread_join(t, &result) || result != (void *)42)
            return 1;
    }
    printf("exited %d\n", cleaned);
    return 0;
}
"""


def test_pthread_exit_through_code_without_unwind_tables(tmp_path):
    """The binary's C (CPython, Nuitka's output) has no unwind tables (pins.NO_UNWIND_CFLAGS). pthread_exit is a
    forced unwind under uClibc-ng: through frames without tables it must still end the thread, run its cleanup
    handlers and hand pthread_join the value, with the static build's own sysroot and flags."""
    from staticbuild import pins
    from staticbuild.stagecache import static_cache_root
    from staticbuild.sysroot import _sysroot_key

    cc = static_cache_root() / f"sysroot-{_sysroot_key()}" / "bin" / "uclibc-gcc"
    if not cc.exists():
        pytest.skip("no static build sysroot in the cache (python build.py static makes it)")
    (tmp_path / "t.c").write_text(THREAD_EXIT_C)
    obj, exe = tmp_path / "t.o", tmp_path / "t"
    subprocess.run([cc, *pins.PYTHON_CFLAGS.split(), "-c", "-o", obj, tmp_path / "t.c"], check=True,
                   capture_output=True)
    sections = subprocess.run(["readelf", "-SW", obj], capture_output=True, text=True, check=True).stdout
    assert ".eh_frame" not in sections  # the thread's own frames have no unwind tables
    subprocess.run([cc, "-o", exe, obj], check=True, capture_output=True)
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "exited 200\n"), proc.stderr


def test_initramfs_command_with_a_module_tree(tmp_path):
    """`python build.py initramfs --kernel DIR --modules ...`: /init is the binary itself, the modules of
    pyproject plus the added ones with their dependencies (ext4's crc32c through its softdep), newc + xz with
    CRC32, the same bytes twice."""
    import lzma

    from staticbuild.debian_kernel import cache_dir

    trees = sorted(cache_dir().glob("linux-image-*/lib/modules/*/modules.dep"))
    if not trees:
        pytest.skip("no Debian kernel in the cache (the VM tests or check-size fetch one)")
    pkgdir = trees[-1].parents[3]
    binary = tmp_path / "nodeagent"
    binary.write_bytes(b"\x7fELF" + os.urandom(4096))
    outs = []
    for name in ("a.cpio.xz", "b.cpio.xz"):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, ROOT / "build.py", "initramfs", "--kernel", pkgdir, "--modules",
                               "e1000e", "--binary", binary, "-o", out], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert f"{out}: {out.stat().st_size:,} bytes" in proc.stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0][:6] == b"\xfd7zXZ\x00" and outs[0][7] == 0x01  # xz, check type CRC32 (stream flags)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=lzma.decompress(outs[0]), capture_output=True,
                             check=True).stdout.decode().split()
    assert "init" in listing and "bin/nodeagent" in listing
    assert any(p.endswith("/e1000e.ko") for p in listing) and any(p.endswith("/crc32c_generic.ko") for p in listing)
    assert any(p.endswith("/modules.dep") for p in listing) and any(p.endswith("/modules.softdep") for p in listing)
    work = tmp_path / "x"
    work.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=lzma.decompress(outs[0]), cwd=work, check=True)
    assert (work / "init").read_bytes() == binary.read_bytes() and os.readlink(work / "bin" / "nodeagent") == "../init"
    dep = next(work.glob("lib/modules/*/modules.dep")).read_text().splitlines()
    loaded = [line.split(":")[0].rsplit("/", 1)[1] for line in dep]
    assert loaded.index("crc32c_generic.ko") < loaded.index("ext4.ko")  # load order: softdep pre first


def test_initramfs_command_refuses_in_one_line(tmp_path):
    binary = tmp_path / "nodeagent"
    binary.write_bytes(b"\x7fELF")
    for args, words in ((["--kernel", tmp_path / "nosuch" / "dir"], "no such folder"),
                        (["--kernel", tmp_path], "neither a module tree"),
                        (["--kernel", "6.1 bad"], "is not a kernel release"),
                        (["--modules", "e1000e,../x"], "is not a module name")):
        proc = subprocess.run([sys.executable, ROOT / "build.py", "initramfs", "--binary", binary,
                               "-o", tmp_path / "o.xz", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
        assert not (tmp_path / "o.xz").exists()
