/* SPDX-License-Identifier: MIT */
/*
 * The front door: the ta_* allocation API, malloc's fast path inline. It
 * checks arguments, picks the path by size (the large path at or above the threshold, slabs below)
 * and finds a block's path on free by asking the slab segment map, then the large table. Process
 * set-up (options, fork handlers, the exit report) lives here too.
 */
#define _GNU_SOURCE
#include "large.h"
#include "purge.h"
#include "slab.h"
#include "stats.h"
#include "tensoralloc_cache.h"
#include "tensoralloc_cuda.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static atomic_int process_state; /* 0 not ready, 2 ready */
static atomic_bool setup_claimed, atfork_done;

/* Fork may be entered again on the same thread: a signal handler that
 * forks while this thread is inside fork (fork is async-signal-safe, and
 * glibc serves it in a process that never had a second thread, where it
 * takes none of its own locks). So a nested prepare takes nothing (this
 * thread holds whatever the outer one took), and in a single-threaded
 * process none are taken at all: no other thread can hold them, and this
 * one may hold one itself if the signal came in the middle of a call.
 * Lock order: purge pass, purge wake, large lock, tidy lock, heaps lock. */
static _Thread_local unsigned fork_depth;
static _Thread_local bool fork_locked;

static void fork_prepare(void)
{
    if (fork_depth++ > 0)
        return;
    fork_locked = _ta_process_has_threads();
    if (!fork_locked)
        return;
    _ta_purge_fork_prepare();
    _ta_large_fork_prepare();
    _ta_small_fork_prepare();
}

static void fork_parent(void)
{
    if (--fork_depth > 0 || !fork_locked)
        return;
    _ta_small_fork_parent();
    _ta_large_fork_parent();
    _ta_purge_fork_parent();
}

/* Every lock is made anew, held or not: the child is one thread, and an
 * outer fork this child was nested in finds nothing left to unlock. */
static void fork_child(void)
{
    if (fork_depth > 0)
        fork_depth--;
    fork_locked = false;
    _ta_small_fork_child();
    _ta_large_fork_child();
    _ta_purge_fork_child();
}

/* Every call takes this path until the options have been read from a real
 * environment and the fork handlers are in place. */
static void process_init_slow(void)
{
    /* Whoever loses the set-up (another thread, or this one re-entering
     * from pthread_atfork) still needs the options read before it uses
     * them: _ta_options_init waits for the thread reading them (it never
     * allocates, so it never re-enters). */
    _ta_options_init();
    /* Every caller, not only the winner: a thread that loses the claim goes
     * on to allocate, free and exit, and the slabs' hooks must be in place
     * by then (idempotent: the same pid and the same two pointers). */
    _ta_purge_init();
    if (!atomic_exchange(&setup_claimed, true)) {
        /* pthread_atfork may allocate: it re-enters malloc, which is fine
         * now that the options are read. */
        _ta_os_at_fork(fork_prepare, fork_parent, fork_child);
        atomic_store(&atfork_done, true);
    }
    if (_ta_options_final() && atomic_load(&atfork_done))
        atomic_store_explicit(&process_state, 2, memory_order_release);
}

/* The exit report is printed from here, not from stats.c: alloc.c's object
 * is in every program that uses the allocator, stats.c's only where the
 * program asks for statistics (a static link takes what is referenced). */
__attribute__((destructor)) static void process_done(void)
{
    _ta_stats_exit_report();
}

static inline void process_init(void)
{
    if (TA_UNLIKELY(atomic_load_explicit(&process_state, memory_order_acquire) != 2))
        process_init_slow();
}

static inline size_t threshold(void)
{
    return (size_t)_ta_opt(TA_OPT_THRESHOLD);
}

static inline void large_events(unsigned events)
{
    if (events & TA_LARGE_WAKE)
        _ta_purge_wake(); /* the pool's age bound, or parked unmaps' timed retries */
}

/* A large request. Near vm.max_map_count, when the pool cannot serve it:
 * the pool is emptied first (its entries hold VMAs too), and if the
 * process is still at the limit the block is cut from a pack, a mapping
 * shared by many blocks (lib/core/large.c). */
