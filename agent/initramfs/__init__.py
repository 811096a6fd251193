"""Build initramfs archives for the kernels we kexec. cpio.py writes newc cpio archives, pure."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Where build-host work is kept between runs, outside the checkout: ${NODEAGENT_CACHE:-~/.cache/nodeagent}
    (Debian's kernel, the static build's stages, the VM tests' Python runtime)."""
    return Path(os.environ.get("NODEAGENT_CACHE") or "~/.cache/nodeagent").expanduser()
