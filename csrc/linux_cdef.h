/*
 * cffi cdef for agent._linux: the single source of truth for what Python can
 * call.  build.py reads this file (it is not compiled as C; cffi parses it).
 * Keep it in step with linux.h.  "#define NAME ..." asks cffi to take the
 * value from the C compiler, i.e. from the kernel headers linux.h includes.
 */

/* block device ioctls (values for reference/diagnostics; wrappers use them) */
#define BLKGETSIZE64 ...
#define BLKSSZGET ...
#define BLKFLSBUF ...
#define BLKRRPART ...
#define BLKDISCARD ...
#define BLKZEROOUT ...

/* fallocate(2) modes */
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...

int na_blk_getsize64(int fd, uint64_t *size_out);
int na_blk_sszget(int fd, int *size_out);
int na_blk_flsbuf(int fd);
int na_blk_rrpart(int fd);
int na_blk_discard(int fd, uint64_t offset, uint64_t length);
int na_blk_zeroout(int fd, uint64_t offset, uint64_t length);
int na_fallocate(int fd, int mode, int64_t offset, int64_t length);

/* the C allocator */
int na_malloc_keep_big_buffers(int max_buffer);
