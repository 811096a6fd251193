"""http:// and tcp:// URLs: split into host, port and request target; resolve a redirect's Location. Pure."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import UsageError


class Url(NamedTuple):
    scheme: str  # "http" or "tcp"
    host: str  # without brackets for IPv6 literals
    port: int
    target: str  # path and query, starting with "/" ("" for tcp)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.scheme == "http" and self.port == 80
        return host if default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def parse(text: str) -> Url:
    """http://HOST[:PORT][/PATH] or tcp://HOST:PORT. Raises UsageError naming the URL."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "tcp"):
        if scheme == "https":
            raise UsageError(f"{text}: HTTPS is not supported (the image's digest, --sha256, gives integrity)")
        raise UsageError(f"{text}: expected http://HOST[:PORT]/PATH or tcp://HOST:PORT")
    if any(c <= " " or c == "\x7f" for c in text):
        raise UsageError(f"{text}: spaces or control characters in the URL")
    slash = rest.find("/")
    authority, target = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if "@" in authority:
        raise UsageError(f"{text}: user names and passwords in URLs are not supported")
    if authority.startswith("["):
        host, close, tail = authority[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise UsageError(f"{text}: bad IPv6 address")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise UsageError(f"{text}: no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"{text}: bad port {port_text!r}")
        port = int(port_text)
    elif scheme == "http":
        port = 80
    else:
        raise UsageError(f"{text}: expected tcp://HOST:PORT")
    if scheme == "tcp":
        if target not in ("", "/"):
            raise UsageError(f"{text}: a tcp:// URL has no path")
        target = ""
    else:
        target = (target or "/").split("#", 1)[0]
    return Url(scheme, host, port, target)


def resolve(base: Url, location: str) -> Url:
    """Where a redirect's Location points, relative to the URL that answered it."""
    if "://" in location:
        return parse(location)
    if location.startswith("//"):
        return parse(f"{base.scheme}:{location}")
    if location.startswith("/"):
        return base._replace(target=location.split("#", 1)[0])
    path = base.target.split("?", 1)[0]
    return base._replace(target=path[: path.rfind("/") + 1] + location.split("#", 1)[0])
