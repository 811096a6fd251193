"""What Linux tells us through files, parsed: /proc, /sys, the kernel command line and modules.dep.

The other half of the Linux layer (agent.linux makes the system calls): every place that needs a /proc or /sys
fact comes here.  Two kinds of function:

* ``parse_*(text)``: pure, text in, values out;
* ``read_*(root="/")`` and the /sys walkers: take the root of the tree to read (a test points them at a fake tree
  under tmp_path) and return what they find.

The kernel's files can change between two reads and a hand-made tree can hold anything: lines or entries that do
not parse are skipped, an unreadable file reads as absent (None or empty), and nothing here raises on bad text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

PROC_CMDLINE = "proc/cmdline"
PROC_MOUNTINFO = "proc/self/mountinfo"
PROC_SWAPS = "proc/swaps"
PROC_IOMEM = "proc/iomem"
SYS_FIRMWARE_MEMMAP = "sys/firmware/memmap"
SYS_KEXEC_LOADED = "sys/kernel/kexec_loaded"
SYS_DEV_BLOCK = "sys/dev/block"
SYS_CLASS_BLOCK = "sys/class/block"

NODEAGENT_PREFIX = "nodeagent."  # our keys on the kernel command line: nodeagent.KEY=VALUE


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def read_text(path: str) -> str | None:
    """The whole file as text (bytes that are not UTF-8 kept as surrogates, so paths survive), None if it cannot
    be read."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _hex(text: str) -> int | None:
    try:
        value = int(text.strip(), 16)
    except ValueError:
        return None
    return value if value >= 0 else None


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_octal(field: str) -> str:
    """Undo the kernel's escaping of a path in /proc files ("\\040" for a space, also tab, newline, backslash)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


# ---------------------------------------------------------------- mounts and swap


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    major: int
    minor: int
    root: str  # the mounted directory of the filesystem
    mount_point: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/PID/mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        major, colon, minor = fields[2].partition(":")
        if not (colon and major.isdigit() and minor.isdigit()):
            continue
        rest = fields[fields.index("-", 6) + 1 :]
        fstype = rest[0] if rest else ""
        source = unescape_octal(rest[1]) if len(rest) > 1 else ""
        mounts.append(Mount(int(major), int(minor), unescape_octal(fields[3]), unescape_octal(fields[4]), fstype,
                            source))
    return mounts


def read_mountinfo(root: str = "/") -> list[Mount]:
    """The mounts of this process's mount namespace; empty if /proc is not there."""
    return parse_mountinfo(read_text(_path(root, PROC_MOUNTINFO)) or "")


@dataclass(frozen=True)
class Swap:
    path: str  # the swap file or device
    kind: str  # "partition", "file"


def parse_swaps(text: str) -> list[Swap]:
    """/proc/swaps: a header line, then "FILENAME TYPE SIZE USED PRIORITY" per active swap area."""
    swaps = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("/"):  # the header and garbage do not start with a path
            swaps.append(Swap(unescape_octal(fields[0]), fields[1]))
    return swaps


def read_swaps(root: str = "/") -> list[Swap]:
    return parse_swaps(read_text(_path(root, PROC_SWAPS)) or "")


# ---------------------------------------------------------------- block devices in sysfs


def parse_dev_number(text: str) -> tuple[int, int] | None:
    """A sysfs "dev" file ("MAJOR:MINOR\\n") as (major, minor)."""
    major, colon, minor = text.strip().partition(":")
    if colon and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    return None


def _block_dir(major: int, minor: int, root: str) -> str:
    return _path(root, f"{SYS_DEV_BLOCK}/{major}:{minor}")


def block_device_and_partitions(major: int, minor: int, root: str = "/") -> set[tuple[int, int]]:
    """The device major:minor and its partitions (the entries of /sys/dev/block/MAJ:MIN with a "dev" file)."""
    found = {(major, minor)}
    base = _block_dir(major, minor, root)
    try:
        entries = os.listdir(base)
    except OSError:
        return found
    for entry in entries:
        text = read_text(os.path.join(base, entry, "dev"))
        number = parse_dev_number(text) if text is not None else None
        if number is not None:
            found.add(number)
    return found


