"""newc ("070701") cpio archives, the format the Linux kernel unpacks as an initramfs: a writer, pure.

Each entry is a 110-byte ASCII header (the magic and thirteen 8-digit hex fields: ino, mode, uid, gid, nlink,
mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the NUL-terminated name, zero padding
to a multiple of 4 bytes, then the data (file contents, or a symlink's target without NUL), zero padding to a
multiple of 4 bytes. The archive ends with an entry named "TRAILER!!!".

The writer is reproducible: the same entries give the same bytes. Owners and times default to 0, inode numbers
count up from 1 in the order entries are added, the archived file's device is 0, and add_tree() visits a directory
in sorted (byte) order. Every entry is its own inode (no hard links), so the kernel never links two names together.
Data goes to the file object as it comes: a file added from a file object is copied in 1 MiB pieces.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from . import BuildError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
MAX_FIELD = 0xFFFFFFFF
COPY_PIECE = 1 << 20


class CpioError(BuildError):
    """An entry cannot be put in a cpio archive (bad name, duplicate, too big, unsupported file type)."""


def _pad(n: int) -> int:
    """Zero bytes that bring n up to a multiple of 4."""
    return -n & 3


def _encode_name(name: str | bytes) -> bytes:
    raw = os.fsencode(name)
    if raw.startswith(b"./"):
        raw = raw[2:]
    raw = raw.strip(b"/") if raw != b"/" else raw
    if not raw or raw == b"/":
        raise CpioError(f"cpio: empty entry name {name!r}")
    if b"\0" in raw:
        raise CpioError(f"cpio: NUL in entry name {name!r}")
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise CpioError(f"cpio: entry name {name!r} has an empty, '.' or '..' component")
    if raw == TRAILER.encode():
        raise CpioError(f"cpio: {TRAILER} is reserved for the end of the archive")
    return raw


def header(
    *,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
    filesize: int,
    rdevmajor: int = 0,
    rdevminor: int = 0,
    name: bytes,
) -> bytes:
    """One newc header with its name and the padding after it."""
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0)
    for value in fields:
        if not 0 <= value <= MAX_FIELD:
            raise CpioError(f"cpio: value {value} of entry {os.fsdecode(name)!r} does not fit in 32 bits")
    head = MAGIC + b"".join(b"%08X" % v for v in fields) + name + b"\0"
    return head + b"\0" * _pad(len(head))


class CpioWriter:
    """Write a newc cpio archive to a binary file object, entry by entry; close() (or leaving the `with` block
    without an exception) writes the trailer. Names are relative ("etc/passwd"; a leading "/" or "./" is
    dropped). Each entry's parent directory must have been added first (the kernel does not create parents),
    except that add_tree() adds the missing directories of its prefix itself."""

    def __init__(self, out: BinaryIO, *, uid: int = 0, gid: int = 0, mtime: int = 0):
        self._out = out
        self._uid = uid
        self._gid = gid
        self._mtime = mtime
        self._next_ino = 1
        self._names: dict[bytes, int] = {}  # name -> mode, of everything added
        self.offset = 0  # bytes written so far
        self.closed = False

    # -- entries ---------------------------------------------------------------------------------------------

    def add_dir(self, name, mode: int = 0o755, *, uid=None, gid=None, mtime=None) -> None:
        self._entry(name, stat.S_IFDIR, mode, uid, gid, mtime, nlink=2)

    def add_file(self, name, data: bytes, mode: int = 0o644, *, uid=None, gid=None, mtime=None) -> None:
        """A regular file whose contents are `data` (bytes-like)."""
        data = memoryview(data).cast("B")
        self._entry(name, stat.S_IFREG, mode, uid, gid, mtime, size=len(data))
        self._write(data)
        self._write(b"\0" * _pad(len(data)))

    def add_file_from(self, name, src: BinaryIO, size: int, mode: int = 0o644, *, uid=None, gid=None,
                      mtime=None) -> None:
        """A regular file of exactly `size` bytes read from `src` in pieces (never whole in memory)."""
        self._entry(name, stat.S_IFREG, mode, uid, gid, mtime, size=size)
        left = size
        while left:
            piece = src.read(min(left, COPY_PIECE))
            if not piece:
                raise CpioError(f"cpio: {os.fsdecode(_encode_name(name))!r} ended {left} bytes short of {size}")
            self._write(piece)
            left -= len(piece)
        self._write(b"\0" * _pad(size))

    def add_symlink(self, name, target, *, mode: int = 0o777, uid=None, gid=None, mtime=None) -> None:
        raw = os.fsencode(target)
        if not raw or b"\0" in raw:
            raise CpioError(f"cpio: bad symlink target {target!r} for {name!r}")
        self._entry(name, stat.S_IFLNK, mode, uid, gid, mtime, size=len(raw))
        self._write(raw + b"\0" * _pad(len(raw)))

    def add_device(self, name, kind: str, major: int, minor: int, mode: int = 0o600, *, uid=None, gid=None,
                   mtime=None) -> None:
        """A device node: kind "c" (character) or "b" (block)."""
        if kind not in ("c", "b"):
            raise CpioError(f"cpio: device kind must be 'c' or 'b', not {kind!r}")
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._entry(name, fmt, mode, uid, gid, mtime, rdev=(major, minor))

    def add_fifo(self, name, mode: int = 0o644, *, uid=None, gid=None, mtime=None) -> None:
        self._entry(name, stat.S_IFIFO, mode, uid, gid, mtime)

    def add_tree(self, path, prefix: str = "", *, keep_owner: bool = False, keep_mtime: bool = False) -> None:
        """Add the directory `path` from disk under `prefix` ("" puts its contents at the root of the archive;
        the directories of a prefix that are not yet in the archive are added, the last with `path`'s mode).
        Entries go in sorted byte order, each directory before its contents; symlinks are archived as links.
        Owners and times are 0 unless keep_owner / keep_mtime. Hard-linked files are stored as separate copies.
        Sockets are refused."""
        root = os.fspath(path)
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise CpioError(f"cpio: {root} is not a directory")
        pre = _encode_name(prefix) if prefix.strip("/.") else b""
        if pre:
            parts = pre.split(b"/")
            for i in range(1, len(parts) + 1):
                sub = b"/".join(parts[:i])
                if sub not in self._names:
                    self._add_stat(sub, st if i == len(parts) else None, root, keep_owner, keep_mtime)
                elif not stat.S_ISDIR(self._names[sub]):
                    raise CpioError(f"cpio: prefix {os.fsdecode(sub)!r} is in the archive and not a directory")
        self._add_dir_contents(os.fsencode(root), pre, keep_owner, keep_mtime)

    def _add_dir_contents(self, src: bytes, dst: bytes, keep_owner: bool, keep_mtime: bool) -> None:
        for entry in sorted(os.listdir(src)):
            path = os.path.join(src, entry)
            name = dst + b"/" + entry if dst else entry
            st = os.lstat(path)
            self._add_stat(name, st, path, keep_owner, keep_mtime)
            if stat.S_ISDIR(st.st_mode):
                self._add_dir_contents(path, name, keep_owner, keep_mtime)

    def _add_stat(self, name: bytes, st, path, keep_owner: bool, keep_mtime: bool) -> None:
        if st is None:  # a made-up parent directory
            self.add_dir(name)
            return
        kw = {}
        if keep_owner:
            kw.update(uid=st.st_uid, gid=st.st_gid)
        if keep_mtime:
            kw.update(mtime=int(st.st_mtime))
        perm = stat.S_IMODE(st.st_mode)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            self.add_dir(name, perm, **kw)
        elif fmt == stat.S_IFREG:
            with open(path, "rb") as f:
                self.add_file_from(name, f, st.st_size, perm, **kw)
        elif fmt == stat.S_IFLNK:
            self.add_symlink(name, os.readlink(path), mode=perm, **kw)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = "c" if fmt == stat.S_IFCHR else "b"
            self.add_device(name, kind, os.major(st.st_rdev), os.minor(st.st_rdev), perm, **kw)
        elif fmt == stat.S_IFIFO:
            self.add_fifo(name, perm, **kw)
        else:
            raise CpioError(f"cpio: {os.fsdecode(path)}: cannot archive this file type (socket?)")

    # -- the end ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Write the trailer. The file object is left open (and not flushed) for the caller."""
        if self.closed:
            return
        self._write(header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, filesize=0, name=TRAILER.encode()))
        self.closed = True

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _entry(self, name, fmt: int, mode: int, uid, gid, mtime, *, size: int = 0, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self.closed:
            raise CpioError("cpio: archive already closed")
        raw = _encode_name(name)
        if mode & ~0o7777:
            raise CpioError(f"cpio: mode 0o{mode:o} of {os.fsdecode(raw)!r} has bits beyond 0o7777")
        if raw in self._names:
            raise CpioError(f"cpio: {os.fsdecode(raw)!r} is already in the archive")
        parent = raw.rpartition(b"/")[0]
        if parent and not stat.S_ISDIR(self._names.get(parent, 0)):
            raise CpioError(f"cpio: the parent directory of {os.fsdecode(raw)!r} is not in the archive")
        if size > MAX_FIELD:
            raise CpioError(f"cpio: {os.fsdecode(raw)!r} is {size} bytes; newc holds at most 4 GiB - 1")
        ino = self._next_ino
        self._write(
            header(
                ino=ino,
                mode=fmt | mode,
                uid=self._uid if uid is None else uid,
                gid=self._gid if gid is None else gid,
                nlink=nlink,
                mtime=self._mtime if mtime is None else mtime,
                filesize=size,
                rdevmajor=rdev[0],
                rdevminor=rdev[1],
                name=raw,
            )
        )
        self._next_ino += 1
        self._names[raw] = fmt | mode

    def _write(self, data) -> None:
        if data:
            self._out.write(data)
            self.offset += len(data)
