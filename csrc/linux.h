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
#include <linux/fs.h>       /* BLKGETSIZE64, BLKFLSBUF, BLKRRPART, BLKZEROOUT */
#include <linux/falloc.h>   /* FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE, ... */
#include <malloc.h>         /* mallopt */
#include <stddef.h>
#include <unistd.h>         /* syscall(), sync() */
#include <sys/syscall.h>    /* SYS_kexec_load, SYS_kexec_file_load, SYS_reboot, SYS_finit_module */
#include <sys/mount.h>      /* mount(), umount2(), MS_*, MNT_* */
#include <sys/socket.h>
#include <netinet/in.h>
#include <net/if.h>         /* struct ifreq, IFNAMSIZ, IFF_* */
#include <net/if_arp.h>     /* ARPHRD_* (the hardware address family SIOCGIFHWADDR reports) */
#include <net/route.h>      /* struct rtentry, RTF_* */
#include <linux/kexec.h>    /* struct kexec_segment, KEXEC_* */
#include <linux/reboot.h>   /* LINUX_REBOOT_MAGIC1/2, LINUX_REBOOT_CMD_* */
#include <linux/module.h>   /* MODULE_INIT_* (finit_module flags) */
#include <sys/uio.h>        /* struct iovec (recvmmsg) */
#include <netinet/udp.h>    /* UDP_SEGMENT */

/* ---- block devices ------------------------------------------------------ */

/* BLKGETSIZE64: size of the block device in bytes. */
int na_blk_getsize64(int fd, uint64_t *size_out);

/* BLKFLSBUF: flush and invalidate the device's buffer cache. */
int na_blk_flsbuf(int fd);

/* BLKRRPART: have the kernel re-read the partition table. */
int na_blk_rrpart(int fd);

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

/* ---- booting another kernel ------------------------------------------- */
/* These replace or stop the running system.  Never call them on a machine
 * you want to keep (in particular, not from tests). */

/* kexec_file_load(2): the kernel reads, verifies and places the kernel (and
 * initrd) itself.  initrd_fd is ignored with KEXEC_FILE_NO_INITRAMFS (pass
 * -1); cmdline may be NULL (no command line), otherwise it is passed with its
 * terminating NUL as the kernel requires. */
int na_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline,
                       unsigned long flags);

/* kexec_load(2): load nr_segments prepared segments; the new kernel starts at
 * entry.  flags combine KEXEC_ARCH_* with KEXEC_ON_CRASH/PRESERVE_CONTEXT.
 * nr_segments 0 unloads the loaded kernel. */
int na_kexec_load(unsigned long entry, unsigned long nr_segments,
                  const struct kexec_segment *segments, unsigned long flags);

/* reboot(2) with the magic numbers: cmd is a LINUX_REBOOT_CMD_* (KEXEC,
 * RESTART, POWER_OFF, HALT).  Does not sync; call na_sync() first.  Returns
 * only on failure (or for commands such as CAD_ON that do not reboot). */
int na_reboot(int cmd);

/* ---- modules, mounts ---------------------------------------------------- */

/* finit_module(2): load the kernel module in fd with parameter string params
 * ("" for none); flags are MODULE_INIT_*. */
int na_finit_module(int fd, const char *params, int flags);

/* mount(2); fstype and data may be NULL. */
int na_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data);

/* umount2(2); flags such as MNT_DETACH. */
int na_umount2(const char *target, int flags);

/* sync(2): write back every filesystem.  Always returns 0. */
int na_sync(void);

/* ---- network interfaces ------------------------------------------------- */
/* sock is any socket, normally AF_INET/SOCK_DGRAM.  ifname must be shorter
 * than IFNAMSIZ (else EINVAL).  IPv4 addresses are dotted-quad strings
 * (inet_pton; a malformed one gives EINVAL). */

/* SIOCGIFHWADDR: the link type (ARPHRD_*) and the first 14 bytes of the
 * hardware address (sa_data; an Ethernet MAC is the first 6). */
int na_if_get_hwaddr(int sock, const char *ifname, unsigned short *family_out,
                     unsigned char data_out[14]);

/* SIOCGIFADDR / SIOCGIFBRDADDR: the interface's (primary) IPv4 address or its
 * broadcast address, 4 bytes in network order.  EADDRNOTAVAIL: it has none. */
int na_if_get_addr(int sock, const char *ifname, unsigned char addr_out[4]);
int na_if_get_broadaddr(int sock, const char *ifname, unsigned char addr_out[4]);

