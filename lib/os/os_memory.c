/* SPDX-License-Identifier: MIT */
/*
 * The OS layer's memory calls (Linux): mmap, munmap, mremap, madvise and
 * the mapping's name, with their counters, the bound on the VMAs they may
 * add, and the tests' faults (faults.h: constants in the shipped build).
 * Nothing here allocates from the heap, so it is safe from inside malloc
 * before any constructor has run. The rest of the OS is os_system.c.
 */
#define _GNU_SOURCE
#include "faults.h"
#include "os.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif
#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

static _Atomic uint64_t count_map, count_unmap, count_remap, count_madvise, count_map_fail;
static _Atomic uint64_t count_unmap_fail, count_advise_fail, count_remap_fail;

static void counter_bump(_Atomic uint64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* ---- the kernel's mapping count ---------------------------------------------
 * An upper bound on the VMAs the calls made so far can have added: a map at
 * most one, an unmap one (a split), a moving mremap three (the source split,
 * the destination split around the moved range), an madvise or a name two
 * (the range cut out of the middle of a VMA). Merges only lower the truth. */
static _Atomic long vma_growth;

static void vma_grow(long n)
{
    atomic_fetch_add_explicit(&vma_growth, n, memory_order_relaxed);
}

long _ta_os_vma_growth(void)
{
    return atomic_load_explicit(&vma_growth, memory_order_relaxed);
}

/* ---- one kind of kernel call: its test hooks, counters and VMA bound ------- */
typedef struct {
    ta_fault_t fault; /* the tests' fault of this kind (lib/os/faults.h) */
    int injected;     /* the error an injected failure gives */
    _Atomic uint64_t *calls;
    _Atomic uint64_t *failures; /* NULL: failures are expected, not counted */
    long vma;                   /* VMAs one call may add */
} kcall_t;

static const kcall_t call_map = {TA_FAULT_MAP, ENOMEM, &count_map, &count_map_fail, 1};
static const kcall_t call_unmap = {TA_FAULT_UNMAP, ENOMEM, &count_unmap, &count_unmap_fail, 1};
static const kcall_t call_move = {TA_FAULT_REMAP, ENOMEM, &count_remap, &count_remap_fail, 3};
static const kcall_t call_grow_in_place = {TA_FAULT_REMAP, ENOMEM, &count_remap, NULL, 0};
static const kcall_t call_advise = {TA_FAULT_ADVISE, EAGAIN, &count_madvise, &count_advise_fail, 2};
static const kcall_t call_advise_in_place = {TA_FAULT_ADVISE, EAGAIN, &count_madvise,
                                             &count_advise_fail, 0};

/* Whether the call goes to the kernel (counted, its VMAs bounded); false
 * with the injected error in *rc when a test hook fails it instead. */
static bool kcall_enter(const kcall_t *k, int *rc)
{
    if (_ta_fault_fires(k->fault)) {
        *rc = k->injected;
        return false;
    }
    counter_bump(k->calls);
    vma_grow(k->vma);
    return true;
}

/* The call's result: a failure counted, the caller's errno restored. */
static int kcall_leave(const kcall_t *k, int rc, int saved_errno)
{
    if (rc && k->failures)
        counter_bump(k->failures);
    errno = saved_errno;
    return rc;
}

int _ta_os_vma_count(long *out)
{
    int saved = errno;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int rc = errno;
        errno = saved;
        return rc;
    }
    char buf[16384];
    long lines = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++)
            lines += buf[i] == '\n';
    int rc = n < 0 ? errno : 0;
    close(fd);
    errno = saved;
    if (rc == 0)
        *out = lines;
    return rc;
}

/* One private, writable mmap: anonymous (fd -1) or of a file from its
 * start; at, if set, is fixed (a range of our own). */
static int map_call(void *at, size_t size, int fd, void **out)
{
    int flags = MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0) | (at ? MAP_FIXED : 0);
    int saved = errno, rc;
    if (kcall_enter(&call_map, &rc)) {
        void *p = mmap(at, size, PROT_READ | PROT_WRITE, flags, fd, 0);
        rc = p == MAP_FAILED ? errno : 0;
        if (rc == 0)
            *out = p;
    }
    return kcall_leave(&call_map, rc, saved);
}

