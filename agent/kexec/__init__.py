"""kexec: load and boot a new Linux kernel without a firmware reboot. bzimage.py parses x86 bzImages, pure."""
