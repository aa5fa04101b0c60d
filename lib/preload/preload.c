/* SPDX-License-Identifier: MIT */
/*
 * The preload face: the C library's allocation symbols, glibc's __libc_*
 * aliases, the statistics and tuning calls (mallinfo2, malloc_trim,
 * malloc_stats, malloc_info, mallopt) and the C++ operators new/delete,
 * all forwarded to the ta_* front door (malloc and free themselves are
 * aliases of ta_malloc and ta_free, in lib/core/alloc.c). Built only into
 * libtensoralloc-preload.so, whose version script exports exactly these
 * plus ta_*. Written in C: operator new's failure path reaches libstdc++
 * through weak references, so a C program preloading this library does
 * not load libstdc++.
 */
#define _GNU_SOURCE
#include "core/core.h"

#include <errno.h>
#include <gnu/libc-version.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Aliases need not repeat every attribute glibc's headers put on malloc. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmissing-attributes"
#endif

/* Names no system header declares (or not in every glibc version). */
void cfree(void *ptr);
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t alignment, size_t size);
void *_Znwm(size_t n);
void *_Znam(size_t n);
void *_ZnwmRKSt9nothrow_t(size_t n, const void *t);
void *_ZnamRKSt9nothrow_t(size_t n, const void *t);
void *_ZnwmSt11align_val_t(size_t n, size_t a);
void *_ZnamSt11align_val_t(size_t n, size_t a);
void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *t);
void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *t);
void _ZdlPv(void *p);
void _ZdaPv(void *p);
void _ZdlPvm(void *p, size_t n);
void _ZdaPvm(void *p, size_t n);
void _ZdlPvRKSt9nothrow_t(void *p, const void *t);
void _ZdaPvRKSt9nothrow_t(void *p, const void *t);
void _ZdlPvSt11align_val_t(void *p, size_t a);
void _ZdaPvSt11align_val_t(void *p, size_t a);
void _ZdlPvmSt11align_val_t(void *p, size_t n, size_t a);
void _ZdaPvmSt11align_val_t(void *p, size_t n, size_t a);
void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *t);
void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *t);

#define EXPORT __attribute__((visibility("default")))
#define ALIAS(name) __attribute__((alias(#name), visibility("default")))

/* ---- C ------------------------------------------------------------------ */

EXPORT void *calloc(size_t count, size_t size)
{
    return ta_calloc(count, size);
}

EXPORT void *realloc(void *ptr, size_t size)
{
    return ta_realloc(ptr, size);
}

EXPORT void *reallocarray(void *ptr, size_t count, size_t size)
{
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return ta_realloc(ptr, total);
}

/* ---- the glibc version the process runs on ------------------------------
 * Where glibc releases differ (aligned_alloc's alignment check, mallopt's
 * threshold bound), this library does what the running glibc would.
 * gnu_get_libc_version returns a constant string: reading it allocates
 * nothing, so the first allocation may ask. */

static int glibc_version_read(void)
{
    const char *v = gnu_get_libc_version();
    int major = 0, minor = 0;
    while (*v >= '0' && *v <= '9')
        major = major * 10 + (*v++ - '0');
    if (*v == '.')
        v++;
    while (*v >= '0' && *v <= '9')
        minor = minor * 10 + (*v++ - '0');
    return major * 1000 + minor;
}

