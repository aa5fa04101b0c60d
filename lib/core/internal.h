/* SPDX-License-Identifier: MIT */
/*
 * Internals shared between the library's files (the "_ta_" tier): options,
 * the two allocation paths' entry points, the always-on invariant check and
 * a tiny lock. Lower layers never include the faces' headers.
 */
#ifndef TA_INTERNAL_H
#define TA_INTERNAL_H

#include "base/base.h"
#include "tensoralloc.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Mappings tensoralloc holds now (large blocks, pool entries, segments),
 * for the vm.max_map_count guard; defined with the statistics (stats.c). */
extern atomic_long _ta_live_mappings;

/* ---- large path (large.c) ------------------------------------------------ */
/* The large path never calls up: what a call leaves for its caller (the
 * front door, lib/alloc.c) comes back as bits in *events. */
enum {
    TA_LARGE_WAKE = 1,     /* the purge thread has a deadline to keep (pool, parked unmaps) */
    TA_LARGE_AT_LIMIT = 2, /* nothing mapped: a fresh mapping would reach the map-count guard */
};
/* Allocates a block with its own mapping; alignment is a power of two.
 * zero: the caller needs zeroed memory. Near the map-count guard a request
 * the pool cannot serve maps only if near_limit_ok, else it returns NULL
 * with TA_LARGE_AT_LIMIT. Returns NULL with errno set on failure. */
void *_ta_large_alloc(size_t size, size_t alignment, bool zero, bool near_limit_ok,
                      unsigned *events);
/* Returns true and fills *usable if p is a live large block. */
bool _ta_large_lookup(const void *p, size_t *usable);
/* Frees a large block; false if p is not one. */
bool _ta_large_free(void *p, unsigned *events);
/* Unmaps pool entries past their age or beyond the byte bound; returns
 * true while entries remain. */
bool _ta_large_expire(void);
/* Resizes a large block to size (>= threshold) with mremap; returns NULL
 * with errno set on failure (the block is untouched then). */
void *_ta_large_realloc(void *p, size_t size);
/* Empties the pool; with parked set, also retries every parked unmap
 * (else only those whose retry time has come). Returns events. */
unsigned _ta_large_trim(bool parked);
/* At the map-count guard: a block cut from a pack, a mapping shared by
 * many blocks (reads zero; never grown in place). NULL with ENOMEM. */
void *_ta_large_alloc_packed(size_t size, size_t alignment);
/* Marks (pin) or unmarks the large block starting at p as registered with
 * CUDA and returns its mapping. Returns 0, -1 if p is not a live large
 * block, 1 if it already is in that state. */
int _ta_large_pin_mark(const void *p, bool pin, uintptr_t *base, size_t *capacity);
/* Called, without locks held, before a pinned block's pages are unmapped,
 * pooled or moved (installed by the CUDA module). */
void _ta_large_set_unpin_hook(void (*hook)(uintptr_t base, size_t capacity));
/* Would a new mapping be refused by the vm.max_map_count guard? */
bool _ta_large_near_map_limit(void);
void _ta_large_stats(ta_stats_t *st);
void _ta_large_fork_prepare(void);
void _ta_large_fork_parent(void);
void _ta_large_fork_child(void);

/* ---- small path (slab.c) ------------------------------------------------- */
#define TA_SMALL_MAX ((size_t)1 << 20) /* largest slab size class */
/* The largest alignment slab blocks can honour: spans start on 64 KiB
 * pages, so no block is aligned beyond that. */
#define TA_SMALL_MAX_ALIGN ((size_t)64 << 10)
/* alignment <= TA_SMALL_MAX_ALIGN (larger ones fail with EINVAL). */
void *_ta_small_alloc(size_t size, size_t alignment, bool zero);
/* malloc's fast path, for size <= TA_SMALL_FAST_MAX; what it cannot serve
 * at once continues in _ta_malloc_general (alloc.c), a tail call. */
#define TA_SMALL_FAST_MAX 1024
void *_ta_small_malloc(size_t size);
void *_ta_malloc_general(size_t size);
/* A block with a mapping of its own (alloc.c), never a slab block, even
 * near the map-count guard: for CUDA staging buffers, which are pinned. */
void *_ta_alloc_mapped(size_t size, size_t alignment);
/* True if p lies in a slab segment: one bit per 4 MiB segment of a 48-bit
 * address space, read without a lock (inline: every free asks). */
#define TA_SEGMENT_SHIFT 22
#define TA_SEGMAP_WORDS (((size_t)1 << (48 - TA_SEGMENT_SHIFT)) / 64)
extern _Atomic uint64_t _ta_segmap[TA_SEGMAP_WORDS];
static inline bool _ta_small_owns(const void *p)
{
    uintptr_t a = (uintptr_t)p;
    if (TA_UNLIKELY((a >> 48) != 0))
        return false;
    size_t bit = a >> TA_SEGMENT_SHIFT;
    return (atomic_load_explicit(&_ta_segmap[bit / 64], memory_order_relaxed) >> (bit % 64)) & 1;
}
/* Wakes the purge thread itself when the block went to an abandoned heap
 * (no thread owns it), or to any heap while the purge thread is not
 * watching the remote lists. */
void _ta_small_free(void *p);
size_t _ta_small_usable(const void *p, const char *call);
/* Checks the size-class table and the division-free block index (tests). */
bool _ta_small_selfcheck(void);
void _ta_small_trim(void);
void _ta_small_stats(ta_stats_t *st);
void _ta_small_fork_prepare(void);
void _ta_small_fork_parent(void);
void _ta_small_fork_child(void);
void _ta_small_thread_done(void);
/* The purge thread's pass: drains and purges abandoned heaps, and trims
 * remote lists that live heaps left undrained for RETAIN_MS. True while
 * any of that waits. */
bool _ta_small_purge_pass(void);
/* Tests: called as a heap is given up, after its last tidy (0) and after
 * it is marked abandoned (1), in the thread giving it up. */
extern void (*_Atomic _ta_small_abandon_hook)(int stage);

/* ---- the purge thread (purge.c) ----------------------------------------- */
/* Process set-up (the condition variable's clock, the owning process). */
void _ta_purge_init(void);
/* There is work with a deadline: wakes the purge thread if it runs.
 * Never starts a thread (it runs under free, which glibc calls with its
 * own locks held). */
void _ta_purge_wake(void);
/* A thread is ending (its heap's key destructor): the purge thread looks
 * whether it is the last one left. */
void _ta_purge_thread_exiting(void);
/* Starts the purge thread where it may run and does not: called on
 * allocation paths only, outside every lock of ours. */
bool _ta_purge_thread_running(void);
bool _ta_purge_may_start(void);
void _ta_purge_start(void);
static inline void _ta_purge_ensure(void)
{
    if (TA_UNLIKELY(!_ta_purge_thread_running()) && _ta_purge_may_start())
        _ta_purge_start();
}
/* glibc's view: has the process ever had a second thread. */
bool _ta_process_has_threads(void);
void _ta_purge_fork_prepare(void);
void _ta_purge_fork_parent(void);
void _ta_purge_fork_child(void);

#endif
