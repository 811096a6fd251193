/* Implementation of linux.h; see there for the conventions. */
#include "linux.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <arpa/inet.h>  /* inet_pton */

int na_blk_getsize64(int fd, uint64_t *size_out)
{
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0)
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

/* ---- booting another kernel ------------------------------------------- */

int na_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline,
                       unsigned long flags)
{
    unsigned long cmdline_len = cmdline ? strlen(cmdline) + 1 : 0;
    return syscall(SYS_kexec_file_load, kernel_fd, initrd_fd, cmdline_len,
                   cmdline, flags) == 0 ? 0 : -1;
}

int na_kexec_load(unsigned long entry, unsigned long nr_segments,
                  const struct kexec_segment *segments, unsigned long flags)
{
    return syscall(SYS_kexec_load, entry, nr_segments, segments, flags) == 0
        ? 0 : -1;
}

int na_reboot(int cmd)
{
    return syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, cmd,
                   NULL) == 0 ? 0 : -1;
}

/* ---- modules, mounts ---------------------------------------------------- */

int na_finit_module(int fd, const char *params, int flags)
{
    return syscall(SYS_finit_module, fd, params ? params : "", flags) == 0
        ? 0 : -1;
}

int na_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data)
{
    return mount(source, target, fstype, flags, data) == 0 ? 0 : -1;
}

int na_umount2(const char *target, int flags)
{
    return umount2(target, flags) == 0 ? 0 : -1;
}

int na_sync(void)
{
    sync();
    return 0;
}

/* ---- network interfaces ------------------------------------------------- */

static int fill_ifreq(struct ifreq *ifr, const char *ifname)
{
    size_t len = ifname ? strlen(ifname) : 0;
    memset(ifr, 0, sizeof *ifr);
    if (len == 0 || len >= IFNAMSIZ) {
        errno = EINVAL;
        return -1;
    }
    memcpy(ifr->ifr_name, ifname, len);
    return 0;
}

/* A dotted-quad IPv4 address as a struct sockaddr (AF_INET). */
static int fill_sockaddr_in(struct sockaddr *sa, const char *ipv4)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    if (ipv4 == NULL || inet_pton(AF_INET, ipv4, &sin.sin_addr) != 1) {
        errno = EINVAL;
        return -1;
    }
    memcpy(sa, &sin, sizeof sin);
    return 0;
}

int na_if_get_hwaddr(int sock, const char *ifname, unsigned short *family_out,
                     unsigned char data_out[14])
{
    struct ifreq ifr;
    if (fill_ifreq(&ifr, ifname) != 0 || ioctl(sock, SIOCGIFHWADDR, &ifr) != 0)
        return -1;
    *family_out = ifr.ifr_hwaddr.sa_family;
    memcpy(data_out, ifr.ifr_hwaddr.sa_data, 14);
    return 0;
}

/* The IPv4 address an interface ioctl answers with (the union member is the
 * same struct sockaddr for every SIOCGIF*ADDR request). */
static int if_get_sockaddr(int sock, const char *ifname, unsigned long request,
                           unsigned char addr_out[4])
{
    struct ifreq ifr;
    struct sockaddr_in sin;
    if (fill_ifreq(&ifr, ifname) != 0 || ioctl(sock, request, &ifr) != 0)
        return -1;
    memcpy(&sin, &ifr.ifr_addr, sizeof sin);
    if (sin.sin_family != AF_INET) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    memcpy(addr_out, &sin.sin_addr, 4);
    return 0;
}

int na_if_get_addr(int sock, const char *ifname, unsigned char addr_out[4])
{
    return if_get_sockaddr(sock, ifname, SIOCGIFADDR, addr_out);
}

int na_if_get_broadaddr(int sock, const char *ifname, unsigned char addr_out[4])
{
    return if_get_sockaddr(sock, ifname, SIOCGIFBRDADDR, addr_out);
}

static int if_set_sockaddr(int sock, const char *ifname, unsigned long request,
                           const char *ipv4)
{
    struct ifreq ifr;
    if (fill_ifreq(&ifr, ifname) != 0 || fill_sockaddr_in(&ifr.ifr_addr, ipv4) != 0)
        return -1;
    return ioctl(sock, request, &ifr) == 0 ? 0 : -1;
}

