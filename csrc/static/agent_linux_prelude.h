/* Included first by the static build's wrappers of csrc/generated/_linux.c and csrc/linux.c.
 * - CPython builds built-in modules with -std=c11, which hides syscall(), sync(), alloca(), struct ifreq, ...
 *   until a feature macro asks for them (pyconfig.h defines _GNU_SOURCE, but csrc/linux.h comes first).
 * - uClibc-ng's <sys/mount.h> declares MS_RDONLY, MS_BIND, ... as enum constants, and the kernel's <linux/fs.h>
 *   (through <linux/mount.h>) defines the same names as macros. csrc/linux.h includes <linux/fs.h> first, so
 *   the enum's names are already macros and the enum does not compile (glibc guards against that, uClibc-ng
 *   does not). Declaring the enum first makes the later macros harmless (same values). */
#define _GNU_SOURCE 1
#include <sys/mount.h>