def block_holders(major: int, minor: int, root: str = "/") -> list[str]:
    """The devices holding block device major:minor (md, dm, bcache: /sys/dev/block/MAJ:MIN/holders), sorted."""
    try:
        return sorted(os.listdir(os.path.join(_block_dir(major, minor, root), "holders")))
    except OSError:
        return []


def block_partitions(name: str, root: str = "/") -> list[str]:
    """The partitions of block device `name` ("vda") by partition number: /sys/class/block/NAME/*/partition."""
    base = _path(root, f"{SYS_CLASS_BLOCK}/{name}")
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    numbered = []
    for entry in entries:
        text = read_text(os.path.join(base, entry, "partition"))
        if text is not None and text.strip().isdigit():
            numbered.append((int(text.strip()), entry))
    return [entry for _, entry in sorted(numbered)]


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryRange:
    start: int
    end: int  # exclusive
    type: str  # the kernel's name: "System RAM", "Reserved", "ACPI Tables", ...


def read_firmware_memmap(root: str = "/") -> list[MemoryRange]:
    """The firmware memory map as the kernel got it at boot (e820 on x86): /sys/firmware/memmap/N/{start,end,type},
    end inclusive there. Sorted by address; empty if the directory cannot be read."""
    base = _path(root, SYS_FIRMWARE_MEMMAP)
    try:
        names = os.listdir(base)
    except OSError:
        return []
    ranges = []
    for name in names:
        start_text, end_text, kind = (read_text(os.path.join(base, name, f)) for f in ("start", "end", "type"))
        if start_text is None or end_text is None or kind is None:
            continue
        start, last = _hex(start_text), _hex(end_text)
        if start is None or last is None or last < start:
            continue
        ranges.append(MemoryRange(start, last + 1, kind.strip()))
    return sorted(ranges, key=lambda r: (r.start, r.end))


@dataclass(frozen=True)
class IomemRange:
    start: int
    end: int  # exclusive
    name: str
    depth: int  # 0: top level; nested resources (Kernel code inside System RAM) are indented two spaces a level