static void *alloc_large(size_t size, size_t alignment, unsigned how)
{
    unsigned events = 0;
    void *p = _ta_large_alloc(size, alignment, how, &events);
    if (TA_UNLIKELY(p == NULL && (events & TA_LARGE_AT_LIMIT))) {
        events |= _ta_large_trim(false);
        events &= ~(unsigned)TA_LARGE_AT_LIMIT;
        p = _ta_large_alloc(size, alignment, how, &events);
        if (p == NULL && (events & TA_LARGE_AT_LIMIT))
            p = _ta_large_alloc_packed(size, alignment);
    }
    large_events(events);
    return p;
}

/* how: TA_LARGE_ZERO, TA_LARGE_FILLED (lib/core/large.h). */
static inline void *alloc_path(size_t size, size_t alignment, unsigned how)
{
    _ta_purge_ensure(); /* never under free: see lib/core/purge.c */
    if (size < threshold() && alignment <= TA_SMALL_MAX_ALIGN)
        return _ta_small_alloc(size, alignment, how & TA_LARGE_ZERO);
    return alloc_large(size, alignment, how);
}

void *_ta_alloc_mapped(size_t size, size_t alignment)
{
    process_init();
    unsigned events = 0;
    void *p = _ta_large_alloc(size, alignment, TA_LARGE_NEAR_LIMIT_OK, &events);
    large_events(events);
    return p;
}

/* Before an allocation fails, what is retained (pool entries, parked
 * unmaps, free slab pages and segments) goes back to the kernel and the
 * request is tried once more: under RLIMIT_AS or a cgroup limit, the
 * pool's address space is the room the request needs. */
__attribute__((noinline, cold)) static void *alloc_retry(size_t size, size_t alignment,
                                                         unsigned how)
{
    if (size > SIZE_MAX / 2)
        return NULL; /* errno is ENOMEM already */
    large_events(_ta_large_trim(true));
    _ta_small_trim();
    errno = 0;
    void *p = alloc_path(size, alignment, how);
    if (p == NULL && errno == 0)
        errno = ENOMEM;
    return p;
}

/* The most a request may ask for, its alignment's padding included. No
 * object may be larger than PTRDIFF_MAX (glibc's rule: pointer differences
 * inside it must not overflow), and on x86-64 and arm64 no mapping can be
 * larger than 2^48 bytes: the kernel hands out addresses above 2^47
 * (x86-64) or 2^48 (arm64) only at a caller's hint, even with 5-level
 * tables or 52-bit addresses, which the slab segment map assumes too. */
#if defined(__x86_64__) || defined(__aarch64__)
#define MAX_REQUEST ((size_t)1 << 48)
#else
#define MAX_REQUEST ((size_t)PTRDIFF_MAX)
#endif

/* Whether a request could ever succeed: checked before any system call, so
 * that a program probing impossible sizes (glibc's tst-malloc-too-large
 * tries every power-of-two alignment up to 2^63 with sizes from 2^50 to
 * SIZE_MAX) gets ENOMEM at once instead of failing mmaps, and so that
 * size + alignment cannot wrap further down the path. */
static inline bool request_possible(size_t size, size_t alignment)
{
    size_t padded;
    return !__builtin_add_overflow(size, alignment, &padded) && padded <= MAX_REQUEST;
}

/* alignment: a power of two; 0 or <= TA_MIN_ALIGN means natural. */
static inline void *alloc_aligned(size_t size, size_t alignment, unsigned how)
{
    process_init();
    if (TA_UNLIKELY(!request_possible(size, alignment) || alignment > ((size_t)1 << 40))) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = alloc_path(size, alignment, how);
    return TA_LIKELY(p != NULL) ? p : alloc_retry(size, alignment, how);
}

void *_ta_alloc_filled(size_t size)
{
    return alloc_aligned(size, 0, TA_LARGE_FILLED);
}

/* What malloc's fast path cannot serve at once: a thread's first
 * allocation, a span used up, larger sizes. Out of line, so that the fast
 * path stays a few loads and a pop. */
__attribute__((noinline)) static void *malloc_general(size_t size)
{
    return alloc_aligned(size, 0, 0);
}

/* The fast path, inline here as mimalloc's sits in its alloc.c: the
 * current span of the size's class has a free block (the layout is
 * slab.h's). Anything else (no heap yet: its spans' lists are empty; the
 * span used up) goes down to the general path, never back up. */
void *ta_malloc(size_t size)
{
    if (TA_LIKELY(size <= TA_SMALL_FAST_MAX)) {
        span_t *s = _ta_thread_heap->current[_ta_small_class[(size + 15) >> 4]];
        if (TA_LIKELY(s->free != LINK_END))
            return _ta_span_pop(s);
    }
    return malloc_general(size);
}