static int raw_map(size_t size, void **out)
{
    return map_call(NULL, size, -1, out);
}

int _ta_os_unmap(void *addr, size_t size)
{
    int saved = errno, rc;
    _ta_fault_before_unmap(addr, size);
    if (kcall_enter(&call_unmap, &rc))
        rc = munmap(addr, size) == 0 ? 0 : errno;
    return kcall_leave(&call_unmap, rc, saved);
}

/* Maps size + align - page bytes and cuts both ends off, leaving an
 * aligned range of size bytes. */
static int map_with_slack(size_t size, size_t align, void **out)
{
    size_t slack = align - _ta_os_page_size();
    if (size + slack < size)
        return ENOMEM;
    void *p;
    int rc = raw_map(size + slack, &p);
    if (rc != 0)
        return rc;
    uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    size_t head = start - (uintptr_t)p;
    if (head)
        _ta_os_unmap(p, head);
    if (slack - head)
        _ta_os_unmap((char *)start + size, slack - head);
    *out = (void *)start;
    return 0;
}

int _ta_os_map(size_t size, size_t align, void **out)
{
    int saved = errno;
    void *p = NULL;
    int rc;
    /* Linux >= 6.7 aligns anonymous mappings whose length is a multiple of
     * 2 MiB to 2 MiB itself: try a plain mapping for those. Other lengths,
     * or a kernel that does not, take a mapping with slack. */
    if (align <= _ta_os_page_size() || (size & (align - 1)) == 0) {
        rc = raw_map(size, &p);
        if (rc == 0 && ((uintptr_t)p & (align - 1)) != 0) {
            _ta_os_unmap(p, size);
            rc = map_with_slack(size, align, &p);
        }
    } else {
        rc = map_with_slack(size, align, &p);
    }
    if (rc == 0)
        *out = p;
    errno = saved;
    return rc;
}

/* ---- moves onto a fixed destination ------------------------------------------
 * mremap(MREMAP_FIXED) unmaps the destination first and checks the source
 * after, on kernels before 6.17: a source that spans several VMAs fails
 * with EFAULT and leaves a hole where the destination was, which another
 * thread's mmap can take. 6.17 checks first (and moves several VMAs). */

/* Whether [addr, addr + size) lies in one VMA (/proc/self/maps; tests). */
static int one_vma(const void *addr, size_t size)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    char buf[8192];
    size_t have = 0;
    int found = 1;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            unsigned long lo, hi;
            if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= (uintptr_t)addr &&
                (uintptr_t)addr < hi) {
                found = (uintptr_t)addr + size <= hi;
                close(fd);
                return found;
            }
            line = nl + 1;
        }
        have = (size_t)(buf + have - line);
        memmove(buf, line, have);
    }
    close(fd);
    return found;
}

/* Whether any page of [addr, addr + size) is unmapped (mincore: ENOMEM). */
static int has_hole(void *addr, size_t size)
{
    unsigned char vec[4096];
    size_t page = _ta_os_page_size(), step = sizeof vec * page;
    for (size_t off = 0; off < size; off += step) {
        size_t len = size - off < step ? size - off : step;
        if (mincore((char *)addr + off, len, vec) != 0 && errno == ENOMEM)
            return 1;
    }
    return 0;
}

/* After a failed move: the destination as the caller left it, or
 * TA_OS_DEST_LOST (see os.h). A destination without a hole is taken as
 * ours: kernels before 6.17 also refuse some moves before they unmap it
 * (the map-count check, bad arguments). What this cannot tell apart is
 * another thread's mapping that filled the whole hole in the moment
 * between: docs/reliability.md. */
