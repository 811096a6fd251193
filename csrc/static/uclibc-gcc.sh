#!/bin/sh
# uclibc-gcc: the host gcc against the uClibc-ng sysroot this script lives in (<sysroot>/bin), in the style of
# Debian's musl-gcc: a specs file swaps the C library's headers, start files and libraries. Always static,
# non-PIE. Installed by `python build.py static` (stage "sysroot"); the sysroot may be moved.
# Code goes into one section per function and datum, so that a link with --gc-sections drops what nothing uses.
# At link time (no -c/-S/-E), three variables of the nodeagent build are honoured:
#   NODEAGENT_LINK_MAP=FILE   write the linker map to FILE
#   NODEAGENT_LINK_LIBS=...   libraries appended after the objects (CPython's MODLIBS that Nuitka drops)
#   NODEAGENT_LINK_FLAGS=...  more link flags (e.g. -Wl,--gc-sections)
sysroot=$(cd "$(dirname "$0")/.." && pwd -P)
UCLIBC_SYSROOT=$sysroot
export UCLIBC_SYSROOT
link=yes
for arg in "$@"; do
    case $arg in
        -c|-S|-E|-M|-MM) link=no ;;
    esac
done
if [ $link = no ] || [ $# = 0 ]; then
    exec "${REALGCC:-gcc}" -fno-pie -ffunction-sections -fdata-sections -specs "$sysroot/lib/uclibc-gcc.specs" "$@"
fi
exec "${REALGCC:-gcc}" -fno-pie -ffunction-sections -fdata-sections -specs "$sysroot/lib/uclibc-gcc.specs" \
    -static -no-pie "$@" ${NODEAGENT_LINK_MAP:+-Wl,-Map="$NODEAGENT_LINK_MAP"} $NODEAGENT_LINK_FLAGS $NODEAGENT_LINK_LIBS
