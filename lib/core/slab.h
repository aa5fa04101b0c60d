/* SPDX-License-Identifier: MIT */
/*
 * The small path (slab.c): size-class slabs in segments, per-thread
 * heaps. Included by the files above it in lib/core/; the front door also
 * reads the heap and span layout below for malloc's inline fast path.
 */
#ifndef TA_SLAB_H
#define TA_SLAB_H

#include "core.h"

#include <stdatomic.h>

/* ---- small path (slab.c) ------------------------------------------------- */
#define TA_SMALL_MAX ((size_t)1 << 20) /* largest slab size class */
/* The largest alignment slab blocks can honour: spans start on 64 KiB
 * pages, so no block is aligned beyond that. */
#define TA_SMALL_MAX_ALIGN ((size_t)64 << 10)
/* alignment <= TA_SMALL_MAX_ALIGN (larger ones fail with EINVAL). */
void *_ta_small_alloc(size_t size, size_t alignment, bool zero);
/* Sizes malloc's fast path serves (in the front door, lib/core/alloc.c,
 * inline, from the layout below). */
#define TA_SMALL_FAST_MAX 1024
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
/* Memory pressure: the free pages of every heap, live or exited, go back
 * to the kernel now (a live heap whose owner holds its page lock is passed
 * over: the owner is releasing a span and purges what is due). */
void _ta_small_release_now(void);
void _ta_small_stats(ta_stats_t *st);
void _ta_small_fork_prepare(void);
void _ta_small_fork_parent(void);
void _ta_small_fork_child(void);
void _ta_small_thread_done(void);
/* The purge thread's pass: drains and purges abandoned heaps, and trims
 * remote lists that live heaps left undrained for RETAIN_MS. True while
 * any of that waits. */
bool _ta_small_purge_pass(void);
/* Installed by the purge thread's set-up (the slabs never call it by name):
 * wake when a free leaves it work, thread_exiting from a heap's key
 * destructor, running to learn whether the thread exists. */
void _ta_small_set_purge_hooks(void (*wake)(void), void (*thread_exiting)(void),
                               bool (*running)(void));
/* Tests (the test build only, TA_TEST_HOOKS): called as a heap is given
 * up, after its last tidy (0) and after it is marked abandoned (1), in the
 * thread giving it up. */
extern void (*_Atomic _ta_small_abandon_hook)(int stage);
/* Tests: segments span_new looked at for waiting pages, counted. */
extern _Atomic uint64_t _ta_small_waiting_walks;


/* ---- the layout malloc's inline fast path reads (the rest is slab.c's) -- */
/* Link values: below 4096 a block index (the next on a list). */
#define LINK_END 0xFFFFu       /* the end of a list */
#define LINK_ALLOC 0xFFFEu     /* handed out to the program */
#define LINK_TAIL 0xFFFDu      /* past the last block: no block starts here */
#define TF_NOTIFIED (1u << 16) /* in thread_free: the span is on remote_spans */

#define CLASS_COUNT 60
/* Classes from here up (16 KiB blocks and more) park an emptied current
 * span (slab.c, span_park). */
#define PARK_FIRST_CLASS 35

struct segment_s;
/* Three cache lines, by who writes them: a thread freeing into a span
 * reads its geometry while the owner writes its list heads on every
 * allocation, and sharing one line made a producer/consumer pair 3x slower
 * whenever the two ran on different cores. */
typedef struct span_s {
    /* Geometry: written when the span is made, then read by every free. */
    char *start;     /* its first block */
    uint16_t *links; /* per block: a list link or LINK_* (in the segment's metadata) */
    uint64_t recip;  /* ceil(2^42 / block_size): block index without a division */
    uint32_t block_size;
    uint16_t capacity;
    uint8_t class_idx;
    uint8_t pages;
    uint16_t link_unit, link_units; /* where its link array lies in the link area */
    /* The owner's. */
    _Alignas(64) uint16_t free; /* the owner allocates from this list */
    uint16_t local_free;        /* the owner's frees since the last refill */
    int32_t used;               /* blocks out: handed out, or freed by others and not yet taken */
    uint8_t state;              /* SPAN_* */
    uint16_t held;         /* blocks a trimmer gave the pages of back, for the owner (trim_busy) */
    uint32_t used_flushed; /* used when last added to the statistics */
    struct span_s *next, *prev; /* the heap's list of partial spans of this class */
    /* Other threads'. */
    _Alignas(64) _Atomic uint32_t thread_free; /* their frees: a list head | TF_NOTIFIED */
    struct span_s *next_notified;              /* the link on the heap's remote_spans */
} span_t;

typedef struct heap_s {
    span_t *current[CLASS_COUNT]; /* first: the malloc fast path reads it */
    span_t *partial[CLASS_COUNT];
    struct segment_s *segments;
    struct segment_s *spare;               /* one empty segment kept to avoid map/unmap churn */
    _Atomic(span_t *) remote_spans; /* spans other threads freed into (NOTIFIED ones) */
    struct heap_s *next_all;
    struct heap_s *next_abandoned;
    /* The heap's free pages (segments, their page bits, the spare): the
     * owner's span paths hold it, and so does the purge thread when it
     * gives back the free pages of an owner gone idle. */
    ta_lock_t pages_lock;
    _Atomic int pages_holder_pid; /* the purge thread's process while it holds it */
    bool orphaned;                /* a fork child's heap of a thread not in it */
    _Atomic size_t dirty_bytes;       /* written under pages_lock */
    _Atomic uint64_t dirty_since_ms;  /* when dirty_bytes last left zero */
    /* Emptied current spans of the big classes, out of the fast path but
     * still built: the owner takes one back with an exchange, the purge
     * thread (under pages_lock) once it has stayed RETAIN_MS. */
    _Atomic(struct span_s *) parked[CLASS_COUNT - PARK_FIRST_CLASS];
    _Atomic uint32_t park_gen; /* the owner's parks and unparks, counted */
    uint32_t watch_park_gen;   /* the purge thread's view of park_gen, */
    uint64_t watch_park_ms;    /* and since when it has not changed */
    bool registered;         /* on all_heaps */
    bool sweeping;           /* segments stay while the owner walks them */
    atomic_bool abandoned;   /* no thread owns it: it sits on the abandoned list */
    int64_t live_delta;      /* not yet flushed to small_live */
    /* Trimming by other threads (malloc_trim, the purge thread). */
    atomic_bool trim_busy;     /* a trimmer or the owner's sweep holds the held blocks */
    atomic_bool trimmed;       /* a trimmer left work for the owner's next sweep */
    _Atomic uint64_t collects; /* the owner's looks at remote_spans, for idleness */
    uint64_t watch_collects;   /* the purge thread's view: collects when last seen */
    uint64_t watch_since_ms;   /* since when remote_spans has waited, untaken */
    span_t *watch_head;        /* remote_spans after the purge thread's last trim */
} heap_t;

/* The calling thread's heap; until it has one, a heap whose current spans
 * all have empty free lists, so that the fast path needs no NULL test. */
extern TA_TLS heap_t *_ta_thread_heap;
/* The size class by (size + 15) / 16, up to TA_SMALL_FAST_MAX. */
extern const uint8_t _ta_small_class[TA_SMALL_FAST_MAX / 16 + 1];

/* Pops the head of s's free list (not empty). */
static inline void *_ta_span_pop(span_t *s)
{
    uint32_t b = s->free;
    s->free = s->links[b];
    s->links[b] = LINK_ALLOC;
    s->used++;
    return s->start + (size_t)b * s->block_size;
}

#endif
