/* zstandard's C backend (zstandard 0.25.0, c-ext/backend_c.c with the bundled single-file zstd) as the
 * built-in module _zstd_backend_c of nodeagent's static CPython (build.py static, stage "python").
 * Built-in modules cannot have dotted names, so the module is registered top-level; agent/__init__.py
 * aliases it as sys.modules["zstandard.backend_c"] before zstandard is imported.
 * The defines are setup_zstd.py's for the bundled zstd; they live here because a Modules/Setup line may not
 * contain "=" (makesetup reads such a line as a make variable). */
#define ZSTD_SINGLE_FILE
#define ZSTDLIB_VISIBLE
#define ZDICTLIB_VISIBLE
#define ZSTDERRORLIB_VISIBLE
#define PyInit_backend_c PyInit__zstd_backend_c
#include "backend_c.c"