#ifdef TA_PRELOAD
/* The preload library's malloc and free are ta_malloc and ta_free under
 * the libc names: aliases, not calls (an alias must sit beside its
 * target, so these are here and not in lib/preload/preload.c). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmissing-attributes"
#endif
#define LIBC_ALIAS(name) __attribute__((alias(#name), visibility("default")))
void *malloc(size_t size) LIBC_ALIAS(ta_malloc);
void *__libc_malloc(size_t size) LIBC_ALIAS(ta_malloc);
void free(void *ptr) LIBC_ALIAS(ta_free);
void __libc_free(void *ptr) LIBC_ALIAS(ta_free);
#endif

void *ta_calloc(size_t count, size_t size)
{
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return alloc_aligned(total, 0, TA_LARGE_ZERO);
}

/* NULL and large blocks: out of line, so that a small free is the
 * ownership test and a jump. */
__attribute__((noinline)) static void free_not_small(void *ptr)
{
    if (ptr == NULL)
        return;
    unsigned events = 0;
    if (TA_UNLIKELY(!_ta_large_free(ptr, &events)))
        _ta_fatal("free", ptr, "invalid pointer");
    large_events(events);
}

void ta_free(void *ptr)
{
    if (TA_LIKELY(_ta_small_owns(ptr))) /* NULL is not: segment 0 is never a slab's */
        _ta_small_free(ptr);
    else
        free_not_small(ptr);
}

size_t ta_usable_size(const void *ptr)
{
    size_t usable;
    if (ptr == NULL)
        return 0;
    if (_ta_small_owns(ptr))
        return _ta_small_usable(ptr, "malloc_usable_size");
    if (!_ta_large_lookup(ptr, &usable))
        _ta_fatal("malloc_usable_size", ptr, "invalid pointer");
    return usable;
}

void *ta_realloc(void *ptr, size_t size)
{
    if (ptr == NULL)
        return ta_malloc(size);
    if (size == 0) { /* glibc: free and return NULL */
        ta_free(ptr);
        return NULL;
    }
    process_init();
    size_t old_usable;
    bool small = _ta_small_owns(ptr);
    if (small) {
        old_usable = _ta_small_usable(ptr, "realloc");
        /* Stay put while the block still fits and is not mostly slack. */
        if (size <= old_usable && size >= old_usable / 2)
            return ptr;
    } else {
        if (!_ta_large_lookup(ptr, &old_usable))
            _ta_fatal("realloc", ptr, "invalid pointer");
        if (size >= threshold() && request_possible(size, 0)) {
            void *moved = _ta_large_realloc(ptr, size); /* mremap: nothing copied */
            if (moved != NULL)
                return moved;
            /* The kernel refused the remap; a fresh block and a copy may
             * still succeed, and a failure there leaves ptr intact. */
        }
    }
    void *fresh = ta_malloc(size);
    if (fresh == NULL)
        return NULL; /* the old block stays valid */
    memcpy(fresh, ptr, size < old_usable ? size : old_usable);
    ta_free(ptr);
    return fresh;
}

static bool power_of_two(size_t a)
{
    return a != 0 && (a & (a - 1)) == 0;
}

void *ta_aligned_alloc(size_t alignment, size_t size)
{
    if (!power_of_two(alignment)) {
        errno = EINVAL;
        return NULL;
    }
    return alloc_aligned(size, alignment, 0);
}

int ta_posix_memalign(void **out, size_t alignment, size_t size)
{
    if (!power_of_two(alignment) || alignment % sizeof(void *) != 0)
        return EINVAL;
    int saved = errno;
    void *p = alloc_aligned(size, alignment, 0);
    int rc = p ? 0 : errno;
    errno = saved;
    if (p)
        *out = p;
    return rc;
}

void ta_trim(void)
{
    process_init();
    _ta_purge_ensure();
    large_events(_ta_large_trim(true));
    _ta_small_trim();
}

const char *ta_strerror(int err)
{
    switch (err) {
    case 0: return "success";
#define X(name, value, message)                                                                    \
    case name: return message;
        TA_ERRORS(X)
        TA_CUDA_ERRORS(X)
        TA_CACHE_ERRORS(X)
#undef X
    default: return strerror(err);
    }
}

const char *ta_version(void)
{
    return TA_VERSION_STRING;
}

int ta_version_number(void)
{
    return TA_VERSION_NUMBER;
}
