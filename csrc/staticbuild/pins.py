"""What the static build puts in: pinned sources (version + sha256), compiler flags, CPython's configuration and
built-in modules, the modules Nuitka leaves out or carries as bytecode, the files each stage hashes into its key.
Data only: the stages (sysroot.py, cpython.py, nuitka_stage.py, agent_stage.py) read it."""

from __future__ import annotations

from . import CSRC

# Bump when the code of a stage changes (its key then changes, so the cached stage is rebuilt).
STATIC_STAGE_VERSION = "2"

UCLIBC_DEB = {"package": "uclibc-source", "version": "1.0.35-1",
              "sha256": "661d20337248f555e5a56d3b2d5ac9ca0e2a088389a723dca8cf9ad230757c3e"}
UCLIBC_TARBALL = {"member": "usr/src/uClibc-ng-1.0.35.tar.xz",
                  "sha256": "2c312f60ef48053bae6aa5ae73b7013ac64c5abfafb86ed5feaf742e8e8d06b6"}
DEBIAN_TARBALLS = {
    "python": {"file": "python3.11_3.11.2.orig.tar.gz", "source": "python3.11",
               "sha256": "2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849",
               "urls": ["http://deb.debian.org/debian-security/pool/updates/main/p/python3.11/",
                        "http://deb.debian.org/debian/pool/main/p/python3.11/"]},
    "zlib": {"file": "zlib_1.2.13.dfsg.orig.tar.bz2", "source": "zlib",
             "sha256": "71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1",
             "urls": ["http://deb.debian.org/debian/pool/main/z/zlib/"]},
    "libffi": {"file": "libffi_3.4.4.orig.tar.gz", "source": "libffi",
               "sha256": "d66c56ad259a82cf2a9dfc408b32bf5da52371500b84745f7fb8b645712df676",
               "urls": ["http://deb.debian.org/debian/pool/main/libf/libffi/"]},
}
SDISTS = {
    "cffi": {"version": "2.0.0", "file": "cffi-2.0.0.tar.gz",
             "sha256": "44d1b5909021139fe36001ae048dbdde8214afa20200eda0f64c068cac5d5529"},
    "zstandard": {"version": "0.25.0", "file": "zstandard-0.25.0.tar.gz",
                  "sha256": "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b"},
    "nuitka": {"version": "4.3.3", "file": "nuitka-4.3.3.tar.gz",
               "sha256": "3bed65735d5cfc53dc13070f9f17c52dbe584c0f03de32b6ef011f5db674add9"},
}
KERNEL_HEADER_DIRS = ["linux", "asm-generic", "mtd", "rdma", "sound", "video", "misc", "xen"]
STATIC_CFLAGS = "-Os"
# The C of CPython, its built-in modules and Nuitka's output carry no unwind tables (.eh_frame, 0.47 MB with its
# index): nothing is C++, nothing throws, and the one forced unwind, pthread_exit (CPython ends a thread that
# wakes during finalization with it), stops at the first frame without a table and jumps straight to the
# thread's start, which is all it needs (uClibc-ng's unwind_stop; tests/test_binary.py's thread tests).
# uClibc-ng and libgcc keep theirs: pthread_exit unwinds through them.
NO_UNWIND_CFLAGS = "-fno-asynchronous-unwind-tables -fno-unwind-tables"
PYTHON_CFLAGS = f"{STATIC_CFLAGS} {NO_UNWIND_CFLAGS}"
# zlib is where saving spends its time (deflate of every byte saved): built as Debian builds it (-O3, UNALIGNED_OK:
# x86 loads unaligned 16-bit words in longest_match), which costs ~30 KB and matches the distribution's zlib; at -Os
# saving ran at 0.87x the package, at -O2 0.92x (tests/bench/bench_binary.py).
ZLIB_CFLAGS = "-O3 -DUNALIGNED_OK"
PYTHON_CONFIGURE = [
    "--disable-shared", "--without-ensurepip", "--without-doc-strings", "--disable-test-modules",
    "--with-builtin-hashlib-hashes=md5,sha1,sha256,sha512,sha3,blake2",
    "--without-readline",
]
# Modules configure would otherwise hand to setup.py to build as shared objects (which a static interpreter
# cannot load): marked n/a. Everything wanted is a built-in from csrc/static/Setup.local.
PYTHON_NA_MODULES = [
    "_asyncio", "_bz2", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp", "_codecs_kr",
    "_codecs_tw", "_crypt", "_csv", "_ctypes_test", "_curses", "_curses_panel", "_dbm", "_decimal",
    "_elementtree", "_gdbm", "_hashlib", "_lsprof", "_lzma", "_multibytecodec", "_scproxy", "_sqlite3",
    "_ssl", "_statistics", "_testbuffer", "_testcapi", "_testclinic", "_testimportmultiple",
    "_testinternalcapi", "_testmultiphase", "_tkinter", "_uuid", "_xxsubinterpreters", "_xxtestfuzz",
    "_zoneinfo", "audioop", "cmath", "nis", "ossaudiodev", "readline", "spwd", "syslog", "xxlimited",
    "xxlimited_35",
]
# The stdlib the agent never imports: Nuitka does not follow these (smaller binary, faster compile).
NUITKA_NOFOLLOW = [
    "agent._linux", "zstandard.backend_cffi", "zstandard.backend_rust", "cffi",
    "unittest", "pydoc", "doctest", "pdb", "http.server", "xmlrpc", "xml", "tkinter", "asyncio",
    "distutils", "lib2to3", "idlelib", "test", "sqlite3", "ctypes", "multiprocessing", "setuptools",
    "pip", "curses", "dbm", "ensurepip", "venv", "turtle", "turtledemo", "pydoc_data", "zoneinfo",
    "lzma", "bz2", "decimal", "_pydecimal", "statistics", "tomllib", "wsgiref", "concurrent.futures.process",
    "mailbox", "imaplib", "smtplib", "poplib", "nntplib", "ftplib", "telnetlib", "cgi", "cgitb",
    "sndhdr", "imghdr", "audioop", "chunk", "wave", "aifc", "sunau", "tabnanny", "trace", "profile",
    "cProfile", "pstats", "timeit", "code", "codeop", "pickletools", "zipapp", "pyclbr", "filecmp",
    # Nuitka's standalone mode also carries every stdlib module it finds (as bytecode) in case of a dynamic
    # import; these are reached by no import of the agent (from its --report: closure of the import graph),
    # or only by paths it never takes (shutil's archive functions, Logger.__reduce__, warnings' tracemalloc).
    "__hello__", "__phello__", "_aix_support", "_bootsubprocess", "_markupbase", "_osx_support", "_pyio",
    "_sitebuiltins", "_strptime", "_sysconfigdata__linux_x86_64-linux-gnu", "base64", "calendar", "cmd",
    "colorsys", "configparser", "contextvars", "datetime", "difflib",
    "fileinput", "getopt",
    "glob", "graphlib", "html", "imp", "importlib.abc", "importlib.readers", "importlib.resources",
    "importlib.simple", "mailcap", "mimetypes", "modulefinder", "netrc", "nturl2path", "numbers", "pipes",
    "pkgutil", "pprint", "rlcompleter", "sched", "socketserver", "sre_compile", "sre_constants", "sre_parse",
    "stringprep", "symtable", "sysconfig", "uu", "webbrowser", "xdrlib",
    "tarfile", "zipfile", "gzip", "_compression", "pickle", "_compat_pickle", "tracemalloc",
    # inspect and what only it imports (ast, dis, opcode): dataclasses writes no signature doc-strings with doc
    # strings off (cpython-dataclasses-lazy-inspect.patch), Nuitka's start-up no longer asks for it
    # (nuitka-no-inspect-at-startup.patch), and traceback draws no carets without column tables.
    "inspect", "ast", "dis", "opcode",
]
# Agent modules carried as bytecode instead of compiled to C (a fifth to a tenth of the size): all but the
# per-packet frisbee code and the worker pool. Imaging and saving run Python once per 1 MiB chunk or 64 KiB
# piece, the bytes themselves go through zlib/zstd/pwrite in C, so compiling that code buys nothing measurable.
NUITKA_BYTECODE = ["agent.cli", "agent.kexec", "agent.fs", "agent.linux", "agent.linux_files", "agent.netif",
                   "agent.demo", "agent.info", "agent.errors", "agent.resources", "agent._embedded", "agent.progress",
                   "agent.ndz.header", "agent.ndz.chunker", "agent.ndz.coverage", "agent.io.target",
                   "agent.io.sources", "agent.io.image", "agent.io.save", "agent.http", "agent.io.http_source",
                   "agent.io.net_sinks", "agent.io.receive", "agent.ndz.sequence"]