def parse_iomem(text: str) -> list[IomemRange]:
    """/proc/iomem: "START-END : NAME" (hex, end inclusive), nesting shown by indentation. An unprivileged reader
    sees every address as 0."""
    ranges = []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        span, sep, name = stripped.partition(" : ")
        lo, dash, hi = span.partition("-")
        start, last = _hex(lo), _hex(hi)
        if not (sep and dash) or start is None or last is None or last < start:
            continue
        ranges.append(IomemRange(start, last + 1, name.strip(), (len(line) - len(stripped)) // 2))
    return ranges


def read_iomem(root: str = "/") -> list[IomemRange]:
    return parse_iomem(read_text(_path(root, PROC_IOMEM)) or "")


def kexec_loaded(root: str = "/") -> bool | None:
    """Whether a kexec kernel is loaded (/sys/kernel/kexec_loaded), None when the kernel does not say."""
    text = read_text(_path(root, SYS_KEXEC_LOADED))
    if text is None or text.strip() not in ("0", "1"):
        return None
    return text.strip() == "1"


# ---------------------------------------------------------------- the kernel command line


def cmdline_words(text: str) -> list[str]:
    """The command line split into its words as the kernel splits it: at blanks outside double quotes; the quotes
    stay in the words (join them with spaces to get an equivalent command line back)."""
    words, word, quoted, started = [], [], False, False
    for ch in text:
        if ch.isspace() and not quoted:
            if started:
                words.append("".join(word))
                word, started = [], False
            continue
        if ch == '"':
            quoted = not quoted
        word.append(ch)
        started = True
    if started:
        words.append("".join(word))
    return words


def _unquote(text: str) -> str:
    # A leading quote opens the part and a trailing one closes it (an unclosed quote runs to the end).
    if text.startswith('"'):
        text = text[1:]
        if text.endswith('"'):
            text = text[:-1]
    return text


def _param(word: str) -> tuple[str, str | None]:
    key, eq, value = _unquote(word).partition("=")
    return key, (_unquote(value) if eq else None)


@dataclass(frozen=True)
class KernelCommandLine:
    params: tuple[tuple[str, str | None], ...]  # (key, value) in order; value None for a bare word ("quiet")
    init_args: tuple[str, ...]  # the words after "--", which the kernel hands to init

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of the last `key` (the kernel's rule for repeated parameters); "" for a bare `key`."""
        for k, v in reversed(self.params):
            if k == key:
                return "" if v is None else v
        return default

    def __contains__(self, key: str) -> bool:
        return any(k == key for k, _ in self.params)

    def nodeagent(self) -> dict[str, str]:
        """Our keys: nodeagent.KEY=VALUE as {KEY: VALUE} (the last one wins; "" for a bare nodeagent.KEY)."""
        return {k[len(NODEAGENT_PREFIX) :]: "" if v is None else v for k, v in self.params
                if k.startswith(NODEAGENT_PREFIX) and len(k) > len(NODEAGENT_PREFIX)}


def parse_cmdline(text: str) -> KernelCommandLine:
    """/proc/cmdline as the kernel reads it: words at blanks outside double quotes; KEY=VALUE at the first "=";
    quotes around a whole word or around the value removed (key="a b" gives a b); "--" ends the kernel's part."""
    params, init_args = [], []
    words = cmdline_words(text)
    for i, word in enumerate(words):
        if word == "--":
            init_args = words[i + 1 :]
            break
        params.append(_param(word))
    return KernelCommandLine(tuple(params), tuple(init_args))


def read_cmdline(root: str = "/") -> str | None:
    """The running kernel's command line (/proc/cmdline) without its trailing newline; None if it cannot be read."""
    text = read_text(_path(root, PROC_CMDLINE))
    return None if text is None else text.rstrip("\n")


# ---------------------------------------------------------------- kernel modules


def module_name(path: str) -> str:
    """The kernel's name of a module file: the file name without .ko (and .xz/.zst/.gz), "-" as "_"."""
    base = os.path.basename(path)
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """lib/modules/RELEASE/modules.dep (depmod's format): "PATH.ko: DEP.ko DEP.ko" per module, paths relative to
    the release directory, every dependency listed (direct and indirect), each before the ones it needs. Returns
    {path: dependency paths as listed}."""
    deps = {}
    for line in text.splitlines():
        head, colon, tail = line.partition(":")
        head = head.strip()
        if not colon or not head or any(c.isspace() for c in head):
            continue
        deps[head] = tuple(tail.split())
    return deps


def module_load_order(deps: dict[str, tuple[str, ...]], names) -> tuple[list[str], list[str]]:
    """The module files to load for module `names` ("virtio_blk" or "virtio-blk"), each after everything it depends
    on, each once: (paths in load order, names modules.dep does not know). A dependency loop (a broken modules.dep)
    is cut where it closes instead of recursing forever."""
    by_name = {}
    for path, listed in deps.items():
        by_name.setdefault(module_name(path), path)
        for dep in listed:
            by_name.setdefault(module_name(dep), dep)
    order: list[str] = []
    done: set[str] = set()
    unknown = []

    def visit(path: str, stack: set[str]) -> None:
        if path in done or path in stack:
            return
        stack.add(path)
        # depmod lists a module's dependencies with the ones they need after them: reversed, post-order.
        for dep in reversed(deps.get(path, ())):
            visit(dep, stack)
        stack.discard(path)
        done.add(path)
        order.append(path)

    for name in names:
        path = by_name.get(module_name(name))
        if path is None:
            unknown.append(name)
        else:
            visit(path, set())
    return order, unknown