/* major * 1000 + minor: 2036 for glibc 2.36. */
static int glibc_version(void)
{
    static atomic_int cached; /* 0: not read yet; every reader finds the same */
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (TA_UNLIKELY(v == 0)) {
        v = glibc_version_read();
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

/* ---- the memalign family, with glibc's argument rules ---------------------
 * glibc (malloc/malloc.c, _mid_memalign): an alignment up to MALLOC_ALIGNMENT
 * is malloc; one above SIZE_MAX / 2 + 1 (no power of two) is EINVAL; any
 * other is rounded up to a power of two. A size that cannot be had with
 * that alignment is ENOMEM, found by arithmetic before any system call
 * (ta_aligned_alloc, lib/core/alloc.c). */

static bool power_of_two(size_t a)
{
    return a != 0 && (a & (a - 1)) == 0;
}

EXPORT void *memalign(size_t alignment, size_t size)
{
    if (alignment <= TA_MIN_ALIGN)
        return ta_malloc(size);
    if (alignment > SIZE_MAX / 2 + 1) {
        errno = EINVAL;
        return NULL;
    }
    size_t a = TA_MIN_ALIGN;
    while (a < alignment)
        a <<= 1;
    return ta_aligned_alloc(a, size);
}

/* Returns EINVAL for an alignment that is not a power-of-two multiple of
 * sizeof(void *), ENOMEM (errno ENOMEM too, as glibc leaves it) when the
 * block cannot be had; *out is written only on success. */
EXPORT int posix_memalign(void **out, size_t alignment, size_t size)
{
    if (!power_of_two(alignment) || alignment % sizeof(void *) != 0)
        return EINVAL;
    void *p = ta_aligned_alloc(alignment, size);
    if (p == NULL) {
        errno = ENOMEM;
        return ENOMEM;
    }
    *out = p;
    return 0;
}

/* glibc before 2.38: memalign under another name (alignment 0 or 24 gives
 * a block). From 2.38 (C17's wording): EINVAL unless a power of two. */
EXPORT void *aligned_alloc(size_t alignment, size_t size)
{
    if (glibc_version() >= 2038 && !power_of_two(alignment)) {
        errno = EINVAL;
        return NULL;
    }
    return memalign(alignment, size);
}

EXPORT void *valloc(size_t size)
{
    return ta_aligned_alloc(_ta_os_page_size(), size);
}

EXPORT void *pvalloc(size_t size)
{
    size_t page = _ta_os_page_size();
    if (size > SIZE_MAX - page) {
        errno = ENOMEM;
        return NULL;
    }
    return ta_aligned_alloc(page, _ta_align_up(size ? size : 1, page));
}

EXPORT size_t malloc_usable_size(void *ptr)
{
    return ta_usable_size(ptr);
}

EXPORT void cfree(void *ptr)
{
    ta_free(ptr);
}

EXPORT void free_sized(void *ptr, size_t size)
{
    (void)size;
    ta_free(ptr);
}

EXPORT void free_aligned_sized(void *ptr, size_t alignment, size_t size)
{
    (void)alignment;
    (void)size;
    ta_free(ptr);
}

/* ---- glibc's internal names, used by some programs and by ld.so ----------
 * Every __libc_* name glibc exports for an allocation function replaced
 * here (the preload-symbols test reads them from the running libc.so.6),
 * so that no caller reaches glibc's own allocator, idle under this one:
 * a block from one freed by the other ends the process. __libc_malloc and
 * __libc_free are in lib/core/alloc.c, with malloc and free. */

void *__libc_calloc(size_t count, size_t size) ALIAS(calloc);
void *__libc_realloc(void *ptr, size_t size) ALIAS(realloc);
void *__libc_reallocarray(void *ptr, size_t count, size_t size) ALIAS(reallocarray);
void *__libc_memalign(size_t alignment, size_t size) ALIAS(memalign);
void *__libc_aligned_alloc(size_t alignment, size_t size) ALIAS(aligned_alloc); /* 2.38 */
void *__libc_valloc(size_t size) ALIAS(valloc);
void *__libc_pvalloc(size_t size) ALIAS(pvalloc);
struct mallinfo __libc_mallinfo(void) ALIAS(mallinfo);
int __libc_mallopt(int param, int value) ALIAS(mallopt);
void __libc_cfree(void *ptr) ALIAS(cfree);
int __posix_memalign(void **out, size_t alignment, size_t size) ALIAS(posix_memalign);

/* ---- statistics and tuning ----------------------------------------------- */

EXPORT struct mallinfo2 mallinfo2(void)
{
    return ta_mallinfo2();
}

static int clamp_int(size_t v)
{
    return v > (size_t)__INT_MAX__ ? __INT_MAX__ : (int)v;
}

EXPORT struct mallinfo mallinfo(void)
{
    struct mallinfo2 m2 = ta_mallinfo2();
    struct mallinfo m;
    m.arena = clamp_int(m2.arena);
    m.ordblks = clamp_int(m2.ordblks);
    m.smblks = clamp_int(m2.smblks);
    m.hblks = clamp_int(m2.hblks);
    m.hblkhd = clamp_int(m2.hblkhd);
    m.usmblks = clamp_int(m2.usmblks);
    m.fsmblks = clamp_int(m2.fsmblks);
    m.uordblks = clamp_int(m2.uordblks);
    m.fordblks = clamp_int(m2.fordblks);
    m.keepcost = clamp_int(m2.keepcost);
    return m;
}

/* Returns 1 if anything was given back to the kernel, as glibc does. */
EXPORT int malloc_trim(size_t pad)
{
    (void)pad;
    ta_stats_t before = {.size = sizeof before}, after = {.size = sizeof after};
    ta_stats_get(&before);
    ta_trim();
    ta_stats_get(&after);
    return after.os_unmap_calls + after.os_madvise_calls >
           before.os_unmap_calls + before.os_madvise_calls;
}

/* glibc's layout, tensoralloc's figures: one "arena" (the slabs). */
EXPORT void malloc_stats(void)
{
    ta_stats_t st = {.size = sizeof st};
    ta_stats_get(&st);
    int saved = errno;
    fprintf(stderr,
            "Arena 0:\nsystem bytes     = %10llu\nin use bytes     = %10llu\n"
            "Total (incl. mmap):\nsystem bytes     = %10llu\nin use bytes     = %10llu\n"
            "max mmap regions = %10llu\nmax mmap bytes   = %10llu\n",
            (unsigned long long)st.small_committed_bytes, (unsigned long long)st.small_live_bytes,
            (unsigned long long)(st.small_committed_bytes + st.large_mapped_bytes),
            (unsigned long long)(st.small_live_bytes + st.large_live_bytes),
            (unsigned long long)st.large_live_count, (unsigned long long)st.large_peak_bytes);
    errno = saved;
}

/* glibc's XML shape (malloc/malloc.c, __malloc_info), our figures. */
EXPORT int malloc_info(int options, FILE *fp)
{
    if (options != 0 || fp == NULL)
        return EINVAL; /* glibc returns it (for options; a NULL fp crashes there) */
    ta_stats_t st = {.size = sizeof st};
    ta_stats_get(&st);
    fprintf(fp,
            "<malloc version=\"1\">\n<heap nr=\"0\">\n<sizes>\n</sizes>\n"
            "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
            "<total type=\"rest\" count=\"%llu\" size=\"%llu\"/>\n"
            "<system type=\"current\" size=\"%llu\"/>\n<system type=\"max\" size=\"%llu\"/>\n"
            "<aspace type=\"total\" size=\"%llu\"/>\n<aspace type=\"mprotect\" size=\"%llu\"/>\n"
            "</heap>\n"
            "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
            "<total type=\"rest\" count=\"%llu\" size=\"%llu\"/>\n"
            "<total type=\"mmap\" count=\"%llu\" size=\"%llu\"/>\n"
            "<total type=\"pool\" count=\"%llu\" size=\"%llu\"/>\n"
            "<system type=\"current\" size=\"%llu\"/>\n<system type=\"max\" size=\"%llu\"/>\n"
            "<aspace type=\"total\" size=\"%llu\"/>\n<aspace type=\"mprotect\" size=\"%llu\"/>\n"
            "</malloc>\n",
            (unsigned long long)st.small_spans,
            (unsigned long long)(st.small_committed_bytes - st.small_live_bytes),
            (unsigned long long)st.small_committed_bytes, (unsigned long long)st.small_peak_bytes,
            (unsigned long long)st.small_segment_bytes, (unsigned long long)st.small_segment_bytes,
            (unsigned long long)st.small_spans,
            (unsigned long long)(st.small_committed_bytes - st.small_live_bytes),
            (unsigned long long)st.large_live_count, (unsigned long long)st.large_mapped_bytes,
            (unsigned long long)st.pool_entries, (unsigned long long)st.pool_bytes,
            (unsigned long long)(st.small_committed_bytes + st.large_mapped_bytes),
            (unsigned long long)(st.small_peak_bytes + st.large_peak_bytes),
            (unsigned long long)(st.small_segment_bytes + st.large_mapped_bytes + st.pool_bytes),
            (unsigned long long)(st.small_segment_bytes + st.large_mapped_bytes + st.pool_bytes));
    return 0;
}

/* mallopt: glibc's answers (malloc/malloc.c, __libc_mallopt), and the
 * parameters that mean something here change the options. glibc reads the
 * int value as a size_t (so -1 is "as large as can be") and returns 1 for
 * every parameter, known or not, except an M_MXFAST above MAX_FAST_SIZE
 * (80 * sizeof(size_t) / 4) and, before 2.35, an M_MMAP_THRESHOLD above
 * HEAP_MAX_SIZE / 2 (the 2.35 huge-page series dropped that bound; 2.36
 * accepts any value). M_TRIM_THRESHOLD -1, "never trim", keeps the most
 * the pool may (RETAIN_BYTES at its bound). */
#define MAX_FAST_SIZE (80 * sizeof(size_t) / 4)
#define OLD_GLIBC_MMAP_THRESHOLD_MAX (4 * ((size_t)1 << 20) * sizeof(long)) /* 32 MiB */
#define RETAIN_BYTES_MAX ((size_t)1 << 50) /* the option's bound (options.c) */
EXPORT int mallopt(int param, int value)
{
    size_t v = (size_t)(long)value;
    switch (param) {
    case M_MXFAST: return v <= MAX_FAST_SIZE; /* no fast bins here: accepted, no effect */
    case M_MMAP_THRESHOLD:                    /* the large path's threshold, within its bounds */
        if (v > OLD_GLIBC_MMAP_THRESHOLD_MAX && glibc_version() < 2035)
            return 0;
        ta_option_set(TA_OPT_THRESHOLD, v < (16 << 10)  ? (16 << 10)
                                        : v > (1 << 20) ? (1 << 20)
                                                        : (long long)v);
        return 1;
    case M_TRIM_THRESHOLD: /* free memory kept before it goes back: the pool */
        ta_option_set(TA_OPT_RETAIN_BYTES,
                      (long long)(v > RETAIN_BYTES_MAX ? RETAIN_BYTES_MAX : v));
        return 1;
    default: /* M_MMAP_MAX, M_TOP_PAD, M_PERTURB, M_CHECK_ACTION, the arena knobs:
                nothing to act on (large blocks are mappings by design, there
                are no arenas); anything else: glibc's 1 */
        return 1;
    }
}

/* ---- C++ operators new and delete ------------------------------------------
 * Mangled names for the Itanium ABI (x86-64, AArch64). The throwing forms
 * follow [new.delete.single]: on failure call the new-handler, retry, and
 * throw std::bad_alloc when there is none. */

typedef void (*new_handler_t)(void);
extern new_handler_t _ZSt15get_new_handlerv(void) __attribute__((weak));
extern void _ZSt17__throw_bad_allocv(void) __attribute__((weak, noreturn));

static void *new_failed(size_t size, size_t alignment, bool nothrow)
{
    for (;;) {
        new_handler_t handler = _ZSt15get_new_handlerv ? _ZSt15get_new_handlerv() : NULL;
        if (handler == NULL) {
            if (nothrow)
                return NULL;
            if (_ZSt17__throw_bad_allocv)
                _ZSt17__throw_bad_allocv();
            _ta_fatal("operator new", NULL, "out of memory and no C++ runtime to throw");
        }
        handler();
        void *p = alignment ? ta_aligned_alloc(alignment, size) : ta_malloc(size);
        if (p)
            return p;
    }
}

static inline void *cxx_new(size_t size, size_t alignment, bool nothrow)
{
    void *p = alignment ? ta_aligned_alloc(alignment, size) : ta_malloc(size);
    return TA_LIKELY(p != NULL) ? p : new_failed(size, alignment, nothrow);
}

EXPORT void *_Znwm(size_t n)
{
    return cxx_new(n, 0, false);
}
EXPORT void *_Znam(size_t n)
{
    return cxx_new(n, 0, false);
}
EXPORT void *_ZnwmRKSt9nothrow_t(size_t n, const void *t)
{
    (void)t;
    return cxx_new(n, 0, true);
}
EXPORT void *_ZnamRKSt9nothrow_t(size_t n, const void *t)
{
    (void)t;
    return cxx_new(n, 0, true);
}
EXPORT void *_ZnwmSt11align_val_t(size_t n, size_t a)
{
    return cxx_new(n, a, false);
}
EXPORT void *_ZnamSt11align_val_t(size_t n, size_t a)
{
    return cxx_new(n, a, false);
}
EXPORT void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *t)
{
    (void)t;
    return cxx_new(n, a, true);
}
EXPORT void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *t)
{
    (void)t;
    return cxx_new(n, a, true);
}

