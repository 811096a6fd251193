"""A Python runtime for a test initramfs, for the one VM test that patches the kexec loader from Python (a tampered
digest; the static binary, which every other VM test runs, rightly has no way to do that): this machine's
(dynamically linked) Python, the shared libraries `ldd` names (loader included), only the stdlib modules the agent imports, cffi +
_cffi_backend + zstandard, all precompiled to unchecked-hash .pyc files (the cpio's mtimes are 0, so
timestamp-checked .pyc files would be recompiled at every start under TCG).

    tree = python_runtime()            # cached in ${NODEAGENT_CACHE:-~/.cache/nodeagent}/python-runtime/KEY/
    spec.tree(tree)                    # usr/bin/python3, usr/lib/python3.11/..., lib/x86_64-linux-gnu/..., lib64/
    add_agent(spec, tmp_path)          # the working tree's agent package (with its built _linux*.so), precompiled

In the guest: `PYTHONHOME=/usr python3 -m agent ...` (site-packages is /usr/lib/python3.11/site-packages).
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import staticbuild

ROOT = Path(__file__).resolve().parents[2]
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "ensurepip", "lib2to3", "__pycache__", "turtledemo"}
# Imported lazily (errors, tracebacks, the guest's site.py) and so not seen by the probe below.
EXTRA_MODULES = ["site", "_sitebuiltins", "traceback", "linecache", "tokenize", "token", "gettext", "locale",
                 "encodings", "runpy", "pkgutil", "importlib.machinery", "importlib.util", "shutil", "tempfile"]
SITE_PACKAGES = ["cffi", "_cffi_backend", "zstandard"]
# What the probe runs: the kexec command's whole path short of the syscalls, plus the modules it imports lazily.
PROBE = """
import atexit, json, runpy, sys
sys.path.append({site!r})
out = {out!r}
def dump():
    files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    with open(out, "w") as f:
        json.dump(sorted({{f for f in files if f}}), f)
atexit.register(dump)
import agent.cli, agent.linux, agent.kexec.load, agent.kexec.bootcfg, cffi, _cffi_backend, zstandard
for name in {extra!r}:
    __import__(name)
sys.argv = ["agent", "kexec", "-l", "/etc/hostname"]
runpy.run_module("agent", run_name="__main__")
"""


def cache_root() -> Path:
    return staticbuild.cache_root() / "python-runtime"


def _ldd(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def _probe_modules() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "modules.json")
        code = PROBE.format(site=str(SITE), out=out, extra=EXTRA_MODULES)
        subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
        with open(out) as f:
            return json.load(f)


def _key(files: list[str]) -> str:
    h = hashlib.sha256(sys.version.encode())
    for f in sorted(files):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _copy_stdlib_item(path: Path, dest_lib: Path) -> None:
    """Copy the stdlib module file `path` (a package's __init__ pulls in its whole package folder)."""
    rel = path.relative_to(STDLIB)
    if path.name == "__init__.py" or (len(rel.parts) > 1 and rel.parts[0] != "lib-dynload"):
        top = STDLIB / rel.parts[0]
        dst = dest_lib / rel.parts[0]
        if not dst.exists():
            shutil.copytree(top, dst, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
        return
    dst = dest_lib / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dst)


def python_runtime() -> Path:
    """The cached runtime tree (built on first use)."""
    exe = os.path.realpath(sys.executable)
    modules = [m for m in _probe_modules() if not m.startswith(str(ROOT))]
    # The agent's own extension is added per test (add_agent), but the libraries it links must be here: how it was
    # built (pip in a venv, build.py) decides which (e.g. libpthread).
    extensions = [*(m for m in modules if m.endswith(".so")), *map(str, (ROOT / "agent").glob("_linux*.so"))]
    for name in SITE_PACKAGES:  # the copied packages' extensions: a wheel's _cffi_backend may link libpthread
        for src in SITE.glob(f"{name}*"):
            extensions += map(str, src.rglob("*.so") if src.is_dir() else [src] if src.suffix == ".so" else [])
    libs = sorted({*_ldd(exe), *(lib for m in extensions for lib in _ldd(m))})
    key = _key([exe, *libs, *modules])
    tree = cache_root() / key
    if tree.is_dir():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=tree.parent))
    try:
        (tmp / "usr/bin").mkdir(parents=True)
        shutil.copy2(exe, tmp / "usr/bin" / PYVER)
        os.symlink(PYVER, tmp / "usr/bin/python3")
        for lib in libs:
            dst = tmp / ("lib64" if lib.startswith("/lib64/") else "lib/x86_64-linux-gnu") / os.path.basename(lib)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(lib, dst)
            os.chmod(dst, 0o755)
            if "ld-linux" not in dst.name:
                subprocess.run(["strip", "--strip-unneeded", str(dst)], capture_output=True)
        dest_lib = tmp / "usr/lib" / PYVER
        (dest_lib / "lib-dynload").mkdir(parents=True)
        dest_site = dest_lib / "site-packages"
        dest_site.mkdir()
        for m in modules:
            p = Path(m)
            if p.is_relative_to(SITE):
                continue
            if p.is_relative_to(STDLIB):
                _copy_stdlib_item(p, dest_lib)
        for name in SITE_PACKAGES:
            for src in SITE.glob(f"{name}*"):
                if src.is_dir() and not src.name.endswith("-info"):
                    shutil.copytree(src, dest_site / src.name, ignore=lambda d, n: [x for x in n if x in SKIP_DIRS])
                elif src.is_file():
                    shutil.copy2(src, dest_site / src.name)
        for so in tmp.rglob("*.so"):
            subprocess.run(["strip", "--strip-unneeded", str(so)], capture_output=True)
        compile_tree(dest_lib)
        os.rename(tmp, tree)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tree


def compile_tree(path: Path) -> None:
    compileall.compile_dir(str(path), quiet=2, workers=0,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def add_agent(spec, tmp_path: Path) -> None:
    """The working tree's agent package (sources, the built _linux*.so, precompiled) into site-packages."""
    dst = tmp_path / "agent-pkg" / "agent"
    shutil.rmtree(dst.parent, ignore_errors=True)
    shutil.copytree(ROOT / "agent", dst, ignore=shutil.ignore_patterns("__pycache__", "demo"))
    compile_tree(dst)
    spec.tree(dst.parent, f"usr/lib/{PYVER}/site-packages")
