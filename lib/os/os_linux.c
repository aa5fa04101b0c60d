/* SPDX-License-Identifier: MIT */
/*
 * Linux OS layer: mmap/munmap/mremap/madvise/prctl and the few /proc and
 * /sys reads tensoralloc needs. Nothing here allocates from the heap, so it
 * is safe from inside malloc before any constructor has run.
 */
#define _GNU_SOURCE
#include "os.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif
#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

extern char **environ;

static _Atomic uint64_t count_map, count_unmap, count_remap, count_madvise, count_map_fail;
static _Atomic uint64_t count_unmap_fail, count_advise_fail, count_remap_fail, count_injected;
static _Atomic long fail_map_countdown, fail_remap_countdown, fail_unmap_countdown,
    fail_advise_countdown, fail_thread_countdown;

static void counter_bump(_Atomic uint64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* A countdown armed by a test fires when it reaches exactly 1. */
static int hook_fires(_Atomic long *countdown)
{
    long left = atomic_load_explicit(countdown, memory_order_relaxed);
    while (left > 0) {
        if (atomic_compare_exchange_weak(countdown, &left, left - 1)) {
            if (left == 1)
                counter_bump(&count_injected);
            return left == 1;
        }
    }
    return 0;
}

void _ta_os_fail_nth_map(long n)
{
    atomic_store(&fail_map_countdown, n);
}

void _ta_os_fail_nth_remap(long n)
{
    atomic_store(&fail_remap_countdown, n);
}

void _ta_os_fail_nth_unmap(long n)
{
    atomic_store(&fail_unmap_countdown, n);
}

static atomic_int fail_every_unmap, fail_every_map;

void _ta_os_fail_every_unmap(int on)
{
    atomic_store(&fail_every_unmap, on);
}

void _ta_os_fail_every_map(int on)
{
    atomic_store(&fail_every_map, on);
}

static int every_fires(atomic_int *on)
{
    if (!atomic_load_explicit(on, memory_order_relaxed))
        return 0;
    counter_bump(&count_injected);
    return 1;
}

void _ta_os_fail_nth_advise(long n)
{
    atomic_store(&fail_advise_countdown, n);
}

void _ta_os_fail_nth_thread(long n)
{
    atomic_store(&fail_thread_countdown, n);
}

static ta_os_read_hook_t _Atomic read_hook;
static void *_Atomic read_hook_arg;

void _ta_os_set_read_hook(ta_os_read_hook_t hook, void *arg)
{
    atomic_store(&read_hook_arg, arg);
    atomic_store(&read_hook, hook);
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
    _Atomic long *countdown; /* a test's "fail the Nth" */
    atomic_int *every;       /* a test's "fail every one", or NULL */
    int injected;            /* the error an injected failure gives */
    _Atomic uint64_t *calls;
    _Atomic uint64_t *failures; /* NULL: failures are expected, not counted */
    long vma;                   /* VMAs one call may add */
} kcall_t;

static const kcall_t call_map = {&fail_map_countdown, &fail_every_map, ENOMEM,
                                 &count_map,          &count_map_fail, 1};
static const kcall_t call_unmap = {&fail_unmap_countdown, &fail_every_unmap, ENOMEM,
                                   &count_unmap,          &count_unmap_fail, 1};
static const kcall_t call_move = {&fail_remap_countdown, NULL, ENOMEM, &count_remap,
                                  &count_remap_fail,     3};
static const kcall_t call_grow_in_place = {&fail_remap_countdown, NULL, ENOMEM,
                                           &count_remap,          NULL, 0};
static const kcall_t call_advise = {&fail_advise_countdown, NULL, EAGAIN, &count_madvise,
                                    &count_advise_fail,     2};
static const kcall_t call_advise_in_place = {&fail_advise_countdown, NULL, EAGAIN, &count_madvise,
                                             &count_advise_fail,     0};

/* Whether the call goes to the kernel (counted, its VMAs bounded); false
 * with the injected error in *rc when a test hook fails it instead. */
static bool kcall_enter(const kcall_t *k, int *rc)
{
    if (hook_fires(k->countdown) || (k->every && every_fires(k->every))) {
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

static int raw_map(size_t size, void **out)
{
    int saved = errno, rc;
    if (kcall_enter(&call_map, &rc)) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        rc = p == MAP_FAILED ? errno : 0;
        if (rc == 0)
            *out = p;
    }
    return kcall_leave(&call_map, rc, saved);
}

static void (*_Atomic unmap_hook)(void *addr, size_t size);

void _ta_os_set_unmap_hook(void (*hook)(void *addr, size_t size))
{
    atomic_store(&unmap_hook, hook);
}

int _ta_os_unmap(void *addr, size_t size)
{
    int saved = errno, rc;
    void (*hook)(void *, size_t) = atomic_load_explicit(&unmap_hook, memory_order_relaxed);
    if (hook)
        hook(addr, size);
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
static atomic_int emulate_old_mremap;
static void *_Atomic emulated_intruder;

void _ta_os_emulate_old_mremap(int mode)
{
    atomic_store(&emulate_old_mremap, mode);
    atomic_store(&emulated_intruder, NULL);
}

void *_ta_os_emulated_intruder(void)
{
    return atomic_load(&emulated_intruder);
}

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
    if (atomic_load(&emulate_old_mremap) == 2) {
        size_t page = _ta_os_page_size();
        void *q = mmap((char *)to + size / 2 / page * page, page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (q != MAP_FAILED) {
            memset(q, 0x5a, page);
            atomic_store(&emulated_intruder, q);
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
        if (to == NULL || atomic_load_explicit(&emulate_old_mremap, memory_order_relaxed) == 0 ||
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
    /* DONTNEED and POPULATE_WRITE change no VMA */
    const kcall_t *k = advice == MADV_DONTNEED || advice == MADV_POPULATE_WRITE
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
static long read_small_file(const char *path, char *buf, size_t cap)
{
    int saved = errno;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long total = -1;
    if (fd >= 0) {
        total = 0;
        while ((size_t)total < cap - 1) {
            ssize_t n = read(fd, buf + total, cap - 1 - (size_t)total);
            if (n <= 0)
                break;
            total += n;
        }
        buf[total] = '\0';
        close(fd);
    }
    errno = saved;
    return total;
}

int _ta_os_thp_available(void)
{
    static _Atomic int cached = -1; /* read once: the hot path asks often */
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        char buf[128];
        v = read_small_file("/sys/kernel/mm/transparent_hugepage/enabled", buf, sizeof buf) > 0 &&
            strstr(buf, "[never]") == NULL;
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

size_t _ta_os_physical_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES);
    return pages > 0 ? (size_t)pages * _ta_os_page_size() : 0;
}

static long parse_long(const char *s)
{
    long v = 0;
    while (*s == ' ' || *s == '\t')
        s++;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

long _ta_os_max_map_count(void)
{
    char buf[64];
    if (read_small_file("/proc/sys/vm/max_map_count", buf, sizeof buf) <= 0)
        return 65530;
    long v = parse_long(buf);
    return v > 0 ? v : 65530;
}

size_t _ta_os_rss(void)
{
    char buf[4096];
    if (read_small_file("/proc/self/status", buf, sizeof buf) <= 0)
        return 0;
    const char *line = strstr(buf, "VmRSS:");
    return line ? (size_t)parse_long(line + 6) * 1024 : 0;
}

/* /proc/self/stat describes the thread-group leader: its state (Z once
 * it has ended while other threads live on) and the group's thread count,
 * the ended leader included. */
int _ta_os_only_thread_left(void)
{
    char buf[1024];
    if (read_small_file("/proc/self/stat", buf, sizeof buf) <= 0)
        return 0;
    const char *p = strrchr(buf, ')'); /* the name may hold spaces and ')' */
    if (p == NULL || p[1] != ' ')
        return 0;
    char state = p[2];
    p += 2;
    for (int field = 3; field < 20; field++) { /* on to field 20, num_threads */
        p = strchr(p, ' ');
        if (p == NULL)
            return 0;
        p++;
    }
    long threads = parse_long(p);
    return threads - (state == 'Z') <= 1;
}

uint64_t _ta_os_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

double _ta_os_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void _ta_os_write_stderr(const char *buf, size_t len)
{
    int saved = errno;
    while (len > 0) {
        ssize_t n = write(2, buf, len);
        if (n <= 0)
            break;
        buf += n;
        len -= (size_t)n;
    }
    errno = saved;
}

const char *_ta_os_getenv(const char *name)
{
    size_t len = strlen(name);
    if (environ == NULL)
        return NULL;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

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
    out->injected = atomic_load_explicit(&count_injected, memory_order_relaxed);
}

/* ---- files and threads ----------------------------------------------------- */

static atomic_int refuse_direct;

void _ta_os_refuse_direct(int on)
{
    atomic_store(&refuse_direct, on);
}

int _ta_os_open_read(const char *path, int direct, int *fd)
{
    if (direct && every_fires(&refuse_direct))
        return EINVAL;
    int saved = errno;
    int f = open(path, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    int rc = f < 0 ? errno : 0;
    errno = saved;
    if (rc == 0)
        *fd = f;
    return rc;
}

void _ta_os_close(int fd)
{
    int saved = errno;
    close(fd);
    errno = saved;
}

int _ta_os_file_size(int fd, uint64_t *out)
{
    int saved = errno;
    struct stat st;
    int rc = fstat(fd, &st) == 0 ? 0 : errno;
    errno = saved;
    if (rc == 0)
        *out = (uint64_t)st.st_size;
    return rc;
}

int _ta_os_read_at(int fd, void *buf, size_t len, uint64_t off, size_t *got)
{
    ta_os_read_hook_t hook = atomic_load_explicit(&read_hook, memory_order_acquire);
    if (hook) {
        int rc = hook(atomic_load(&read_hook_arg), fd, &len, off);
        if (rc) {
            counter_bump(&count_injected);
            return rc;
        }
    }
    int saved = errno;
    ssize_t n;
    do
        n = pread(fd, buf, len, (off_t)off);
    while (n < 0 && errno == EINTR);
    int rc = n < 0 ? errno : 0;
    errno = saved;
    if (rc == 0)
        *got = (size_t)n;
    return rc;
}

int _ta_os_fadvise(int fd, uint64_t off, uint64_t len, ta_os_fadvice_t advice)
{
    static const int advices[] = {[TA_OS_FADV_SEQUENTIAL] = POSIX_FADV_SEQUENTIAL,
                                  [TA_OS_FADV_WILLNEED] = POSIX_FADV_WILLNEED,
                                  [TA_OS_FADV_DONTNEED] = POSIX_FADV_DONTNEED};
    return posix_fadvise(fd, (off_t)off, (off_t)len, advices[advice]); /* returns the error */
}

int _ta_os_populate_write(void *addr, size_t size)
{
    return advise(addr, size, MADV_POPULATE_WRITE);
}

int _ta_os_thread_start(void *(*fn)(void *), void *arg, unsigned long *id)
{
    if (hook_fires(&fail_thread_countdown))
        return EAGAIN;
    pthread_t t;
    int rc = pthread_create(&t, NULL, fn, arg);
    if (rc == 0)
        *id = (unsigned long)t;
    return rc;
}

void _ta_os_thread_join(unsigned long id)
{
    pthread_join((pthread_t)id, NULL);
}

int _ta_os_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* A limit file's value: "max" and absurd v1 values (no limit) are 0. */
static size_t read_limit(const char *path)
{
    char buf[64];
    if (read_small_file(path, buf, sizeof buf) <= 0 || buf[0] < '0' || buf[0] > '9')
        return 0;
    unsigned long long v = 0;
    for (const char *c = buf; *c >= '0' && *c <= '9' && v < (1ULL << 60); c++)
        v = v * 10 + (unsigned long long)(*c - '0');
    return v >= (1ULL << 60) ? 0 : (size_t)v;
}

size_t _ta_os_cgroup_memory_limit(void)
{
    /* v2: "0::/path" in /proc/self/cgroup names this process's group. */
    char groups[4096], path[4200];
    if (read_small_file("/proc/self/cgroup", groups, sizeof groups) > 0) {
        for (char *line = groups; line && *line;) {
            char *next = strchr(line, '\n');
            if (next)
                *next++ = '\0';
            if (strncmp(line, "0::", 3) == 0) {
                snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.max", line + 3);
                size_t v = read_limit(path);
                if (v)
                    return v;
            }
            line = next;
        }
    }
    return read_limit("/sys/fs/cgroup/memory/memory.limit_in_bytes");
}
