"""What a command reports on stderr: progress (one updating line on a TTY, a line every few seconds on a serial
console), warnings, and the one final failure line.

Non-TTY lines keep frisbee's `Progress: N%` form at their start, which controllers (OMF, rhubarbe) parse. Warnings
read `nodeagent CMD: warning: ...`, a failure `nodeagent CMD: ...` (its kind, agent/errors.py, is kept in
`failure_kind` and becomes the exit status).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MiB = 1 << 20


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Report `done` out of `total` bytes (total may be unknown: 0)."""

    def __init__(
        self,
        what: str,
        total: int = 0,
        stream: TextIO | None = None,
        interval: float | None = None,
        quiet: bool = False,
        clock=time.monotonic,
        command: str = "",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.what = what
        self.total = total
        self.quiet = quiet
        self.clock = clock
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.started = clock()
        self._last = self.started
        self.done = 0
        self.fraction: float | None = None
        self.prefix = f"nodeagent {command}: " if command else "nodeagent: "
        self.failure_kind: str | None = None
        self.note = None  # optional callable: a few more words for the line (a receiver's drop count)

    def line(self) -> str:
        text = self._line()
        extra = self.note() if self.note is not None else ""
        return f"{text}, {extra}" if extra else text

    def _line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed / MiB
        if self.fraction is not None:  # progress known in other units (chunks of a network transfer)
            pct = min(100, int(self.fraction * 100))
            left = elapsed * (1 - self.fraction) / self.fraction if self.fraction else 0
            return (
                f"Progress: {pct}% {self.what} {self.done / MiB:.1f} MiB, {rate:.1f} MiB/s, "
                f"{_eta(elapsed)} elapsed, ETA {_eta(left)}"
            )
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            left = (self.total - self.done) / (self.done / elapsed) if self.done else 0
            return (
                f"Progress: {pct}% {self.what} {self.done / MiB:.1f} of {self.total / MiB:.1f} MiB, "
                f"{rate:.1f} MiB/s, {_eta(elapsed)} elapsed, ETA {_eta(left)}"
            )
        return f"Progress: {self.what} {self.done / MiB:.1f} MiB, {rate:.1f} MiB/s, {_eta(elapsed)} elapsed"

    def update(self, done: int, fraction: float | None = None) -> None:
        """`done` bytes so far; `fraction` of the whole when the total is known in other units."""
        self.done = done
        self.fraction = fraction
        now = self.clock()
        if self.quiet or now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        """Replace the progress line by a final summary (printed even when quiet is off only)."""
        if self.tty and not self.quiet:
            self.stream.write("\r\x1b[K")
        if not self.quiet:
            elapsed = max(self.clock() - self.started, 1e-9)
            self.stream.write(f"{summary} in {elapsed:.1f} s ({self.done / elapsed / MiB:.1f} MiB/s)\n")
            self.stream.flush()

    def _own_line(self, text: str) -> None:
        """A line of its own, also when quiet; on a TTY the progress line is cleared first."""
        if self.tty and not self.quiet:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def warn(self, message: str) -> None:
        self._own_line(f"{self.prefix}warning: {message}")

    def fail(self, err: BaseException) -> int:
        """The final failure line for `err`; records its kind and returns its exit status (agent/errors.py)."""
        from .errors import NodeagentError

        if isinstance(err, NodeagentError):
            message, self.failure_kind, status = " ".join(str(err).splitlines()), err.kind, err.exit_status
        elif isinstance(err, KeyboardInterrupt):
            message, self.failure_kind, status = "interrupted", "interrupted", 130
        else:
            detail = " ".join(str(err).split())
            message = f"internal error: {type(err).__name__}{': ' + detail if detail else ''}"
            self.failure_kind, status = "internal", 1
        self._own_line(f"{self.prefix}{message}")
        return status