# The environment Nuitka runs in (CCFLAGS: added to its compiler flags). PYTHONNODEBUGRANGES: the code objects Nuitka compiles (and marshals into the
# bytecode blob) carry line numbers but not 3.11's column ranges (PEP 657's carets in tracebacks, which a binary
# without its sources cannot show anyway).
NUITKA_ENV = {"PYTHONNODEBUGRANGES": "1", "CCFLAGS": NO_UNWIND_CFLAGS}
EMBEDDED_FILES = ["kexec/purgatory.bin", "demo/demo.ndz", "demo/demo.json"]

# The files of csrc/static each stage hashes into its key.
SYSROOT_FILES = ["uclibc.config", "uclibc-static-libdl.patch", "dl_find_object.c", "uclibc-gcc.sh",
                 "uclibc-gcc.specs"]


PYTHON_FILES = ["Setup.local", "zstd_backend_c.c", "agent_linux.c", "agent_linux_c.c", "agent_linux_prelude.h"]
CPYTHON_PATCHES = ["cpython-ctypes-no-dlopen-null.patch", "cpython-idna-lazy-nameprep.patch",
                   "cpython-dataclasses-lazy-inspect.patch", "cpython-frozen-bootstrap-only.patch",
                   "cpython-frozen-bootstrap-marshal.patch", "cpython-runtime-init-once.patch",
                   "cpython-freeze-no-column-tables.patch"]
