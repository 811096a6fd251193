"""nodeagent: the node agent of Orbit-PXE-3 (image, save, kexec)."""

__version__ = "0.1.0"
