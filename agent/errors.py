"""The few exception types the CLI turns into one-line messages and a non-zero exit."""


class NodeagentError(Exception):
    """Base class: anything the user can cause. The CLI prints str(err) on one line."""

    exit_status = 1


class ImageFormatError(NodeagentError):
    """An .ndz image (or a chunk of one) is malformed, truncated or unsupported."""


class FilesystemError(NodeagentError):
    """A partition table or filesystem on a disk being saved is inconsistent."""


class TargetError(NodeagentError):
    """The disk or file being written cannot take the image (too small, mounted, unwritable)."""


class SourceError(NodeagentError):
    """The image source (file, stdin, network) failed or ended early."""


class LinuxError(NodeagentError):
    """A Linux syscall or ioctl failed; carries errno."""

    def __init__(self, errno: int, what: str):
        import os

        self.errno = errno
        super().__init__(f"{what}: {os.strerror(errno)}")
