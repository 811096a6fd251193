"""nodeagent: the node agent of Orbit-PXE-3 (image, save, kexec)."""

import sys

__version__ = "0.1.0"

# In the static binary, C extensions are built into the interpreter, and built-in modules cannot have dotted names:
# zstandard's C backend is built in as "_zstd_backend_c". Register it under the name zstandard's package imports.
if "_zstd_backend_c" in sys.builtin_module_names and "zstandard.backend_c" not in sys.modules:
    import _zstd_backend_c

    sys.modules["zstandard.backend_c"] = _zstd_backend_c
    del _zstd_backend_c
