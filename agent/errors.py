"""The failure kinds of nodeagent: one exception type per kind, each with a stable exit status and a `kind` word.

The CLI prints str(err) on one line and exits with `exit_status`; the init, the shell and the controller protocol
carry `kind`, so a controller can tell a bad image from a disk too small or a dead server without parsing text.
The table (README "Exit statuses") is stable: add new kinds, never renumber.

| status | kind             | type                  | meaning                                                       |
|-------:|------------------|-----------------------|---------------------------------------------------------------|
|      0 |                  |                       | complete success                                              |
|      1 | internal         | (any other exception) | a bug: one line (the traceback with NODEAGENT_DEBUG=1)        |
|      2 | usage            | UsageError            | bad command line, kernel command line key or value            |
|      3 | image            | ImageFormatError      | the image is malformed, truncated or unsupported              |
|      4 | checksum         | ChecksumError         | a digest (--sha256, a chunk's) does not match                 |
|      5 | source           | SourceError           | the image source is missing, unreadable or ended early        |
|      6 | network          | NetworkError          | a server is unreachable, silent past -T, or answers an error  |
|      7 | target-too-small | TargetTooSmallError   | the disk or file cannot hold the image                        |
|      8 | target-busy      | TargetBusyError       | the disk is mounted, swap, held, or opened exclusively        |
|      9 | target           | TargetError           | the disk or file cannot be written                            |
|     10 | filesystem       | FilesystemError       | a partition table or filesystem being saved is inconsistent   |
|     11 | destination      | DestinationError      | a saved image cannot be written where it was asked to go      |
|     12 | kexec            | KexecError            | a kernel cannot be loaded or booted with kexec                |
|     13 | system           | LinuxError            | a syscall, ioctl or kernel interface failed otherwise         |
|     98 | address-in-use   | AddressInUseError     | the port is taken (as frisbeed's exit status)                 |
|    130 | interrupted      | (KeyboardInterrupt)   | Ctrl-C / SIGINT                                               |
"""


class NodeagentError(Exception):
    """Base class: anything the user or the world can cause. The CLI prints str(err) on one line."""

    exit_status = 1
    kind = "internal"


class UsageError(NodeagentError):
    """A bad command line (flags, arguments) or kernel command line key/value."""

    exit_status = 2
    kind = "usage"


class ImageFormatError(NodeagentError):
    """An .ndz image (or a chunk of one) is malformed, truncated or unsupported."""

    exit_status = 3
    kind = "image"


class ChecksumError(NodeagentError):
    """A digest does not match what was asked for (e.g. --sha256)."""

    exit_status = 4
    kind = "checksum"


class SourceError(NodeagentError):
    """The image source (file, stdin) is missing, unreadable or ended early."""

    exit_status = 5
    kind = "source"


class NetworkError(NodeagentError):
    """A server or peer is unreachable, went silent past the timeout, or answered with an error."""

    exit_status = 6
    kind = "network"


class TargetError(NodeagentError):
    """The disk or file being written cannot be written (missing, read-only, I/O error)."""

    exit_status = 9
    kind = "target"


class TargetTooSmallError(TargetError):
    """The disk or file being written is smaller than the image needs."""

    exit_status = 7
    kind = "target-too-small"


class TargetBusyError(TargetError):
    """The disk being written is mounted, used as swap, held by md/dm, or refused O_EXCL."""

    exit_status = 8
    kind = "target-busy"


class FilesystemError(NodeagentError):
    """A partition table or filesystem on a disk being saved is inconsistent."""

    exit_status = 10
    kind = "filesystem"


class DestinationError(NodeagentError):
    """A saved image cannot be written to its destination (file, directory, stdout)."""

    exit_status = 11
    kind = "destination"


class KexecError(NodeagentError):
    """A kernel cannot be loaded or executed with kexec (not a bzImage, no room, refused by the kernel)."""

    exit_status = 12
    kind = "kexec"


class LinuxError(NodeagentError):
    """A Linux syscall or ioctl failed; carries errno."""

    exit_status = 13
    kind = "system"

    def __init__(self, errno: int, what: str):
        import os

        self.errno = errno
        super().__init__(f"{what}: {os.strerror(errno)}")


class AddressInUseError(NetworkError):
    """The address and port to listen on are taken (exit 98, as frisbeed)."""

    exit_status = 98
    kind = "address-in-use"
