"""Build initramfs archives for the kernels we kexec. cpio.py writes newc cpio archives, pure."""
