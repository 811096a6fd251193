/* Implementation of linux.h; see there for the conventions. */
#include "linux.h"

#include <errno.h>

int na_blk_getsize64(int fd, uint64_t *size_out)
{
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        return -1;
    *size_out = size;
    return 0;
}

int na_blk_sszget(int fd, int *size_out)
{
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) != 0)
        return -1;
    *size_out = size;
    return 0;
}

int na_blk_flsbuf(int fd)
{
    return ioctl(fd, BLKFLSBUF, 0) == 0 ? 0 : -1;
}

int na_blk_rrpart(int fd)
{
    return ioctl(fd, BLKRRPART, 0) == 0 ? 0 : -1;
}

int na_blk_discard(int fd, uint64_t offset, uint64_t length)
{
    uint64_t range[2] = { offset, length };
    return ioctl(fd, BLKDISCARD, range) == 0 ? 0 : -1;
}

int na_blk_zeroout(int fd, uint64_t offset, uint64_t length)
{
    uint64_t range[2] = { offset, length };
    return ioctl(fd, BLKZEROOUT, range) == 0 ? 0 : -1;
}

int na_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    int rc;
    do {
        rc = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -1;
}

int na_malloc_keep_big_buffers(int max_buffer)
{
    /* mallopt returns 1 on success, 0 on error. */
    if (mallopt(M_MMAP_THRESHOLD, max_buffer) != 1)
        return -1;
    return mallopt(M_TRIM_THRESHOLD, 4 * max_buffer) == 1 ? 0 : -1;
}
