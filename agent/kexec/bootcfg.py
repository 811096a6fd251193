"""What to boot from an OS disk: the default entry of its GRUB configuration, or Debian's /boot/vmlinuz and
/boot/initrd.img links. Pure: files are read through a callback (or below a root folder), nothing is mounted.

    entry = find_boot_entry("/mnt/root", fs_uuid="0b5e...")     # or find_boot_entry(read_callback, ...)
    entry.kernel, entry.initrds, entry.cmdline                  # paths inside that filesystem

GRUB: /boot/grub/grub.cfg (the root filesystem holds /boot) or /grub/grub.cfg (a separate /boot partition);
either way the `linux`/`initrd` paths are paths inside the filesystem that holds grub.cfg, which is the one we are
given. `set default=` takes an index ("0"), a title or id ("Debian GNU/Linux"), a submenu path ("1>2", titles or
ids joined with '>'), or `saved` / "${saved_entry}" (then saved_entry from grubenv; 0 if none). A default that
is a variable we cannot know (e.g. "${next_entry}") is skipped in favour of the next literal one. `($root)` or
`(hd0,msdos1)` before a path, and `$var` words on the kernel line, are dropped.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import NodeagentError

GRUB_CFG_PATHS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub2/grub.cfg")
FALLBACK_KERNELS = ("/boot/vmlinuz", "/vmlinuz")
FALLBACK_INITRDS = ("/boot/initrd.img", "/initrd.img")
MAX_SYMLINKS = 40


class BootConfigError(NodeagentError):
    """No bootable kernel could be found on the filesystem (or its grub.cfg is unusable)."""


@dataclass(frozen=True)
class BootEntry:
    title: str
    kernel: str  # absolute path inside the filesystem
    initrds: tuple[str, ...]  # absolute paths inside the filesystem; more than one are concatenated
    cmdline: str
    source: str  # where it came from, for messages: "grub.cfg entry 'Debian GNU/Linux'", "/boot/vmlinuz"


@dataclass
class MenuItem:
    title: str
    ident: str = ""  # the $menuentry_id_option id, if any
    children: list[MenuItem] | None = None  # a submenu has children; a menuentry has None
    linux: list[str] = field(default_factory=list)  # path then arguments
    initrd: list[str] = field(default_factory=list)


@dataclass
class GrubConfig:
    items: list[MenuItem]
    default: str | None  # the literal default (after dropping unknowable variables), None if none was set


_VAR = re.compile(r"^\$(\w+|\{[^}]*\})$")
_DEVICE_PREFIX = re.compile(r"^\([^)]*\)")


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: take whitespace-separated words
        return line.split()


def parse_grub_cfg(text: str) -> GrubConfig:
    """The menu tree (menuentry/submenu blocks) and the `set default=` of a grub.cfg."""
    root: list[MenuItem] = []
    stack: list[tuple[list[MenuItem] | None, MenuItem | None]] = [(root, None)]  # (list new items go to, entry)
    default: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = _words(line)
        if not words:
            continue
        cmd = words[0]
        items, entry = stack[-1]
        if cmd in ("menuentry", "submenu") and line.endswith("{"):
            args = [w for w in words[1:] if w != "{"]
            title = args[0] if args else ""
            ident = ""
            for i, w in enumerate(args[:-1]):
                if w in ("$menuentry_id_option", "--id", "${menuentry_id_option}"):
                    ident = args[i + 1]
            item = MenuItem(title=title, ident=ident, children=[] if cmd == "submenu" else None)
            if items is not None:
                items.append(item)
            stack.append((item.children, item if cmd == "menuentry" else None))
            continue
        if line.endswith("{"):  # function, or another block we do not interpret
            stack.append((None, entry))
            continue
        if line == "}" or line.startswith("}"):
            if len(stack) > 1:
                stack.pop()
            continue
        if entry is not None and cmd in ("linux", "linuxefi", "linux16"):
            entry.linux = words[1:]
        elif entry is not None and cmd in ("initrd", "initrdefi", "initrd16"):
            entry.initrd = words[1:]
        elif entry is None and len(stack) == 1 or cmd == "set":
            for statement in _statements(line):
                m = re.match(r"^set\s+default=(.*)$", statement)
                if m and len(stack) == 1:
                    value = _words(m.group(1))
                    value = value[0] if value else ""
                    if value in ("${saved_entry}", "$saved_entry"):
                        value = "saved"
                    if "$" not in value:
                        default = value
    return GrubConfig(root, default)


def _statements(line: str) -> list[str]:
    """`if [ x ]; then set default="0"; fi` -> its ';'-separated statements, minus if/then/else/fi keywords."""
    out = []
    for part in line.split(";"):
        part = part.strip()
        for kw in ("then ", "else ", "do "):
            if part.startswith(kw):
                part = part[len(kw):].strip()
        if part:
            out.append(part)
    return out


def _resolve(items: list[MenuItem], spec: str, what: str) -> MenuItem:
    path = [p.strip() for p in spec.split(">")] if spec else ["0"]
    level = items
    item = None
    for i, part in enumerate(path):
        if level is None:
            raise BootConfigError(f"grub.cfg: default {spec!r}: {path[i - 1]!r} is not a submenu")
        item = None
        if part.isdigit():
            n = int(part)
            if n < len(level):
                item = level[n]
        else:
            item = next((it for it in level if part in (it.title, it.ident)), None)
        if item is None:
            raise BootConfigError(f"{what}: no menu entry {part!r} (default {spec!r})")
        level = item.children
    if item.children is not None:  # a submenu: grub boots its first entry
        if not item.children:
            raise BootConfigError(f"{what}: submenu {item.title!r} is empty")
        return _resolve(item.children, "0", what)
    return item


def _clean_path(word: str) -> str:
    path = _DEVICE_PREFIX.sub("", word)
    return path if path.startswith("/") else "/" + path


def _cmdline(words: list[str]) -> str:
    out = []
    for w in words:
        if _VAR.match(w):
            continue
        out.append(f'"{w}"' if any(c.isspace() for c in w) else w)
    return " ".join(out)


def grub_default_entry(text: str, grubenv: str | None = None) -> BootEntry:
    """The entry grub would boot by default from grub.cfg `text` (and grubenv, for `saved`)."""
    cfg = parse_grub_cfg(text)
    if not cfg.items:
        raise BootConfigError("grub.cfg has no menuentry")
    spec = cfg.default or "0"
    if spec == "saved":
        spec = _grubenv(grubenv).get("saved_entry", "") or "0"
    try:
        item = _resolve(cfg.items, spec, "grub.cfg")
    except BootConfigError:
        if cfg.default is not None and spec != "0":  # as grub: an unknown default boots the first entry
            item = _resolve(cfg.items, "0", "grub.cfg")
        else:
            raise
    if not item.linux:
        raise BootConfigError(f"grub.cfg entry {item.title!r} has no linux line")
    return BootEntry(
        title=item.title,
        kernel=_clean_path(item.linux[0]),
        initrds=tuple(_clean_path(w) for w in item.initrd if not _VAR.match(w)),
        cmdline=_cmdline(item.linux[1:]),
        source=f"grub.cfg entry {item.title!r}",
    )


def _grubenv(text: str | None) -> dict[str, str]:
    env = {}
    for line in (text or "").splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip()
    return env


# -- reading a filesystem -------------------------------------------------------------------------------------

ReadFn = Callable[[str], bytes]  # absolute path inside the filesystem -> contents; OSError if missing


class RootFs:
    """Files below `root` (a mounted filesystem), symlinks resolved inside it: /boot/vmlinuz -> vmlinuz-6.1...,
    or an absolute target such as /boot/vmlinuz-6.1..., is looked up below `root`, never on the host."""

    def __init__(self, root) -> None:
        self.root = os.fspath(root)

    def resolve(self, path: str) -> str:
        """The absolute in-filesystem path `path` names after following symlinks; OSError if missing."""
        parts = [p for p in path.split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            host = os.path.join(self.root, *done, name)
            if os.path.islink(host):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(f"{path}: too many levels of symbolic links")
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done.append(name)
        result = "/" + "/".join(done)
        if not os.path.exists(os.path.join(self.root, *done)):
            raise FileNotFoundError(f"{path}: no such file")
        return result

    def host_path(self, path: str) -> str:
        return os.path.join(self.root, self.resolve(path).lstrip("/"))

    def read(self, path: str) -> bytes:
        with open(self.host_path(path), "rb") as f:
            return f.read()


def _reader(fs) -> tuple[ReadFn, Callable[[str], str | None]]:
    """(read, resolve) for a root folder or a RootFs or a read callback (which resolves nothing)."""
    if isinstance(fs, (str, os.PathLike)):
        fs = RootFs(fs)
    if isinstance(fs, RootFs):
        def resolve(path):
            try:
                return fs.resolve(path)
            except OSError:
                return None

        return fs.read, resolve

    def resolve_cb(path):
        try:
            fs(path)
        except OSError:
            return None
        return path

    return fs, resolve_cb


def find_boot_entry(fs, fs_uuid: str | None = None) -> BootEntry:
    """What to boot from the filesystem `fs` (a root folder, a RootFs, or read(path) -> bytes): grub.cfg's
    default entry if there is a grub.cfg whose kernel exists, else /boot/vmlinuz + /boot/initrd.img with
    `root=UUID=<fs_uuid> ro`. Kernel and initrd paths are resolved through symlinks when reading below a folder."""
    read, resolve = _reader(fs)
    problems = []
    for cfg_path in GRUB_CFG_PATHS:
        try:
            text = read(cfg_path).decode("utf-8", "replace")
        except OSError:
            continue
        env = None
        try:
            env = read(cfg_path.rsplit("/", 1)[0] + "/grubenv").decode("utf-8", "replace")
        except OSError:
            pass
        try:
            entry = grub_default_entry(text, env)
        except BootConfigError as err:
            problems.append(f"{cfg_path}: {err}")
            continue
        kernel = resolve(entry.kernel)
        if kernel is None:
            problems.append(f"{cfg_path}: kernel {entry.kernel} of {entry.title!r} is missing")
            continue
        initrds = []
        for path in entry.initrds:
            found = resolve(path)
            if found is None:
                raise BootConfigError(f"{cfg_path}: initrd {path} of {entry.title!r} is missing")
            initrds.append(found)
        return BootEntry(entry.title, kernel, tuple(initrds), entry.cmdline, f"{cfg_path} entry {entry.title!r}")
    for k_path, i_path in zip(FALLBACK_KERNELS, FALLBACK_INITRDS):
        kernel = resolve(k_path)
        if kernel is None:
            continue
        if not fs_uuid:
            raise BootConfigError(f"found {k_path} but no filesystem UUID for its root= argument")
        initrd = resolve(i_path)
        return BootEntry(
            title=os.path.basename(kernel), kernel=kernel, initrds=(initrd,) if initrd else (),
            cmdline=f"root=UUID={fs_uuid} ro", source=k_path,
        )
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise BootConfigError(f"no grub.cfg entry and no /boot/vmlinuz to boot{detail}")