EXPORT void _ZdlPv(void *p)
{
    ta_free(p);
}
EXPORT void _ZdaPv(void *p)
{
    ta_free(p);
}
EXPORT void _ZdlPvm(void *p, size_t n)
{
    (void)n;
    ta_free(p);
}
EXPORT void _ZdaPvm(void *p, size_t n)
{
    (void)n;
    ta_free(p);
}
EXPORT void _ZdlPvRKSt9nothrow_t(void *p, const void *t)
{
    (void)t;
    ta_free(p);
}
EXPORT void _ZdaPvRKSt9nothrow_t(void *p, const void *t)
{
    (void)t;
    ta_free(p);
}
EXPORT void _ZdlPvSt11align_val_t(void *p, size_t a)
{
    (void)a;
    ta_free(p);
}
EXPORT void _ZdaPvSt11align_val_t(void *p, size_t a)
{
    (void)a;
    ta_free(p);
}
EXPORT void _ZdlPvmSt11align_val_t(void *p, size_t n, size_t a)
{
    (void)n;
    (void)a;
    ta_free(p);
}
EXPORT void _ZdaPvmSt11align_val_t(void *p, size_t n, size_t a)
{
    (void)n;
    (void)a;
    ta_free(p);
}
EXPORT void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *t)
{
    (void)a;
    (void)t;
    ta_free(p);
}
EXPORT void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *t)
{
    (void)a;
    (void)t;
    ta_free(p);
}
