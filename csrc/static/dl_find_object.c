/* _dl_find_object for the static uClibc-ng sysroot (build.py static, stage "sysroot").
 *
 * The host gcc's libgcc_eh.a (gcc 12 on Debian 12, configured for glibc >= 2.35) finds unwind tables with
 * glibc's _dl_find_object(). uClibc-ng has no such function, so anything that unwinds (NPTL's pthread_exit and
 * thread cancellation) or merely links libgcc_eh fails to link. This is the same contract, built on
 * dl_iterate_phdr(): for the loaded object whose PT_LOAD segments contain pc, report its address range and
 * its PT_GNU_EH_FRAME (.eh_frame_hdr). The layout is glibc's for x86_64 (no dlfo_eh_dbase, no dlfo_eh_count).
 */
#define _GNU_SOURCE
#include <link.h>
#include <stddef.h>
#include <stdint.h>

struct dl_find_object {
    unsigned long long dlfo_flags;
    void *dlfo_map_start;
    void *dlfo_map_end;
    struct link_map *dlfo_link_map;
    void *dlfo_eh_frame;
    unsigned long long __dlfo_reserved[7];
};

struct search {
    uintptr_t pc;
    struct dl_find_object *result;
    int found;
};

static int visit(struct dl_phdr_info *info, size_t size, void *data)
{
    struct search *s = data;
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    int contains = 0;
    void *eh_frame = NULL;
    (void)size;

    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t start = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD) {
            uintptr_t end = start + ph->p_memsz;
            if (start < lo)
                lo = start;
            if (end > hi)
                hi = end;
            if (s->pc >= start && s->pc < end)
                contains = 1;
        } else if (ph->p_type == PT_GNU_EH_FRAME) {
            eh_frame = (void *)start;
        }
    }
    if (!contains)
        return 0;
    s->result->dlfo_flags = 0;
    s->result->dlfo_map_start = (void *)lo;
    s->result->dlfo_map_end = (void *)hi;
    s->result->dlfo_link_map = NULL;
    s->result->dlfo_eh_frame = eh_frame;
    s->found = 1;
    return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result)
{
    struct search s = { (uintptr_t)pc, result, 0 };
    dl_iterate_phdr(visit, &s);
    return s.found ? 0 : -1;
}
