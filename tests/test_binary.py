"""The static executable itself (run with --nodeagent dist/nodeagent; CI does, after `python build.py static`):
linked statically, needs no file, no environment and no /tmp."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, needs_root


@pytest.fixture(scope="module")
def binary(cli_command) -> str:
    if len(cli_command) != 1:  # python -m agent
        pytest.skip("no --nodeagent binary given (CI builds one and passes it)")
    return cli_command[0]


def test_file_says_statically_linked(binary):
    if not shutil.which("file"):
        pytest.skip("no file(1)")
    out = subprocess.run(["file", "-L", binary], capture_output=True, text=True, check=True).stdout
    assert "ELF 64-bit" in out and "x86-64" in out
    assert "statically linked" in out or "static-pie linked" in out, out
    assert "not stripped" not in out, out


def test_ldd_says_not_dynamic(binary):
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "not a dynamic executable" in proc.stdout + proc.stderr


@needs_root
def test_runs_with_empty_environment_and_empty_tmp(binary):
    """In a private mount namespace with a fresh, empty tmpfs on /tmp and no environment at all: the binary restores
    the bundled demo (its image is carried inside the binary), reads an image, and leaves /tmp empty (no
    self-extraction). Its work folder is outside /tmp, which the fresh tmpfs hides."""
    work = Path(tempfile.mkdtemp(prefix="nodeagent-envi-", dir="/var/tmp"))
    try:
        # copies beside the work folder: the checkout itself may live under /tmp (and the copy shows that the
        # binary needs nothing from where it was built)
        exe = work / "nodeagent"
        shutil.copy2(binary, exe)
        image = work / "fsA-fsaware-v3.ndz"
        shutil.copyfile(ROOT / "tests" / "fixtures" / "imagezip" / image.name, image)
        script = (
            "set -e; mount -t tmpfs none /tmp; cd /; "
            f"env -i {exe} demo {work}/demo > {work}/out 2>&1; "
            f"env -i {exe} info {image} >> {work}/out 2>&1; "
            f"ls -A /tmp > {work}/tmp-listing"
        )
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                              text=True, timeout=300)
        out = (work / "out").read_text() if (work / "out").exists() else ""
        assert proc.returncode == 0, proc.stderr + out
        assert "demo OK" in out
        assert "fsA-fsaware-v3.ndz" in out and "chunk" in out
        assert (work / "tmp-listing").read_text() == ""
        assert (work / "demo" / "disk.img").stat().st_size == 48 << 20
    finally:
        shutil.rmtree(work, ignore_errors=True)