static int move_failed(void *to, size_t size, int rc)
{
    if (!has_hole(to, size))
        return rc;
    void *q = mmap(to, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (q == to)
        return rc;
    if (q != MAP_FAILED) /* before 4.17 the flag was a hint */
        munmap(q, size);
    return TA_OS_DEST_LOST;
}

/* The emulated old order: the destination goes, then the source is refused. */
static int move_emulated(void *from, size_t size, void *to)
{
    if (one_vma(from, size))
        return -1;
    munmap(to, size);
    if (_ta_fault_old_mremap() == 2) {
        size_t page = _ta_os_page_size();
        void *q = mmap((char *)to + size / 2 / page * page, page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (q != MAP_FAILED) {
            memset(q, 0x5a, page);
            _ta_fault_set_intruder(q);
        }
    }
    return EFAULT;
}

/* A moving mremap (MAYMOVE, and FIXED to `to` when it is set), with the fault
 * hook, the counters and errno kept. */
static int remap_moving(void *addr, size_t old_size, size_t new_size, void *to, void **out)
{
    int saved = errno, rc;
    if (kcall_enter(&call_move, &rc)) {
        if (to == NULL || _ta_fault_old_mremap() == 0 ||
            (rc = move_emulated(addr, old_size, to)) < 0) {
            void *p = to ? mremap(addr, old_size, new_size, MREMAP_MAYMOVE | MREMAP_FIXED, to)
                         : mremap(addr, old_size, new_size, MREMAP_MAYMOVE);
            rc = p == MAP_FAILED ? errno : 0;
            if (rc == 0 && out)
                *out = p;
        }
        if (rc != 0 && to != NULL)
            rc = move_failed(to, new_size, rc);
    }
    return kcall_leave(&call_move, rc, saved);
}

int _ta_os_remap(void *addr, size_t old_size, size_t new_size, void **out)
{
    return remap_moving(addr, old_size, new_size, NULL, out);
}

int _ta_os_move(void *from, size_t size, void *to)
{
    return remap_moving(from, size, size, to, NULL);
}

int _ta_os_remap_in_place(void *addr, size_t old_size, size_t new_size)
{
    int saved = errno, rc;
    if (kcall_enter(&call_grow_in_place, &rc))
        rc = mremap(addr, old_size, new_size, 0) == MAP_FAILED ? errno : 0;
    return kcall_leave(&call_grow_in_place, rc, saved);
}

int _ta_os_remap_aligned(void *addr, size_t old_size, size_t new_size, size_t align, void **out)
{
    if (align <= _ta_os_page_size() || new_size < old_size)
        return _ta_os_remap(addr, old_size, new_size, out);
    int rc;
    if (((uintptr_t)addr & (align - 1)) == 0 &&
        (rc = _ta_os_remap_in_place(addr, old_size, new_size)) == 0) {
        *out = addr;
        return 0;
    }
    void *dest;
    if ((rc = _ta_os_map(new_size, align, &dest)) != 0)
        return rc;
    if ((rc = remap_moving(addr, old_size, new_size, dest, out)) != 0 && rc != TA_OS_DEST_LOST)
        _ta_os_unmap(dest, new_size);
    return rc;
}

static int advise(void *addr, size_t size, int advice)
{
    /* DONTNEED and POPULATE_* change no VMA */
    const kcall_t *k =
        advice == MADV_DONTNEED || advice == MADV_POPULATE_WRITE || advice == MADV_POPULATE_READ
            ? &call_advise_in_place
            : &call_advise;
    int saved = errno, rc;
    if (kcall_enter(k, &rc))
        rc = madvise(addr, size, advice) == 0 ? 0 : errno;
    return kcall_leave(k, rc, saved);
}

int _ta_os_advise_hugepage(void *addr, size_t size)
{
    return advise(addr, size, MADV_HUGEPAGE);
}

int _ta_os_residency(const void *addr, size_t size, size_t region, ta_residency_t *out)
{
    unsigned char vec[2048]; /* 8 MiB of 4 KiB pages: several regions */
    size_t page = _ta_os_page_size(), region_pages = region / page;
    uintptr_t at = (uintptr_t)addr, end = at + size;
    int saved = errno, rc = 0;
    *out = (ta_residency_t){0};
    while (at < end) {
        /* a window ends on a region boundary, so no region spans two */
        uintptr_t stop = at + sizeof vec * page;
        stop = stop >= end ? end : stop & ~(uintptr_t)(region - 1);
        size_t pages = (stop - at) / page;
        if (mincore((void *)at, stop - at, vec) != 0) {
            rc = errno;
            break;
        }
        for (size_t i = 0; i < pages;) { /* region by region */
            size_t in_region = region_pages - ((at / page + i) & (region_pages - 1));
            size_t n = in_region < pages - i ? in_region : pages - i, present = 0;
            for (size_t j = 0; j < n; j++)
                present += vec[i + j] & 1;
            if (present) {
                out->resident += present;
                out->spanned += n;
                out->last_resident = present;
                out->last_spanned = n;
            }
            i += n;
        }
        at = stop;
    }
    errno = saved;
    return rc;
}

int _ta_os_advise_dontneed(void *addr, size_t size)
{
    return advise(addr, size, MADV_DONTNEED);
}

int _ta_os_name(void *addr, size_t size, const char *name)
{
    static _Atomic int unsupported;
    if (atomic_load_explicit(&unsupported, memory_order_relaxed))
        return ENOSYS;
    int saved = errno;
    vma_grow(2);
    int rc =
        prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)addr, size, (unsigned long)name) == 0
            ? 0
            : errno;
    if (rc == EINVAL || rc == ENOSYS) /* kernel without CONFIG_ANON_VMA_NAME */
        atomic_store_explicit(&unsupported, 1, memory_order_relaxed);
    errno = saved;
    return rc;
}

