"""The static build's sources: Debian's archive (pinned pool URL + sha256, else `apt-get source` with a throw-away
apt configuration) and PyPI (`pip download`), cached in <cache>/static/downloads; unpacking and patching."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .pins import DEBIAN_TARBALLS, SDISTS, UCLIBC_DEB, UCLIBC_TARBALL
from .stagecache import BuildLog, StaticBuildError, sha256_file, static_cache_root



def downloads() -> Path:
    path = static_cache_root() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def place(tmp: Path, dest: Path, sha256: str, what: str) -> Path:
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink()
        raise StaticBuildError(f"{what}: sha256 {got}, expected {sha256}")
    tmp.rename(dest)
    return dest


def fetch_debian_tarball(name: str, log: BuildLog) -> Path:
    """A Debian .orig tarball: from its pinned pool URL, else through `apt-get source --download-only` with a
    throw-away apt configuration (deb-src lines of its own; /etc/apt is not touched). sha256 checked."""
    import tempfile
    import urllib.request

    spec = DEBIAN_TARBALLS[name]
    dest = downloads() / spec["file"]
    if verified(dest, spec["sha256"]):
        return dest
    part = dest.with_suffix(dest.suffix + ".part")
    for base in spec["urls"]:
        try:
            log.note(f"download {base}{spec['file']}")
            with urllib.request.urlopen(base + spec["file"], timeout=60) as resp, open(part, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
            return place(part, dest, spec["sha256"], spec["file"])
        except (OSError, StaticBuildError) as err:
            log.note(f"  failed: {err}")
    log.note(f"apt-get source --download-only {spec['source']} (temporary apt configuration)")
    with tempfile.TemporaryDirectory(prefix="nodeagent-apt-") as t:
        t = Path(t)
        for sub in ("lists/partial", "cache/archives/partial", "work"):
            (t / sub).mkdir(parents=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (t / "sources.list").write_text(
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian bookworm main\n"
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian bookworm-updates main\n"
            f"deb-src [signed-by={keyring}] http://deb.debian.org/debian-security bookworm-security main\n")
        opts = [f"-oDir::Etc::SourceList={t / 'sources.list'}", "-oDir::Etc::SourceParts=/nonexistent",
                f"-oDir::State::Lists={t / 'lists'}", f"-oDir::Cache={t / 'cache'}",
                "-oAPT::Sandbox::User=root"]
        log.run(["apt-get", *opts, "update"])
        log.run(["apt-get", *opts, "source", "--download-only", spec["source"]], cwd=t / "work")
        got = t / "work" / spec["file"]
        if not got.is_file():
            raise StaticBuildError(f"apt-get source {spec['source']} brought no {spec['file']}")
        import shutil

        shutil.copyfile(got, part)
    return place(part, dest, spec["sha256"], spec["file"])


def fetch_uclibc(log: BuildLog) -> Path:
    """uClibc-ng's tarball from Debian's uclibc-source .deb (apt-get download + dpkg-deb -x, not installed)."""
    import shutil
    import tempfile

    dest = downloads() / Path(UCLIBC_TARBALL["member"]).name
    if verified(dest, UCLIBC_TARBALL["sha256"]):
        return dest
    pkg = f"{UCLIBC_DEB['package']}={UCLIBC_DEB['version']}"
    with tempfile.TemporaryDirectory(prefix="nodeagent-uclibc-") as t:
        t = Path(t)
        os.chmod(t, 0o755)
        try:
            log.run(["apt-get", "-oAPT::Sandbox::User=root", "download", pkg], cwd=t)
        except StaticBuildError:
            log.run(["apt-get", "update"])
            log.run(["apt-get", "-oAPT::Sandbox::User=root", "download", pkg], cwd=t)
        deb = next(t.glob("*.deb"))
        if sha256_file(deb) != UCLIBC_DEB["sha256"]:
            raise StaticBuildError(f"{deb.name}: unexpected sha256")
        log.run(["dpkg-deb", "-x", deb, t / "x"])
        shutil.copyfile(t / "x" / UCLIBC_TARBALL["member"], dest.with_suffix(".part"))
    return place(dest.with_suffix(".part"), dest, UCLIBC_TARBALL["sha256"], dest.name)


def fetch_sdist(name: str, log: BuildLog) -> Path:
    spec = SDISTS[name]
    dest = downloads() / spec["file"]
    if verified(dest, spec["sha256"]):
        return dest
    log.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "-d", downloads(), f"{name}=={spec['version']}"])
    if not verified(dest, spec["sha256"]):
        raise StaticBuildError(f"{spec['file']}: missing or unexpected sha256 after pip download")
    return dest


def extract(tarball: Path, into: Path, log: BuildLog) -> Path:
    """Unpack a tarball with one top folder into `into`; returns that folder."""
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    log.run(["tar", "-xf", tarball, "-C", into])
    new = [p for p in into.iterdir() if p not in before]
    if len(new) != 1 or not new[0].is_dir():
        raise StaticBuildError(f"{tarball.name}: expected one top-level folder, got {new}")
    return new[0]


def apply_patch(patch: Path, tree: Path, log: BuildLog) -> None:
    log.run(["patch", "-p1", "--forward", "--batch", "-i", patch], cwd=tree)


def linux_libc_dev_version() -> str:
    import subprocess

    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", "linux-libc-dev"],
                          capture_output=True, text=True).stdout.strip() or "unknown"


def host_gcc_version() -> str:
    import subprocess

    return subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()

