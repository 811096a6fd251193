"""The `nodeagent` command: parse arguments, call a library function, turn errors into one line and an exit status
(agent/errors.py: one status per kind of failure; anything else is an internal error, exit 1).

Flags follow the tools nodeagent replaces: imageunzip/frisbee for `image`, imagezip for `save`, imagedump for `info`,
kexec-tools for `kexec`; like theirs (getopt permutes), flags may come before, between or after the positionals.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import __version__
from .errors import NodeagentError, UsageError

MiB = 1 << 20
MAX_SECONDS = 10**7  # about 115 days: past this a time flag is a typo, and select() would overflow


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes flags anywhere among the positionals, as getopt does.

    argparse's parse_intermixed_args does not work through subparsers (the top parser calls the subcommand's
    parse_known_args), so the subcommand's parser makes its own parse_known_args intermixed; the two passes
    parse_known_intermixed_args makes inside go to the ordinary one."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, not {text!r}")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"seconds are a number from 0 to {MAX_SECONDS}, not {text!r}")
    return value


def _count(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, not {text!r}")
        return value

    return parse


def _frisbee_address(spec: str) -> tuple[str, int]:
    """ADDR:PORT of a frisbee://ADDR:PORT source."""
    host, _, port = spec[len("frisbee://") :].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{spec}: expected frisbee://ADDR:PORT (PORT 1..65535)")
    return host, int(port)


def _image_source(args, progress):
    """SOURCE from the positional arguments or frisbee's -m/-p flags; returns (source, target path)."""
    from .io.sources import open_source

    paths = args.paths
    if args.mcast_addr is not None or args.port is not None:
        if args.mcast_addr is None or args.port is None or len(paths) != 1:
            raise UsageError("with -m ADDR -p PORT give only TARGET")
        addr, port = args.mcast_addr, args.port
    elif len(paths) != 2:
        raise UsageError("expected SOURCE TARGET (an .ndz file, -, or frisbee://ADDR:PORT)")
    elif paths[0].startswith("frisbee://"):
        addr, port = _frisbee_address(paths[0])
    elif paths[0].lower().startswith(("http://", "https://")):
        from .io.http_source import HttpSource

        # Cuts, retries and restarts are warnings: said even with -q.
        return HttpSource(paths[0], idle_timeout=args.timeout, sha256=args.sha256, warn=progress.warn), paths[1]
    else:
        return open_source(paths[0]), paths[1]
    from .frisbee.receive import FrisbeeSource

    source = FrisbeeSource(
        addr, port, ifaddr=args.ifaddr, broadcast=args.broadcast, idle_timeout=args.timeout, memory_mb=args.memory,
        progress=progress,  # what has been written goes into the answers to the server's PROGRESS requests
    )
    return source, paths[-1]


def _image(args) -> int:
    from .io.image import restore
    from .io.target import Target

    progress = args.progress
    source, target_path = _image_source(args, progress)
    if getattr(source, "drops", None) is not None:  # a frisbee receiver: a slow disk or small buffer shows here
        progress.note = lambda: f"{source.drops} dropped"
    try:
        target = Target(target_path, force=args.force)
    except BaseException:
        source.close()
        raise
    failed = True
    try:
        result = restore(source, target, zero=args.zero, progress=progress)
        failed = False
    finally:
        target.close(failed=failed)
        source.close()
    zeroed = f", {result.zeroed_bytes / MiB:.1f} MiB zeroed" if args.zero else ""
    dropped = f", {source.drops} datagrams dropped by the full receive buffer" if progress.note else ""
    progress.finish(
        f"Wrote {result.data_bytes / MiB:.1f} MiB from {result.chunks} chunks to {target_path}{zeroed}{dropped}"
    )
    return 0


