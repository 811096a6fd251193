"""Build a compressed initramfs from a spec: files, directories, symlinks, device nodes, an /init, and kernel
modules picked by name from a kernel's module tree together with everything they depend on.

    spec = InitramfsSpec()
    spec.file("init", data=b"#!/bin/busybox sh\\n...", mode=0o755)
    spec.file("bin/busybox", src="/bin/busybox", mode=0o755)
    spec.symlink("bin/sh", "busybox")
    spec.add_console_devices()                      # dev/console c 5 1, dev/null c 1 3
    loaded = spec.modules("/path/lib/modules/6.1.0-56-amd64", ["virtio_blk"])
    build_initramfs(spec, "initrd.xz", compression="xz")

`loaded` is the load order (archive paths, dependencies first) for insmod. The modules go to
lib/modules/<release>/<their path in the tree>, with a modules.dep for just those modules.

Output is reproducible: entries are written in sorted path order (a directory before its contents; missing
parent directories are made up with mode 0755), owners and times are 0, and the compressors write no names or
times. xz uses the CRC32 check (the kernel's xz decoder refuses the default CRC64).

Dependencies come from the tree's modules.dep (depmod's format: "path.ko: dep.ko dep.ko", all dependencies,
each listed before the ones it depends on). A Debian linux-image .deb ships none; write_modules_dep() makes one
from the "depends=" fields of each module's .modinfo section, without depmod.
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from . import BuildError
from .cpio import CpioWriter, _encode_name


class InitramfsError(BuildError):
    """The initramfs spec cannot be built (missing file, unknown module, conflicting entries)."""


# -- kernel modules ------------------------------------------------------------------------------------------


def modname(name: str) -> str:
    """The kernel's name for a module: file name without .ko(.xz/.zst/.gz), '-' as '_'."""
    base = os.path.basename(name)
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