NUITKA_PATCHES = ["nuitka-safestrings-uclibc.patch", "nuitka-profiling-no-dlopen.patch",
                  "nuitka-no-inspect-at-startup.patch"]
AGENT_C_INPUTS = [CSRC / "linux_cdef.h", CSRC / "linux.h", CSRC / "linux.c"]
# The built-in modules linked into dist/nodeagent (a subset of Setup.local; the interpreter that runs Nuitka
# has them all). Besides these, CPython's Setup.bootstrap modules are always in.
STATIC_AGENT_MODULES = [
    "array", "_bisect", "_heapq", "_json", "_queue", "_random", "_struct", "_typing", "math", "zlib", "_md5",
    "_sha1", "_sha256", "_sha512", "_sha3", "_blake2", "fcntl", "grp", "_posixsubprocess", "select", "_socket",
    "_cffi_backend", "_zstd_backend_c", "_agent_linux",
]

# The codecs the static interpreter keeps (Lib/encodings/<name>.py): Unicode, ASCII/Latin-1, the escapes, IDNA
# (every host name lookup uses it) and the C locale's fallbacks. No legacy code pages.
STATIC_ENCODINGS = [
    "__init__", "aliases", "ascii", "latin_1", "utf_8", "utf_8_sig", "utf_7", "utf_16", "utf_16_be", "utf_16_le",
    "utf_32", "utf_32_be", "utf_32_le", "charmap", "raw_unicode_escape", "unicode_escape", "idna", "punycode",
    "undefined", "cp437",
]

# Host tools the static build runs (command -> Debian package). Missing ones are installed with apt-get when
# running as root (the build needs root anyway only for that), else named.
STATIC_HOST_TOOLS = {"gcc": "gcc", "make": "make", "patch": "patch", "ar": "binutils", "strip": "binutils",
                     "tar": "tar", "xz": "xz-utils", "bzip2": "bzip2", "patchelf": "patchelf",
                     "dpkg-deb": "dpkg", "apt-get": "apt"}