def _save(args) -> int:
    from .io.save import save

    codec = "zstd" if args.zstd else "zlib"
    if args.level is not None:
        lo, hi = (0, 9) if codec == "zlib" else (1, 22)
        if not lo <= args.level <= hi:
            raise UsageError(f"{codec} level must be {lo}..{hi}, not {args.level}")
    progress = args.progress
    result = save(args.disk, args.dest, codec=codec, level=args.level, raw=args.raw, v5=args.v5, progress=progress)
    if not args.quiet:
        for part in result.map.parts:
            print(
                f"  {'partition ' + str(part.index) if part.index else 'whole disk'}: {part.kind}, "
                f"sectors {part.start}-{part.start + part.count - 1}, "
                f"{part.allocated * 512 / MiB:.1f} of {part.count * 512 / MiB:.1f} MiB imaged",
                file=sys.stderr,
            )
    progress.finish(
        f"Saved {result.data_bytes / MiB:.1f} MiB of {result.disk_bytes / MiB:.1f} MiB ({result.map.scheme}) "
        f"into {result.chunks} V{result.version} {result.codec} chunks, {result.image_bytes / MiB:.1f} MiB"
    )
    return 0


def _receive(args) -> int:
    from .io.receive import receive

    def log(msg: str) -> None:
        print(f"nodeagent receive: {msg}", file=sys.stderr, flush=True)

    result = receive(
        args.file, args.client, args.port, ifaddr=args.ifaddr, timeout=args.timeout, idle=args.idle,
        max_size=args.max_size, check=args.check, force=args.force, log=log,
    )
    print(
        f"Received {result.chunks} chunks ({result.image_bytes / MiB:.1f} MiB, {result.data_bytes / MiB:.1f} MiB of "
        f"data{', all inflated' if args.check else ''}) from {args.client} into {args.file} in {result.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def _serve(args) -> int:
    from .frisbee.serve import serve

    serve(
        args.file, args.mcast_addr, args.port, ifaddr=args.ifaddr, broadcast=args.broadcast,
        bandwidth=args.bandwidth, idle_timeout=args.timeout,
    )
    return 0


def _info(args) -> int:
    from .info import describe

    for line in describe(args.image, regions=args.regions, check=args.check):
        print(line)
    return 0


def _getmac(args) -> int:
    from .netif import macs

    for name, mac in macs(args.iface):
        print(f"{name} {mac}")
    return 0


KEXEC_MODES = {"s": "file", "c": "load", "a": "auto"}  # kexec-tools' -s, -c, -a


def _kexec(args) -> int:
    from .kexec import load

    def say(msg: str) -> None:
        print(f"nodeagent kexec: {msg}", flush=True)

    actions = [a for a in (args.load, args.disk) if a is not None]
    if len(actions) > 1:
        raise UsageError("give either -l KERNEL or --disk DEVICE, not both")
    if not actions and not args.exec and not args.unload:
        raise UsageError("nothing to do: give -l KERNEL, --disk DEVICE, -e or -u")
    if args.unload and (actions or args.exec):
        raise UsageError("-u unloads: give it alone")
    if args.disk is not None and args.initrd is not None:
        raise UsageError("--initrd goes with -l KERNEL; --disk finds the initrd itself")
    if args.unload:
        load.unload()
        say("unloaded")
        return 0
    if actions:
        kernel, initrd = args.load, args.initrd
        cmdline = load.kexec_cmdline(args.append, args.reuse_cmdline)
        if args.disk is not None:
            kernel, initrd, found_cmdline, what = load.find_on_disk(args.disk)
            say(f"found {what}")
            if args.append is None and not args.reuse_cmdline:
                cmdline = found_cmdline
        load.load_kernel(kernel, initrd, cmdline, KEXEC_MODES[args.syscall], report=say)
    if args.exec:
        say("starting the loaded kernel")
        load.execute()
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent", description="Orbit-PXE-3 node agent: image and save disks in Emulab .ndz format."
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)
    sub.required = True

    p = sub.add_parser(
        "image",
        help="write an .ndz image to a disk or file (like imageunzip / frisbee)",
        usage="nodeagent image [flags] SOURCE TARGET | nodeagent image [flags] -m ADDR -p PORT TARGET",
    )
    p.add_argument(
        "paths", nargs="+", metavar="SOURCE TARGET",
        help="SOURCE: an .ndz file, - for stdin, frisbee://ADDR:PORT or http://HOST[:PORT]/PATH; TARGET: a block device or regular file",
    )
    p.add_argument("-m", dest="mcast_addr", metavar="ADDR", help="frisbee server: multicast group, broadcast or server address")
    p.add_argument("-p", dest="port", type=_port, metavar="PORT", help="frisbee port")
    p.add_argument("-i", dest="ifaddr", metavar="IFADDR", help="frisbee: address of the interface to use")
    p.add_argument("-b", dest="broadcast", action="store_true", help="frisbee: broadcast instead of multicast")
    p.add_argument("-T", dest="timeout", type=_seconds, default=0, metavar="S",
                   help="frisbee, http: give up after S seconds without progress (default 0: wait forever)")
    p.add_argument("--sha256", metavar="HEX", help="http: the image's SHA-256, checked while streaming "
                   "(default: URL.sha256 when the server has one)")
    p.add_argument("-M", dest="memory", type=_count(1, 1 << 20), default=32, metavar="MB", help="frisbee: memory for chunk buffers (default 32)")
    p.add_argument("-z", "--zero", action="store_true", help="fill free space with zeros (imageunzip -z)")
    p.add_argument("--force", action="store_true", help="write even if the target is mounted or in use")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_image)

    p = sub.add_parser("save", help="save a disk as an .ndz image, skipping free blocks (like imagezip)")
    p.add_argument("disk", metavar="DISK", help="a block device or disk image file")
    p.add_argument("dest", metavar="DEST", help="the .ndz file to write, - for stdout, tcp://HOST:PORT (one byte "
                   "stream, as frisupload) or http://HOST[:PORT]/PATH (PUT, chunked)")
    p.add_argument("-z", "--level", type=int, metavar="N", help="compression level (zlib 0-9, default 4; zstd 1-22, default 3)")
    p.add_argument("-r", "--raw", action="store_true", help="image every sector, ignoring filesystems")
    p.add_argument("--zstd", action="store_true", help="zstd chunks (nodeagent extension: faster, not readable by imageunzip)")
    p.add_argument("--v5", action="store_true", help="version 5 chunks (64-bit sectors, image id) even for small disks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_save)

    p = sub.add_parser("receive", help="receive one image upload over TCP, kept only if whole (like frisuploadd)")
    p.add_argument("file", metavar="FILE", help="where to keep the image (written as FILE.part until complete)")
    p.add_argument("-m", dest="client", metavar="CLIENT", required=True, help="the address allowed to upload")
    p.add_argument("-p", dest="port", type=_port, metavar="PORT", required=True, help="TCP port to listen on")
    p.add_argument("-i", dest="ifaddr", metavar="IFADDR", help="local address to listen on (default: all)")
    p.add_argument("-T", dest="timeout", type=_seconds, default=0, metavar="S",
                   help="the most seconds the whole upload may take (default 0: no limit)")
    p.add_argument("-I", dest="idle", type=_seconds, default=0, metavar="S",
                   help="the most seconds without data (default 0: no limit)")
    p.add_argument("-s", dest="max_size", type=_count(0, 2**63), default=0, metavar="MAXSIZE",
                   help="the most bytes accepted (default 0: no limit)")
    p.add_argument("-c", "--check", action="store_true", help="also decompress every chunk to verify it")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.set_defaults(run=_receive)

    p = sub.add_parser("serve", help="serve an image (any file) to frisbee clients (like frisbeed)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-m", dest="mcast_addr", metavar="ADDR", required=True, help="multicast group, broadcast, or the client's address")
    p.add_argument("-p", dest="port", type=_port, metavar="PORT", required=True)
    p.add_argument("-i", dest="ifaddr", metavar="IFADDR", help="address of the interface to use")
    p.add_argument("-b", dest="broadcast", action="store_true", help="broadcast instead of multicast")
    p.add_argument("-W", dest="bandwidth", type=_count(0, 10**12), default=None, metavar="BPS",
                   help="bandwidth in bits per second (default as frisbeed, about 73 Mbit/s; 0: unlimited)")
    p.add_argument("-T", dest="timeout", type=_seconds, default=1800, metavar="S",
                   help="exit after S seconds without requests (default 1800; 0: never)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("info", help="describe an .ndz image chunk by chunk (like imagedump)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-r", "--regions", action="store_true", help="list every region")
    p.add_argument("-c", "--check", action="store_true", help="also decompress every chunk to verify it")
    p.set_defaults(run=_info)

    p = sub.add_parser("getmac", help="print the MAC address of an interface, or of every Ethernet interface")
    p.add_argument("iface", metavar="IFACE", nargs="?", help="the interface (default: all but loopback)")
    p.set_defaults(run=_getmac)

    p = sub.add_parser(
        "kexec", help="load a kernel and boot it without a firmware reboot (flags as kexec-tools)",
        usage="nodeagent kexec -l KERNEL [--initrd FILE] [--append S | --command-line S | --reuse-cmdline] "
              "[-s | -c | -a] [-e] | nodeagent kexec --disk DEVICE [-e] | nodeagent kexec -e | nodeagent kexec -u",
    )
    p.add_argument("-l", "--load", metavar="KERNEL", help="load KERNEL (a bzImage) to be started by -e")
    p.add_argument("--disk", metavar="DEVICE", help="load the default boot entry of the OS on DEVICE (grub.cfg, "
                   "else /boot/vmlinuz)")
    p.add_argument("--initrd", "--ramdisk", dest="initrd", metavar="FILE", help="the initramfs for KERNEL")
    p.add_argument("--append", "--command-line", dest="append", metavar="S", help="the new kernel's command line")
    p.add_argument("--reuse-cmdline", action="store_true", help="start from the running kernel's command line")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-s", "--kexec-file-syscall", dest="syscall", action="store_const", const="s",
                     help="load with kexec_file_load only")
    how.add_argument("-c", "--kexec-syscall", dest="syscall", action="store_const", const="c",
                     help="load with kexec_load (our own purgatory)")
    how.add_argument("-a", "--kexec-syscall-auto", dest="syscall", action="store_const", const="a",
                     help="kexec_file_load, falling back to kexec_load (the default)")
    p.add_argument("-e", "--exec", action="store_true", help="start the loaded kernel (after -l/--disk if given)")
    p.add_argument("-u", "--unload", action="store_true", help="unload the loaded kernel")
    p.set_defaults(run=_kexec, syscall="a")

    p = sub.add_parser("demo", help="restore the bundled demo image, verify it, save it again")
    p.add_argument("dir", metavar="DIR", nargs="?", default="nodeagent-demo", help="working folder (default nodeagent-demo)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io.blockfile import plug_standard_fds

    plug_standard_fds()  # before anything is opened: no file may land on a closed stdin/stdout
    args = build_parser().parse_args(argv)
    from . import linux
    from .progress import Progress

    # The one reporter of the run: progress lines, warnings and the final failure line, which carries the kind.
    args.progress = Progress(
        "read" if args.command == "save" else "written", quiet=getattr(args, "quiet", False), command=args.command
    )
    try:
        linux.keep_big_buffers()
        return args.run(args)
    except BrokenPipeError:
        return 141
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get("NODEAGENT_DEBUG") == "1" and not isinstance(err, NodeagentError):
            import traceback

            traceback.print_exc()
        return args.progress.fail(err)


if __name__ == "__main__":
    sys.exit(main())