/* SIOCSIFADDR: set the interface's IPv4 address. */
int na_if_set_addr(int sock, const char *ifname, const char *ipv4);

/* SIOCSIFNETMASK: set the netmask of the interface's IPv4 address. */
int na_if_set_netmask(int sock, const char *ifname, const char *ipv4);

/* SIOCGIFFLAGS / SIOCSIFFLAGS: the interface's IFF_* flags (the 16 bits of
 * ifr_flags; setting more gives EINVAL). */
int na_if_get_flags(int sock, const char *ifname, int *flags_out);
int na_if_set_flags(int sock, const char *ifname, int flags);

/* SIOCADDRT: add the IPv4 route dst/genmask, via gateway (NULL: directly
 * connected), out of ifname (NULL: any), with the given metric (0 is the
 * usual default).  dst and genmask "0.0.0.0" make the default route. */
int na_route_add(int sock, const char *dst, const char *genmask,
                 const char *gateway, const char *ifname, int metric);

/* ---- frisbee receive fast path ------------------------------------------ */
/* A frisbee client receives about a thousand 1 KiB BLOCKs per chunk.  These
 * two calls take them in batches: na_frx_recv reads up to NA_FRX_BATCH
 * datagrams with one recvmmsg (nothing else; the caller waits for input), and
 * na_frx_scan copies the BLOCKs the client armed it for into their chunk
 * buffer and marks them in the bitmap.  What the scan leaves (any other
 * datagram: another message, another chunk, a block that would complete the
 * chunk, anything malformed or from elsewhere) is handed back for the
 * protocol engine in Python, which stays the owner of every decision.
 * Wire format: little-endian, as frisbee on x86. */

#define NA_FRX_BATCH 64
#define NA_FRX_SIZE 2048   /* longer datagrams are cut, as recvfrom(2048) */

struct na_frx {
    /* the batch: count datagrams; next is the first the scan has not taken */
    int count, next;
    uint32_t drops;                 /* SO_RXQ_OVFL: datagrams the socket dropped */
    uint32_t len[NA_FRX_BATCH];
    uint32_t ip[NA_FRX_BATCH];      /* source address, network order */
    uint16_t port[NA_FRX_BATCH];    /* source port, host order */
    /* armed by the engine: BLOCKs of `chunk` (-1: none) whose source is
     * server_ip:server_port (port -1: any) and whose header srcip is
     * server_ip; the chunk has nblocks blocks and chunk_bytes bytes of file */
    uint32_t server_ip;
    int32_t server_port, chunk, nblocks, chunk_bytes;
    unsigned char *buf;             /* the chunk's buffer, 1 MiB */
    unsigned char missing[128];     /* bit b of byte b/8: block b missing */
    int32_t missing_count;          /* set bits in missing */
    int32_t run_top;                /* highest block taken (kept from arming) */
    /* what the scan took since the engine last looked */
    uint32_t blocks, useful, dups;
    unsigned char data[NA_FRX_BATCH][NA_FRX_SIZE];
    unsigned char control[NA_FRX_BATCH][32];
};

/* recvmmsg(MSG_DONTWAIT) into rx (count, next = 0): returns the count, 0 if
 * nothing was waiting, -1 on error (errno).  SO_RXQ_OVFL, if enabled on the
 * socket, updates drops. */
int na_frx_recv(int fd, struct na_frx *rx);

/* Take the armed BLOCKs from rx->next on: returns the index of the first
 * datagram left to the engine (next is past it), or -1 when the batch is done. */
int na_frx_scan(struct na_frx *rx);

/* Send count BLOCKs of chunk, blocks block, block + 1, ...: each the 16
 * bytes of prefix (type, subtype, datalen, srcip, as the engine encodes
 * them), chunk, its block number and its 1 KiB of data, to dest_ip
 * (network order):dest_port.  gso: in UDP_SEGMENT sends of up to
 * NA_FRX_GSO_MAX datagrams, else with sendmmsg.  Returns how many were sent
 * (fewer when the send queue is full) or -1 (errno) when none was. */
#define NA_FRX_GSO_MAX 62   /* 62 x 1048 bytes: within one 64 KiB UDP send */
int na_frx_send_blocks(int fd, const unsigned char prefix[16], uint32_t dest_ip,
                       int dest_port, int32_t chunk, int32_t block, int count,
                       const unsigned char *data, int gso);

#endif /* NODEAGENT_LINUX_H */