int na_if_set_addr(int sock, const char *ifname, const char *ipv4)
{
    return if_set_sockaddr(sock, ifname, SIOCSIFADDR, ipv4);
}

int na_if_set_netmask(int sock, const char *ifname, const char *ipv4)
{
    return if_set_sockaddr(sock, ifname, SIOCSIFNETMASK, ipv4);
}

int na_if_get_flags(int sock, const char *ifname, int *flags_out)
{
    struct ifreq ifr;
    if (fill_ifreq(&ifr, ifname) != 0 || ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
        return -1;
    *flags_out = (unsigned short)ifr.ifr_flags;
    return 0;
}

int na_if_set_flags(int sock, const char *ifname, int flags)
{
    struct ifreq ifr;
    if (fill_ifreq(&ifr, ifname) != 0)
        return -1;
    if (flags & ~0xffff) {      /* ifr_flags is a short */
        errno = EINVAL;
        return -1;
    }
    ifr.ifr_flags = (short)flags;
    return ioctl(sock, SIOCSIFFLAGS, &ifr) == 0 ? 0 : -1;
}

int na_route_add(int sock, const char *dst, const char *genmask,
                 const char *gateway, const char *ifname, int metric)
{
    struct rtentry rt;
    char dev[IFNAMSIZ];
    memset(&rt, 0, sizeof rt);
    if (fill_sockaddr_in(&rt.rt_dst, dst) != 0
        || fill_sockaddr_in(&rt.rt_genmask, genmask) != 0)
        return -1;
    rt.rt_flags = RTF_UP;
    if (gateway != NULL) {
        if (fill_sockaddr_in(&rt.rt_gateway, gateway) != 0)
            return -1;
        rt.rt_flags |= RTF_GATEWAY;
    }
    if (ifname != NULL) {
        size_t len = strlen(ifname);
        if (len == 0 || len >= IFNAMSIZ) {
            errno = EINVAL;
            return -1;
        }
        memcpy(dev, ifname, len + 1);
        rt.rt_dev = dev;
    }
    if (metric < 0 || metric >= SHRT_MAX) {
        errno = EINVAL;
        return -1;
    }
    rt.rt_metric = (short)(metric + 1);  /* the ioctl ABI stores metric + 1 */
    return ioctl(sock, SIOCADDRT, &rt) == 0 ? 0 : -1;
}

/* ---- frisbee receive fast path ------------------------------------------ */

int na_frx_recv(int fd, struct na_frx *rx)
{
    struct mmsghdr msgs[NA_FRX_BATCH];
    struct iovec iov[NA_FRX_BATCH];
    struct sockaddr_in from[NA_FRX_BATCH];
    int i, n;

    memset(msgs, 0, sizeof msgs);
    for (i = 0; i < NA_FRX_BATCH; i++) {
        iov[i].iov_base = rx->data[i];
        iov[i].iov_len = NA_FRX_SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        msgs[i].msg_hdr.msg_control = rx->control[i];
        msgs[i].msg_hdr.msg_controllen = sizeof rx->control[i];
    }
    rx->count = rx->next = 0;
    do {
        n = recvmmsg(fd, msgs, NA_FRX_BATCH, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    for (i = 0; i < n; i++) {
        struct cmsghdr *c;
        rx->len[i] = msgs[i].msg_len;
        rx->ip[i] = from[i].sin_addr.s_addr;
        rx->port[i] = ntohs(from[i].sin_port);
        for (c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c; c = CMSG_NXTHDR(&msgs[i].msg_hdr, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL)
                memcpy(&rx->drops, CMSG_DATA(c), sizeof rx->drops);
    }
    rx->count = n;
    return n;
}

/* The fields of a BLOCK datagram: type, subtype, datalen, srcip, chunk, block
 * (int32 each), then the data. */
#define FRX_HEAD 24
#define FRX_BLOCK_LEN (16 + 8 + 1024)

int na_frx_scan(struct na_frx *rx)
{
    while (rx->next < rx->count) {
        int i = rx->next++;
        const unsigned char *d = rx->data[i];
        int32_t f[6];
        unsigned char bit;

        /* The checks of packets.block_header, then "from our server, for the
         * armed chunk, inside it, and not its last missing block". */
        if (rx->chunk < 0 || rx->len[i] < FRX_BLOCK_LEN || rx->ip[i] != rx->server_ip
            || (rx->server_port >= 0 && rx->port[i] != rx->server_port))
            return i;
        memcpy(f, d, sizeof f);
        if (f[0] != 1 || f[1] != 3 || f[2] < 8 + 1024 || f[2] > 1064
            || rx->len[i] < 16 + (uint32_t)f[2] || memcmp(&f[3], &rx->server_ip, 4) != 0
            || f[4] != rx->chunk || f[5] < 0 || f[5] >= rx->nblocks)
            return i;
        bit = (unsigned char)(1u << (f[5] & 7));
        if (rx->missing[f[5] >> 3] & bit) {
            int32_t off = f[5] * 1024, n = rx->chunk_bytes - off;
            if (rx->missing_count <= 1)
                return i;  /* completing the chunk is the engine's business */
            memcpy(rx->buf + off, d + FRX_HEAD, n < 1024 ? n : 1024);
            rx->missing[f[5] >> 3] &= (unsigned char)~bit;
            rx->missing_count--;
            rx->useful++;
        } else {
            rx->dups++;
        }
        rx->blocks++;
        if (f[5] > rx->run_top)
            rx->run_top = f[5];
    }
    return -1;
}

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

int na_frx_send_blocks(int fd, const unsigned char prefix[16], uint32_t dest_ip,
                       int dest_port, int32_t chunk, int32_t block, int count,
                       const unsigned char *data, int gso)
{
    enum { WIRE = FRX_BLOCK_LEN, MAX = 64 };
    unsigned char head[MAX][FRX_HEAD];
    struct iovec iov[2 * MAX];
    struct mmsghdr msgs[MAX];
    struct sockaddr_in to;
    union { struct cmsghdr c; char space[CMSG_SPACE(sizeof(uint16_t))]; } ctl;
    int sent = 0;

    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_addr.s_addr = dest_ip;
    to.sin_port = htons((uint16_t)dest_port);
    while (sent < count) {
        int n = count - sent, i, rc;
        if (n > (gso ? NA_FRX_GSO_MAX : MAX))
            n = gso ? NA_FRX_GSO_MAX : MAX;
        memset(msgs, 0, sizeof msgs);
        for (i = 0; i < n; i++) {
            int32_t tail[2] = { chunk, block + sent + i };
            memcpy(head[i], prefix, 16);
            memcpy(head[i] + 16, tail, 8);
            iov[2 * i].iov_base = head[i];
            iov[2 * i].iov_len = FRX_HEAD;
            iov[2 * i + 1].iov_base = (void *)(data + (size_t)(sent + i) * 1024);
            iov[2 * i + 1].iov_len = 1024;
            msgs[i].msg_hdr.msg_name = &to;
            msgs[i].msg_hdr.msg_namelen = sizeof to;
            msgs[i].msg_hdr.msg_iov = &iov[2 * i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }
        if (gso) {
            /* One message whose payload the kernel (or the NIC) cuts into WIRE-byte datagrams. */
            uint16_t size = WIRE;
            msgs[0].msg_hdr.msg_iovlen = 2 * n;
            memset(&ctl, 0, sizeof ctl);
            msgs[0].msg_hdr.msg_control = ctl.space;
            msgs[0].msg_hdr.msg_controllen = sizeof ctl.space;
            ctl.c.cmsg_level = SOL_UDP;
            ctl.c.cmsg_type = UDP_SEGMENT;
            ctl.c.cmsg_len = CMSG_LEN(sizeof size);
            memcpy(CMSG_DATA(&ctl.c), &size, sizeof size);
            do {
                rc = (int)sendmsg(fd, &msgs[0].msg_hdr, 0);
            } while (rc < 0 && errno == EINTR);
            rc = rc < 0 ? -1 : n;
        } else {
            do {
                rc = sendmmsg(fd, msgs, (unsigned)n, 0);
            } while (rc < 0 && errno == EINTR);
        }
        if (rc < 0)
            return sent ? sent : -1;
        sent += rc;
        if (rc < n)
            break;
    }
    return sent;
}