def read_modinfo(path) -> dict[str, list[str]]:
    """The key=value strings of an uncompressed .ko's .modinfo section (a key may repeat, e.g. alias)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            raise InitramfsError(f"{path}: not an ELF file (compressed modules are not supported)")
        if ident[4] != 2:
            raise InitramfsError(f"{path}: not a 64-bit ELF file")
        end = "<" if ident[5] == 1 else ">"
        shoff, = struct.unpack_from(end + "Q", ident, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = []
        for i in range(shnum):
            name_off, _type, _flags, _addr, off, size = struct.unpack_from(end + "IIQQQQ", table, i * shentsize)
            sections.append((name_off, off, size))
        _, stroff, strsize = sections[shstrndx]
        f.seek(stroff)
        strtab = f.read(strsize)
        for name_off, off, size in sections:
            if strtab[name_off:strtab.index(b"\0", name_off)] == b".modinfo":
                f.seek(off)
                data = f.read(size)
                break
        else:
            return {}
    info: dict[str, list[str]] = {}
    for item in data.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq:
            info.setdefault(key.decode(), []).append(value.decode(errors="replace"))
    return info


def write_modules_dep(moddir) -> int:
    """Write moddir/modules.dep and moddir/modules.alias (depmod's formats) from the .modinfo of every .ko
    under moddir (the lib/modules/<release> folder). Returns the number of modules. Replaces the files
    atomically, so a concurrent reader sees the old or the new file."""
    root = Path(moddir)
    paths: dict[str, str] = {}  # module name -> path relative to moddir
    direct: dict[str, list[str]] = {}
    aliases: list[tuple[str, str]] = []
    softdeps: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.endswith(".ko"):
                continue
            full = Path(dirpath, fn)
            rel = full.relative_to(root).as_posix()
            name = modname(fn)
            paths.setdefault(name, rel)
            info = read_modinfo(full)
            deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
            direct[name] = [modname(d) for d in deps]
            aliases += [(a, name) for a in info.get("alias", [])]
            softdeps += [(name, s) for s in info.get("softdep", [])]
    lines = []
    for name in sorted(paths, key=paths.get):
        order = _load_order([name], lambda n: direct.get(n, []))[:-1]  # dependencies first, without name
        lines.append(f"{paths[name]}: " + " ".join(paths[d] for d in reversed(order) if d in paths))
    _atomic_write(root / "modules.dep", "".join(line.rstrip() + "\n" for line in lines))
    _atomic_write(root / "modules.alias", "# Aliases extracted from modules themselves.\n"
                  + "".join(f"alias {a} {n}\n" for a, n in aliases))
    _atomic_write(root / "modules.softdep", "# Soft dependencies extracted from modules themselves.\n"
                  + "".join(f"softdep {n} {s}\n" for n, s in sorted(softdeps)))
    return len(paths)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_order(names, deps_of) -> list[str]:
    """Depth-first post-order: every module after all of its dependencies, each once; deterministic."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise InitramfsError(f"modules: dependency loop {' -> '.join(stack + (name,))}")
        for dep in deps_of(name):
            visit(dep, stack + (name,))
        seen.add(name)
        done.append(name)

    for name in names:
        visit(name, ())
    return done


class ModuleTree:
    """lib/modules/<release> of one kernel: which modules it has, what each depends on, which are built in."""

    def __init__(self, moddir):
        self.root = Path(moddir)
        self.release = self.root.name
        dep_file = self.root / "modules.dep"
        if not dep_file.is_file():
            raise InitramfsError(f"{dep_file} is missing (run depmod, or staticbuild.initramfs.write_modules_dep)")
        self.paths: dict[str, str] = {}
        self.deps: dict[str, list[str]] = {}  # module -> all dependencies, load-last first (depmod's order)
        for line in dep_file.read_text().splitlines():
            head, colon, tail = line.partition(":")
            if not colon:
                continue
            name = modname(head)
            self.paths.setdefault(name, head.strip())
            self.deps[name] = [modname(d) for d in tail.split()]
            for d in tail.split():
                self.paths.setdefault(modname(d), d)
        builtin = self.root / "modules.builtin"
        self.builtin = {modname(x) for x in builtin.read_text().split()} if builtin.is_file() else set()
        self.aliases: list[tuple[str, str]] = []  # (pattern, module), modules.alias
        alias_file = self.root / "modules.alias"
        for line in alias_file.read_text().splitlines() if alias_file.is_file() else ():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                self.aliases.append((words[1], modname(words[2])))
        # module -> its softdep strings ("pre: a b post: c"): modules.softdep when the tree has one (depmod
        # writes it; so does write_modules_dep), else each module's .modinfo, read when first asked for.
        softdep_file = self.root / "modules.softdep"
        self._softdeps: dict[str, list[str]] | None = None
        if softdep_file.is_file():
            self._softdeps = {}
            for line in softdep_file.read_text().splitlines():
                words = line.split(None, 2)
                if len(words) == 3 and words[0] == "softdep":
                    self._softdeps.setdefault(modname(words[1]), []).append(words[2])

    def providers(self, name: str) -> list[str]:
        """The modules of this tree a name stands for: the module itself, else those whose modules.alias
        patterns match it (e.g. "crypto-crc32c": crc32c_generic and crc32c_intel). Of several, the generic
        implementations only: they load on any CPU, where an accelerated one refuses a CPU without its
        instructions and would fail the load."""
        if modname(name) in self.paths:
            return [modname(name)]
        found = sorted({mod for pattern, mod in self.aliases if fnmatch.fnmatchcase(name, pattern)
                        and mod in self.paths})
        generic = [m for m in found if m.endswith("_generic")]
        return generic or found

    def soft_pre(self, name: str) -> list[str]:
        """The modules a module asks to have loaded before it (softdep "pre:", e.g. ext4 and jbd2 ask for
        crypto-crc32c, which metadata_csum needs and modules.dep does not list). "post:" ones are left out."""
        if self._softdeps is not None:
            entries = self._softdeps.get(name, [])
        else:
            entries = read_modinfo(self.path(name)).get("softdep", [])
        pre: list[str] = []
        for entry in entries:
            where = "pre"
            for word in entry.split():
                if word in ("pre:", "post:"):
                    where = word[:-1]
                elif where == "pre":
                    pre += [m for m in self.providers(word) if m != name and m not in pre]
        return pre

    def resolve(self, names) -> list[str]:
        """Module names (as given, '-' or '_') in load order with all their dependencies; built-in modules are
        left out. Unknown names raise InitramfsError."""
        wanted = []
        for n in names:
            m = modname(n)
            if m in self.paths:
                wanted.append(m)
            elif m not in self.builtin:
                raise InitramfsError(f"module {n!r} is neither in {self.root}/modules.dep nor built in")
        # modules.dep lists every dependency with the ones it needs after it: visiting in reverse list order
        # and ordering by the full sets keeps every module after its dependencies; a module's softdep "pre:"
        # modules (with their own dependencies) come before it too.
        return _load_order(wanted, lambda m: list(reversed(self.deps.get(m, []))) + self.soft_pre(m))

    def path(self, name: str) -> Path:
        return self.root / self.paths[modname(name)]


# -- the spec ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    kind: str  # "dir", "file", "symlink", "dev"
    mode: int
    data: bytes | None = None
    src: str | None = None
    target: str | None = None
    dev: tuple[str, int, int] | None = None


class InitramfsSpec:
    """What goes in the archive, by path. Adding the same path twice with different contents is an error
    (the same directory twice is fine)."""

    def __init__(self):
        self.entries: dict[bytes, _Entry] = {}

    def _add(self, name, entry: _Entry) -> None:
        raw = _encode_name(name)
        old = self.entries.get(raw)
        if old is not None and old != entry:
            raise InitramfsError(f"initramfs: {os.fsdecode(raw)!r} is added twice, differently")
        self.entries[raw] = entry

    def dir(self, name, mode: int = 0o755) -> None:
        self._add(name, _Entry("dir", mode))

    def file(self, name, *, data: bytes | str | None = None, src=None, mode: int | None = None) -> None:
        """A regular file from bytes/str `data` or copied from the file `src` (mode defaults to src's, or 0644)."""
        if (data is None) == (src is None):
            raise InitramfsError(f"initramfs: {name!r} needs exactly one of data= and src=")
        if src is not None:
            src = os.fspath(src)
            try:
                st = os.stat(src)
            except OSError as err:
                raise InitramfsError(f"initramfs: {name!r}: cannot read {src}: {err.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise InitramfsError(f"initramfs: {name!r}: {src} is not a regular file")
            self._add(name, _Entry("file", stat.S_IMODE(st.st_mode) if mode is None else mode, src=src))
        else:
            if isinstance(data, str):
                data = data.encode()
            self._add(name, _Entry("file", 0o644 if mode is None else mode, data=bytes(data)))

    def symlink(self, name, target: str) -> None:
        self._add(name, _Entry("symlink", 0o777, target=target))

    def device(self, name, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        if kind not in ("c", "b"):
            raise InitramfsError(f"initramfs: device kind must be 'c' or 'b', not {kind!r}")
        self._add(name, _Entry("dev", mode, dev=(kind, major, minor)))

    def add_console_devices(self) -> None:
        """dev/console and dev/null, which the kernel needs before devtmpfs is mounted (init's stdio)."""
        self.dir("dev")
        self.device("dev/console", "c", 5, 1, 0o600)
        self.device("dev/null", "c", 1, 3, 0o666)

    def tree(self, path, prefix: str = "") -> None:
        """Everything under the directory `path` (not path itself) at `prefix`; symlinks stay links."""
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise InitramfsError(f"initramfs: {root} is not a directory")
        pre = prefix.strip("/")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for fn in sorted(dirnames + filenames):
                full = os.path.join(dirpath, fn)
                name = "/".join(p for p in (pre, "" if rel == "." else rel, fn) if p)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(name, os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    self.dir(name, stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    self.file(name, src=full)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                    self.device(name, kind, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode))
                else:
                    raise InitramfsError(f"initramfs: {full}: cannot archive this file type")

    def modules(self, moddir, names, *, dest: str | None = None) -> list[str]:
        """Copy the modules `names` and all their dependencies (softdep "pre:" ones included) from the module
        tree `moddir` (lib/modules/<release>) to dest (default lib/modules/<release>), with a modules.dep of
        just those, its lines in load order (a loader that goes down the file loads each module after what it
        needs), and their modules.softdep lines. Returns their archive paths in load order
        ("/lib/modules/.../virtio_ring.ko", ...)."""
        tree = moddir if isinstance(moddir, ModuleTree) else ModuleTree(moddir)
        dest = (dest or f"lib/modules/{tree.release}").strip("/")
        order = tree.resolve(names)
        for m in order:
            self.file(f"{dest}/{tree.paths[m]}", src=tree.path(m), mode=0o644)
        dep_lines = [f"{tree.paths[m]}: " + " ".join(tree.paths[d] for d in tree.deps.get(m, [])) for m in order]
        self.file(f"{dest}/modules.dep", data="".join(line.rstrip() + "\n" for line in dep_lines))
        soft = [f"softdep {m} pre: {' '.join(pre)}\n" for m in order if (pre := tree.soft_pre(m))]
        self.file(f"{dest}/modules.softdep", data="".join(soft))
        return [f"/{dest}/{tree.paths[m]}" for m in order]


# -- writing -------------------------------------------------------------------------------------------------

COMPRESSIONS = ("xz", "gzip", "none")


def _sort_key(raw: bytes):
    return raw.split(b"/")


def write_cpio(spec: InitramfsSpec, out) -> None:
    """The spec as an uncompressed newc cpio archive on the binary file object `out`."""
    with CpioWriter(out) as w:
        written: set[bytes] = set()
        for raw in sorted(spec.entries, key=_sort_key):
            parts = raw.split(b"/")
            for i in range(1, len(parts)):
                parent = b"/".join(parts[:i])
                if parent in spec.entries and spec.entries[parent].kind != "dir":
                    raise InitramfsError(f"initramfs: {os.fsdecode(parent)!r} is not a directory, "
                                         f"but {os.fsdecode(raw)!r} is in it")
                if parent not in written and parent not in spec.entries:
                    w.add_dir(parent)
                    written.add(parent)
            e = spec.entries[raw]
            if e.kind == "dir":
                w.add_dir(raw, e.mode)
            elif e.kind == "file" and e.src is not None:
                with open(e.src, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    w.add_file_from(raw, f, size, e.mode)
            elif e.kind == "file":
                w.add_file(raw, e.data, e.mode)
            elif e.kind == "symlink":
                w.add_symlink(raw, e.target)
            else:
                kind, major, minor = e.dev
                w.add_device(raw, kind, major, minor, e.mode)
            written.add(raw)


def build_initramfs(spec: InitramfsSpec, output, *, compression: str = "xz") -> Path:
    """Write the spec to the file `output`, compressed with xz (CRC32 check), gzip or not at all. The file
    is written next to its final name and renamed into place, so it never exists half-written."""
    if compression not in COMPRESSIONS:
        raise InitramfsError(f"initramfs: compression must be one of {', '.join(COMPRESSIONS)}")
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            if compression == "xz":
                # LZMA2 only (the kernel's decoder takes no other filter), 1 MiB dictionary like the kernel's
                # own scripts, CRC32.
                filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}]
                with lzma.LZMAFile(raw, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                   filters=filters) as out:
                    write_cpio(spec, out)
            elif compression == "gzip":
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as out:
                    write_cpio(spec, out)
            else:
                write_cpio(spec, raw)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output