size_t _ta_os_page_size(void)
{
    static _Atomic size_t cached;
    size_t ps = atomic_load_explicit(&cached, memory_order_relaxed);
    if (ps == 0) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (size_t)v : 4096;
        atomic_store_explicit(&cached, ps, memory_order_relaxed);
    }
    return ps;
}

/* Reads a small file into buf (NUL-terminated); returns bytes read or -1. */
void _ta_os_counters(_ta_os_counters_t *out)
{
    out->map = atomic_load_explicit(&count_map, memory_order_relaxed);
    out->unmap = atomic_load_explicit(&count_unmap, memory_order_relaxed);
    out->remap = atomic_load_explicit(&count_remap, memory_order_relaxed);
    out->madvise = atomic_load_explicit(&count_madvise, memory_order_relaxed);
    out->map_failures = atomic_load_explicit(&count_map_fail, memory_order_relaxed);
    out->unmap_failures = atomic_load_explicit(&count_unmap_fail, memory_order_relaxed);
    out->advise_failures = atomic_load_explicit(&count_advise_fail, memory_order_relaxed);
    out->remap_failures = atomic_load_explicit(&count_remap_fail, memory_order_relaxed);
    out->injected = _ta_faults_injected();
}

int _ta_os_populate_write(void *addr, size_t size)
{
    return advise(addr, size, MADV_POPULATE_WRITE);
}

int _ta_os_populate_read(void *addr, size_t size)
{
    return advise(addr, size, MADV_POPULATE_READ);
}

/* On a huge-page boundary from 2 MiB up, as file offset 0 is: the page
 * cache's 2 MiB folios (ext4 from Linux 6.16, XFS, tmpfs) can then be
 * mapped whole, by one page-table entry each. Linux 6.18 places such file
 * mappings on the boundary itself; elsewhere the mapping goes into an
 * aligned part of a larger anonymous one (MAP_FIXED over our own range). */
int _ta_os_map_file(int fd, size_t size, void **out)
{
    void *p, *room;
    int rc = map_call(NULL, size, fd, &p);
    if (rc != 0 || size < TA_HUGE_PAGE || ((uintptr_t)p & (TA_HUGE_PAGE - 1)) == 0) {
        if (rc == 0)
            *out = p;
        return rc;
    }
    _ta_os_unmap(p, size);
    size_t page = _ta_os_page_size(); /* the slack's unmap must be page-aligned */
    size = (size + page - 1) & ~(page - 1);
    if ((rc = map_with_slack(size, TA_HUGE_PAGE, &room)) != 0)
        return rc;
    if ((rc = map_call(room, size, fd, &p)) != 0) {
        _ta_os_unmap(room, size);
        return rc;
    }
    *out = p;
    return 0;
}
