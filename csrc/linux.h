/*
 * nodeagent's Linux layer: thin C wrappers around the syscalls and ioctls the
 * agent needs.  Everything Python calls into the kernel goes through these
 * functions, via the cffi module agent._linux (see linux_cdef.h and build.py).
 *
 * Convention: every wrapper returns 0 on success and -1 on failure with errno
 * set (cffi saves it; Python reads ffi.errno).  Results come back through an
 * out-pointer.  No wrapper allocates, prints or retries except on EINTR where
 * noted.
 *
 * Constants the Python side needs are taken from the kernel/libc headers
 * included here and declared in linux_cdef.h as "#define NAME ...", so the C
 * compiler, not Python, supplies their values.
 */
#ifndef NODEAGENT_LINUX_H
#define NODEAGENT_LINUX_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif

#include <stdint.h>
#include <fcntl.h>          /* fallocate() */
#include <sys/ioctl.h>
#include <linux/fs.h>       /* BLKGETSIZE64, BLKSSZGET, BLKFLSBUF, BLKRRPART, BLKDISCARD, BLKZEROOUT */
#include <linux/falloc.h>   /* FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE, ... */
#include <malloc.h>         /* mallopt */

/* ---- block devices ------------------------------------------------------ */

/* BLKGETSIZE64: size of the block device in bytes. */
int na_blk_getsize64(int fd, uint64_t *size_out);

/* BLKSSZGET: logical sector size in bytes. */
int na_blk_sszget(int fd, int *size_out);

/* BLKFLSBUF: flush and invalidate the device's buffer cache. */
int na_blk_flsbuf(int fd);

/* BLKRRPART: have the kernel re-read the partition table. */
int na_blk_rrpart(int fd);

/* BLKDISCARD on [offset, offset + length). */
int na_blk_discard(int fd, uint64_t offset, uint64_t length);

/* BLKZEROOUT on [offset, offset + length): the range reads back as zeros. */
int na_blk_zeroout(int fd, uint64_t offset, uint64_t length);

/* ---- files -------------------------------------------------------------- */

/* fallocate(2); mode is a combination of FALLOC_FL_* flags. */
int na_fallocate(int fd, int mode, int64_t offset, int64_t length);

/* ---- the C allocator ---------------------------------------------------- */

/* Serve buffers up to max_buffer bytes from the heap and keep freed memory for
 * reuse (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).  Imaging allocates and
 * frees megabyte buffers hundreds of times a second; with the defaults each
 * one is a fresh mmap whose pages fault in again.  Returns 0, or -1 if the C
 * library refused. */
int na_malloc_keep_big_buffers(int max_buffer);

#endif /* NODEAGENT_LINUX_H */
