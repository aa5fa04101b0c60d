/* SPDX-License-Identifier: MIT */
/*
 * The small path: size-class slabs in 4 MiB segments that this file maps
 * itself. A segment is 64 slab pages of 64 KiB; the first META_PAGES hold
 * its metadata: span descriptors and, per span, an array of 16-bit block
 * links. Nothing is kept inside a block, free or not, so a user overflow
 * cannot reach the allocator's state. A span is a run of pages serving one
 * size class.
 *
 * Block lists, per span, after mimalloc's (docs/design.md "Small path"):
 * the owner allocates from `free` and pushes its own frees onto
 * `local_free`; other threads push onto `thread_free`, one atomic word,
 * which the owner takes over in one exchange when its lists run dry. The
 * lists are chains of block indices in the span's link array; a block's
 * link is LINK_ALLOC while it is handed out, so a second free of it is
 * caught exactly, on every path. The first free by another thread into a
 * span also marks it NOTIFIED (in the same atomic word) and pushes the
 * span onto its heap's remote_spans stack, so that the owner finds frees
 * into spans it does not allocate from (full ones). The owner's fast
 * paths take no lock and do no atomic read-modify-write.
 *
 * Every thread owns a heap. A span that empties gives its pages back to
 * the segment; free pages are returned to the kernel with MADV_DONTNEED
 * once a heap holds more than a few MiB of them, and on trim. A heap whose
 * thread exits is abandoned and later adopted whole by a new thread, so
 * heaps are never destroyed.
 */
#define _GNU_SOURCE
#include "slab.h"
#include "base/list.h"

#include <errno.h>
#include <string.h>

#define SEGMENT_SHIFT 22
#define SEGMENT_SIZE ((size_t)1 << SEGMENT_SHIFT) /* 4 MiB */
#define SLAB_PAGE_SHIFT 16
#define SLAB_PAGE_SIZE ((size_t)1 << SLAB_PAGE_SHIFT) /* 64 KiB */
#define SEGMENT_PAGES 64
#define META_PAGES 8 /* pages 0-7: the header and the link arrays */
#define SPAN_MAX_BLOCKS 4096
#define SPAN_MAX_PAGES 16 /* slab pages of the largest span */
#define SPAN_MAX_OS_PAGES (SPAN_MAX_PAGES * SLAB_PAGE_SIZE / 4096) /* at 4 KiB pages */
#define SEGMENT_MAGIC 0x5441534547ULL                              /* "TASEG" */
#define PURGE_LIMIT ((size_t)8 << 20) /* free pages a heap may keep */
#define STATS_BATCH 65536             /* live-byte deltas flushed beyond this */


/* ---- size classes: 16-byte steps to 128, then four per doubling -------- */


typedef struct {
    uint32_t block_size;
    uint16_t capacity; /* blocks per span */
    uint8_t pages;     /* slab pages per span */
} class_info_t;

static class_info_t classes[CLASS_COUNT];
/* The two directions of the one rule, each written once, and checked
 * against each other by the slab suite (_ta_small_selfcheck): the class of
 * a size n (lg is floor(log2(n - 1)), needed only above 128) and the block
 * size of a class c. */
#define CLASS_OF(n, lg)                                                                            \
    ((n) <= 128 ? ((n) ? ((n)-1) >> 4 : 0) : 8 + ((lg)-7) * 4 + ((((n)-1) >> ((lg)-2)) & 3))
#define CLASS_SIZE(c)                                                                              \
    ((c) < 8 ? 16 * ((size_t)(c) + 1) : ((size_t)128 << (((c)-8) / 4)) * (5 + ((c)-8) % 4) / 4)

/* The class by (size + 15) / 16, up to TA_SMALL_FAST_MAX: a constant,
 * because malloc's fast path reads it before the thread has a heap, so
 * before any thread may have run classes_init (filled at run time, that
 * was a data race ThreadSanitizer caught). Its lg is a constant
 * expression for 128 <= m < 1024. */
#define CLASS_LG_FAST(m) ((m) >= 512 ? 9 : (m) >= 256 ? 8 : 7)
#define CLASS_FAST(n) CLASS_OF(n, CLASS_LG_FAST((n)-1))
#define CLASS_ROW(i)                                                                               \
    CLASS_FAST((i)*16), CLASS_FAST((i)*16 + 16), CLASS_FAST((i)*16 + 32),                          \
        CLASS_FAST((i)*16 + 48), CLASS_FAST((i)*16 + 64), CLASS_FAST((i)*16 + 80),                 \
        CLASS_FAST((i)*16 + 96), CLASS_FAST((i)*16 + 112)
_Static_assert(TA_SMALL_FAST_MAX == 1024, "the rows below and CLASS_LG_FAST cover 1 KiB");
const uint8_t _ta_small_class[TA_SMALL_FAST_MAX / 16 + 1] = {
    CLASS_ROW(0),  CLASS_ROW(8),  CLASS_ROW(16), CLASS_ROW(24),         CLASS_ROW(32),
    CLASS_ROW(40), CLASS_ROW(48), CLASS_ROW(56), CLASS_FAST(TA_SMALL_FAST_MAX)};

/* ceil(2^42 / bs): for every offset below 2^20 (a span is at most 1 MiB)
 * and bs <= 2^20, (off * recip) >> 42 == off / bs, since the rounding
 * error off * (recip * bs - 2^42) stays below 2^40 (checked for every
 * class and offset by the slab suite). */
static inline uint64_t block_recip(uint32_t bs)
{
    return ((1ULL << 42) + bs - 1) / bs;
}

static inline int class_of_computed(size_t size)
{
    return (int)CLASS_OF(size, 63 - __builtin_clzll((unsigned long long)(size - 1)));
}

static void classes_init(void)
{
    for (int c = 0; c < CLASS_COUNT; c++) {
        size_t bs = CLASS_SIZE(c);
        size_t k = 1;
        for (; k < SPAN_MAX_PAGES; k++) {
            size_t span = k * SLAB_PAGE_SIZE;
            size_t cap = span / bs;
            if (cap >= 1 && (span - cap * bs) * 8 <= span)
                break;
        }
        size_t cap = k * SLAB_PAGE_SIZE / bs;
        classes[c] = (class_info_t){
            (uint32_t)bs, (uint16_t)(cap > SPAN_MAX_BLOCKS ? SPAN_MAX_BLOCKS : cap), (uint8_t)k};
    }
}

static inline int class_of(size_t size)
{
    if (TA_LIKELY(size <= TA_SMALL_FAST_MAX))
        return _ta_small_class[(size + 15) >> 4];
    return class_of_computed(size);
}

/* For the slab suite: the division-free block index agrees with the
 * division at every offset of every class's span, and the size table
 * agrees with the computed classes. */
bool _ta_small_selfcheck(void)
{
    classes_init();
    for (int c = 0; c < CLASS_COUNT; c++) {
        uint32_t bs = classes[c].block_size;
        uint64_t recip = block_recip(bs);
        size_t span_bytes = (size_t)classes[c].pages * SLAB_PAGE_SIZE;
        for (size_t off = 0; off < span_bytes; off++)
            if (((off * recip) >> 42) != off / bs)
                return false;
    }
    for (size_t size = 0; size <= TA_SMALL_FAST_MAX; size++)
        if (class_of(size) != class_of_computed(size) || classes[class_of(size)].block_size < size)
            return false;
    /* CLASS_OF and CLASS_SIZE are inverses: a class's size is its own
     * largest request, one byte more is the next class's. */
    for (int c = 0; c < CLASS_COUNT; c++) {
        size_t bs = CLASS_SIZE(c);
        if (class_of_computed(bs) != c || (c + 1 < CLASS_COUNT && class_of_computed(bs + 1) != c + 1))
            return false;
    }
    if (CLASS_SIZE(CLASS_COUNT - 1) != TA_SMALL_MAX)
        return false;
    return true;
}

/* ---- metadata: spans, segments, heaps ------------------------------------ */


enum { SPAN_FREE, SPAN_CURRENT, SPAN_LISTED, SPAN_FULL, SPAN_PARKED };

/* A full span on no list carries USED_FULL in used, so that a free into
 * it takes the slow path by the same single test as a free that empties
 * a span: (int32_t)(used - 1) <= 0. */
#define USED_FULL INT32_MIN


/* The segment's first META_PAGES: this header, then the link area, cut
 * into 256-byte units; a span's link array is a run of units (2 bytes a
 * block: a span of 16-byte blocks needs 8 KiB). */
#define META_BYTES ((size_t)META_PAGES * SLAB_PAGE_SIZE)
#define LINK_AREA ((size_t)32 << 10) /* where the link area starts */
#define LINK_UNIT 256
#define LINK_UNITS ((META_BYTES - LINK_AREA) / LINK_UNIT)
#define LINK_MAX_OS_PAGES ((META_BYTES - LINK_AREA) / 4096)
#define META_MASK ((1ULL << META_PAGES) - 1)

typedef struct segment_s {
    uint64_t magic;
    struct heap_s *heap;
    struct segment_s *next, *prev;
    uint64_t used_pages;                                /* bit i: page i is metadata or in a span */
    uint64_t dirty_pages;                               /* free pages still backed by memory */
    uint64_t link_used[LINK_UNITS / 64];                /* units of the link area in use */
    uint64_t link_dirty[(LINK_MAX_OS_PAGES + 63) / 64]; /* its OS pages with units freed */
    span_t *page_span[SEGMENT_PAGES];                   /* page -> its span; &no_span when none */
    span_t spans[SEGMENT_PAGES];                        /* indexed by a span's first page */
} segment_t;

_Static_assert(sizeof(segment_t) <= LINK_AREA, "segment header must fit before the links");
_Static_assert(LINK_UNITS % 64 == 0, "whole bitmap words");
_Static_assert((SEGMENT_PAGES - META_PAGES) * (SLAB_PAGE_SIZE / 16 * 2 + LINK_UNIT) <=
                   LINK_UNITS * LINK_UNIT,
               "links for a segment of 16-byte spans must fit");

/* Stands for "no span": the span of every page not in one (its zero start,
 * reciprocal and block size fail free's block test for every pointer) and
 * a heap's current span of a class it has none of (its free list is
 * empty), so that neither fast path tests for NULL. */
static span_t no_span = {.free = LINK_END, .local_free = LINK_END, .thread_free = LINK_END};


static _Atomic int64_t dirty_total; /* sum of the heaps' dirty_bytes, for statistics */

/* Every change of a heap's free-page bytes goes through here, so that the
 * statistics never read another thread's heap. */
static inline void dirty_add(heap_t *h, int64_t delta)
{
    size_t was = atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed);
    /* seq_cst: pairs with the purge thread's last look before it sleeps
     * (span_release wakes it when this leaves pages to wait). */
    atomic_store_explicit(&h->dirty_bytes, (size_t)((int64_t)was + delta), memory_order_seq_cst);
    atomic_fetch_add_explicit(&dirty_total, delta, memory_order_relaxed);
}

/* The owner's take of its heap's pages_lock. Only the purge thread
 * contends for it, briefly. A child made by _Fork (no fork handlers) may
 * find it held by the parent's purge thread, which is not in the child:
 * the holder's process id tells, and the child takes the lock over. */
static void pages_lock_own(heap_t *h)
{
    while (!_ta_lock_try(&h->pages_lock)) {
        int holder = atomic_load_explicit(&h->pages_holder_pid, memory_order_relaxed);
        if (holder != 0 && holder != _ta_os_pid()) {
            atomic_store_explicit(&h->pages_holder_pid, 0, memory_order_relaxed);
            return; /* held, now by this process's thread */
        }
        _ta_os_yield();
    }
}

/* ---- global state ---------------------------------------------------------- */

static ta_lock_t heaps_lock; /* guards all_heaps, abandoned, heap_chunk */
/* One tidier of the abandoned heaps at a time (taken before heaps_lock):
 * a trim must reach every one of them, also those a purge pass has taken
 * off the list to tidy. Never taken on an allocation path. */
static ta_lock_t tidy_lock;
static heap_t *all_heaps;
static heap_t *abandoned;
static char *heap_chunk;
static size_t heap_chunk_left;
static atomic_bool slab_ready;
static ta_os_key_t heap_key;

/* A thread's heap; until it has one, empty_heap, whose current spans are
 * all no_span, so that the fast paths need no NULL test. */
#define NO_SPAN_4 &no_span, &no_span, &no_span, &no_span
#define NO_SPAN_20 NO_SPAN_4, NO_SPAN_4, NO_SPAN_4, NO_SPAN_4, NO_SPAN_4
_Static_assert(CLASS_COUNT == 60, "empty_heap's initialiser");
static heap_t empty_heap = {.current = {NO_SPAN_20, NO_SPAN_20, NO_SPAN_20}};
TA_TLS heap_t *_ta_thread_heap = &empty_heap;
/* This thread's heap key destructor has run: the thread is ending. */
static TA_TLS bool tls_exiting;

static _Atomic int64_t small_live, small_peak;
static _Atomic uint64_t committed_bytes, segment_bytes, span_count, heap_count;
static _Atomic uint64_t remote_released_bytes;
static _Atomic uint64_t mapping_count; /* segments and heap chunks, for statistics */
static atomic_bool purge_watching; /* the purge thread watches the live heaps' lists */

/* The purge thread (lib/core/purge.c, above this file) installs these at
 * process set-up: a free that leaves work for it wakes it, and a thread's
 * end lets it look whether it is the last one left. The slabs never call
 * up by name. */
static struct {
    void (*_Atomic wake)(void);
    void (*_Atomic thread_exiting)(void);
    bool (*_Atomic running)(void);
} purge_hooks;

static inline void purge_hook(void (*_Atomic *hook)(void))
{
    void (*fn)(void) = atomic_load_explicit(hook, memory_order_acquire);
    if (fn)
        fn();
}

void _ta_small_set_purge_hooks(void (*wake)(void), void (*thread_exiting)(void),
                               bool (*running)(void))
{
    atomic_store_explicit(&purge_hooks.wake, wake, memory_order_release);
    atomic_store_explicit(&purge_hooks.thread_exiting, thread_exiting, memory_order_release);
    atomic_store_explicit(&purge_hooks.running, running, memory_order_release);
}

/* Whether a purge thread exists to give back what is left waiting. */
static bool purge_thread_runs(void)
{
    bool (*fn)(void) = atomic_load_explicit(&purge_hooks.running, memory_order_acquire);
    return fn && fn();
}

/* One bit per 4 MiB of a 48-bit address space marks slab segments, so that
 * free() can tell a slab block from a large block without touching either
 * (the test itself is inline, in slab.h). */
#define SEGMAP_BITS ((size_t)1 << (48 - SEGMENT_SHIFT))
_Static_assert(SEGMENT_SHIFT == TA_SEGMENT_SHIFT, "slab.h's ownership test");
/* In .bss (8 MiB of address space, resident only where a segment's word
 * was written): its address is a link-time constant, so the test needs no
 * load and no NULL check. */
_Static_assert(SEGMAP_BITS / 64 == TA_SEGMAP_WORDS, "slab.h's map size");
_Atomic uint64_t _ta_segmap[TA_SEGMAP_WORDS];

static void segmap_set(uintptr_t seg, bool on)
{
    size_t bit = seg >> SEGMENT_SHIFT;
    _Atomic uint64_t *word = &_ta_segmap[bit / 64];
    if (on)
        atomic_fetch_or_explicit(word, 1ULL << (bit % 64), memory_order_release);
    else
        atomic_fetch_and_explicit(word, ~(1ULL << (bit % 64)), memory_order_release);
}

/* ---- statistics: counted per span, flushed on the slow paths --------------
 * The fast paths only count a span's used blocks. The bytes live are added
 * to the heap's delta when a span passes through a slow path (refill, a
 * full or empty span, a sweep, a release) and when the owner asks for the
 * statistics, and the delta reaches small_live in batches. */

__attribute__((noinline, cold)) static void live_flush(heap_t *h)
{
    int64_t now =
        atomic_fetch_add_explicit(&small_live, h->live_delta, memory_order_relaxed) + h->live_delta;
    h->live_delta = 0;
    int64_t peak = atomic_load_explicit(&small_peak, memory_order_relaxed);
    while (now > peak && !atomic_compare_exchange_weak_explicit(
                             &small_peak, &peak, now, memory_order_relaxed, memory_order_relaxed))
        ;
}

static inline void span_flush(heap_t *h, span_t *s)
{
    uint32_t used = (uint32_t)(s->used & ~USED_FULL);
    int64_t d = h->live_delta + ((int64_t)used - (int64_t)s->used_flushed) * s->block_size;
    s->used_flushed = used;
    h->live_delta = d;
    if ((uint64_t)(d + STATS_BATCH) > 2 * (uint64_t)STATS_BATCH)
        live_flush(h);
}

/* ---- heaps ---------------------------------------------------------------------- */

static void thread_exit_cb(void *arg);

static void slab_init_once(void)
{
    _ta_lock(&heaps_lock);
    if (!atomic_load_explicit(&slab_ready, memory_order_relaxed)) {
        classes_init();
        _ta_os_key_create(&heap_key, thread_exit_cb);
        atomic_store_explicit(&slab_ready, true, memory_order_release);
    }
    _ta_unlock(&heaps_lock);
}

/* Cuts a heap off the current chunk (heaps_lock held), or NULL. */
static heap_t *heap_carve_locked(void)
{
    size_t step = _ta_align_up(sizeof(heap_t), 64);
    if (heap_chunk_left < step)
        return NULL;
    heap_t *h = (heap_t *)heap_chunk;
    heap_chunk += step;
    heap_chunk_left -= step;
    return h;
}

/* Adopts an abandoned heap or carves a new one. Threads that find the
 * chunk used up at once all map a new one; the first to install its chunk
 * wins and the others carve from it and unmap theirs. */
static heap_t *heap_acquire(void)
{
    if (!atomic_load_explicit(&slab_ready, memory_order_acquire))
        slab_init_once();
    heap_t *h = NULL;
    _ta_lock(&heaps_lock);
    if (abandoned) {
        h = abandoned;
        abandoned = h->next_abandoned;
        h->next_abandoned = NULL;
        atomic_store_explicit(&h->abandoned, false, memory_order_relaxed);
    } else {
        h = heap_carve_locked();
    }
    _ta_unlock(&heaps_lock);
    if (h == NULL) {
        size_t bytes = _ta_align_up(16 * _ta_align_up(sizeof(heap_t), 64), _ta_os_page_size());
        void *mem;
        if (_ta_os_map(bytes, _ta_os_page_size(), &mem) != 0)
            return NULL;
        _ta_lock(&heaps_lock);
        if ((h = heap_carve_locked()) == NULL) {
            heap_chunk = mem;
            heap_chunk_left = bytes;
            h = heap_carve_locked();
            mem = NULL;
        }
        _ta_unlock(&heaps_lock);
        if (mem != NULL)
            _ta_os_unmap(mem, bytes); /* another thread's chunk served */
        else
            atomic_fetch_add_explicit(&mapping_count, 1, memory_order_relaxed);
    }
    if (!h->registered) { /* new: fresh zero memory */
        for (int c = 0; c < CLASS_COUNT; c++)
            h->current[c] = &no_span;
        h->registered = true;
        _ta_lock(&heaps_lock);
        h->next_all = all_heaps;
        all_heaps = h;
        _ta_unlock(&heaps_lock);
        atomic_fetch_add_explicit(&heap_count, 1, memory_order_relaxed);
    }
    _ta_thread_heap = h;
    _ta_os_key_set(heap_key, h);
    return h;
}

static inline heap_t *heap_get(void)
{
    heap_t *h = _ta_thread_heap;
    return TA_LIKELY(h != &empty_heap) ? h : heap_acquire();
}

/* ---- segments, page runs and link units ------------------------------------------ */

static inline segment_t *segment_of(const void *p)
{
    return (segment_t *)((uintptr_t)p & ~(uintptr_t)(SEGMENT_SIZE - 1));
}

static segment_t *segment_new(heap_t *h)
{
    void *mem;
    if (_ta_os_map(SEGMENT_SIZE, SEGMENT_SIZE, &mem) != 0)
        return NULL;
    atomic_fetch_add_explicit(&mapping_count, 1, memory_order_relaxed);
    _ta_os_name(mem, SEGMENT_SIZE, "tensoralloc-slab");
    segment_t *seg = mem;
    seg->magic = SEGMENT_MAGIC;
    seg->heap = h;
    seg->used_pages = META_MASK;
    for (int i = 0; i < SEGMENT_PAGES; i++) {
        seg->page_span[i] = &no_span;
        atomic_init(&seg->spans[i].thread_free, LINK_END);
    }
    TA_LIST_PUSH(h->segments, seg);
    segmap_set((uintptr_t)seg, true);
    atomic_fetch_add_explicit(&segment_bytes, SEGMENT_SIZE, memory_order_relaxed);
    return seg;
}

/* Unmaps an empty segment, unless a span descriptor of it still sits on
 * the heap's remote_spans (NOTIFIED: a thread that freed into it may be
 * about to push it, or the owner or a trimmer about to read it): it then
 * stays, empty, for a later try. So does a segment the kernel refuses to
 * unmap. The links live in the segment itself: it leaves the list before
 * its memory goes. */
static void segment_release(heap_t *h, segment_t *seg)
{
    for (int i = META_PAGES; i < SEGMENT_PAGES; i++)
        if (atomic_load_explicit(&seg->spans[i].thread_free, memory_order_acquire) & TF_NOTIFIED)
            return;
    uint64_t dirty = seg->dirty_pages;
    segment_t *prev = seg->prev;
    TA_LIST_UNLINK(h->segments, seg);
    segmap_set((uintptr_t)seg, false);
    if (_ta_os_unmap(seg, SEGMENT_SIZE) != 0) {
        segmap_set((uintptr_t)seg, true);
        TA_LIST_INSERT_AFTER(h->segments, prev, seg); /* back where it was */
        return;
    }
    if (h->spare == seg)
        h->spare = NULL;
    dirty_add(h, -(int64_t)__builtin_popcountll(dirty) * (int64_t)SLAB_PAGE_SIZE);
    atomic_fetch_sub_explicit(&segment_bytes, SEGMENT_SIZE, memory_order_relaxed);
    atomic_fetch_sub_explicit(&mapping_count, 1, memory_order_relaxed);
}

/* Keeps one empty segment as the spare and gives the other empty ones
 * back. */
static void heap_release_empty(heap_t *h)
{
    pages_lock_own(h);
    for (segment_t *seg = h->segments, *next; seg; seg = next) {
        next = seg->next;
        if (seg->used_pages != META_MASK || seg == h->spare)
            continue;
        if (h->spare == NULL)
            h->spare = seg;
        else
            segment_release(h, seg);
    }
    _ta_unlock(&h->pages_lock);
}

/* First run of k free pages, or -1. */
static int find_run(uint64_t used, int k)
{
    uint64_t want = k == 64 ? ~0ULL : ((1ULL << k) - 1);
    for (int i = META_PAGES; i + k <= SEGMENT_PAGES; i++)
        if (((used >> i) & want) == 0)
            return i;
    return -1;
}

static inline bool bit_get(const uint64_t *w, size_t i)
{
    return w[i / 64] >> (i % 64) & 1;
}

/* Takes the first run of n free link units, or returns -1. */
static int link_units_take(segment_t *seg, size_t n)
{
    size_t run = 0;
    for (size_t u = 0; u < LINK_UNITS; u++) {
        if (u % 64 == 0 && seg->link_used[u / 64] == ~0ULL) {
            run = 0;
            u += 63;
            continue;
        }
        if (bit_get(seg->link_used, u)) {
            run = 0;
        } else if (++run == n) {
            size_t first = u + 1 - n;
            for (size_t i = first; i <= u; i++)
                seg->link_used[i / 64] |= 1ULL << (i % 64);
            return (int)first;
        }
    }
    return -1;
}

/* Frees a span's link units; the OS pages they lie on are looked at by
 * the next purge. */
static void link_units_free(segment_t *seg, span_t *s)
{
    for (size_t i = s->link_unit; i < (size_t)s->link_unit + s->link_units; i++)
        seg->link_used[i / 64] &= ~(1ULL << (i % 64));
    size_t page = _ta_os_page_size();
    size_t lo = LINK_AREA + (size_t)s->link_unit * LINK_UNIT,
           hi = lo + (size_t)s->link_units * LINK_UNIT;
    for (size_t p = (lo - LINK_AREA) / page; p * page + LINK_AREA < hi; p++)
        seg->link_dirty[p / 64] |= 1ULL << (p % 64);
}

/* Gives back the OS pages of the link area whose units are all free. */
static void links_purge(segment_t *seg)
{
    size_t page = _ta_os_page_size(), per = page / LINK_UNIT;
    if (page % LINK_UNIT || LINK_AREA % page)
        return; /* pages that do not tile the area: keep them */
    for (size_t w = 0; w < (LINK_MAX_OS_PAGES + 63) / 64; w++) {
        for (uint64_t d = seg->link_dirty[w]; d; d &= d - 1) {
            size_t p = w * 64 + (size_t)__builtin_ctzll(d);
            bool busy = false;
            for (size_t u = p * per; u < (p + 1) * per && u < LINK_UNITS; u++)
                busy |= bit_get(seg->link_used, u);
            if (!busy)
                _ta_os_advise_dontneed((char *)seg + LINK_AREA + p * page, page);
        }
        seg->link_dirty[w] = 0;
    }
}

#ifdef TA_TEST_HOOKS
_Atomic uint64_t _ta_small_waiting_walks;
#define COUNT_WAITING_WALK() atomic_fetch_add_explicit(&_ta_small_waiting_walks, 1, memory_order_relaxed)
#else
#define COUNT_WAITING_WALK() ((void)0)
#endif

/* The first of h's segments with a run of `pages` free pages (free pages
 * still backed by memory, when waiting_only) and room for `units` link
 * units, which it takes; NULL if none (pages_lock held). */
static segment_t *span_place(heap_t *h, int pages, size_t units, bool waiting_only, int *first,
                             int *unit)
{
    for (segment_t *seg = h->segments; seg; seg = seg->next) {
        uint64_t busy = seg->used_pages;
        if (waiting_only) {
            COUNT_WAITING_WALK();
            if (__builtin_popcountll(seg->dirty_pages) < pages)
                continue;
            busy |= ~seg->dirty_pages;
        }
        if ((*first = find_run(busy, pages)) >= 0 && (*unit = link_units_take(seg, units)) >= 0)
            return seg;
    }
    return NULL;
}

static span_t *span_new(heap_t *h, int c)
{
    const class_info_t *ci = &classes[c];
    size_t span_bytes = (size_t)ci->pages * SLAB_PAGE_SIZE;
    size_t entries = (span_bytes - 1) / ci->block_size + 1; /* every index a pointer can give */
    size_t units = (entries * sizeof(uint16_t) + LINK_UNIT - 1) / LINK_UNIT;
    segment_t *seg = NULL;
    int first = -1, unit = -1;
    pages_lock_own(h);
    /* Free pages still backed by memory first: taking fresh ones while
     * those wait grows the resident set by what waits (rptest's peak RSS
     * 11.2 -> 9.6 MiB). Only while enough wait: a heap that only grows
     * would otherwise walk all its full segments for every span. */
    if (atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed) >= span_bytes)
        seg = span_place(h, ci->pages, units, true, &first, &unit);
    if (seg == NULL)
        seg = span_place(h, ci->pages, units, false, &first, &unit);
    if (seg == NULL) {
        if ((seg = segment_new(h)) == NULL) {
            _ta_unlock(&h->pages_lock);
            return NULL;
        }
        first = find_run(seg->used_pages, ci->pages);
        unit = link_units_take(seg, units);
    }
    if (h->spare == seg) /* the kept empty segment is in use again */
        h->spare = NULL;
    uint64_t run = (ci->pages == 64 ? ~0ULL : ((1ULL << ci->pages) - 1)) << first;
    uint64_t was_dirty = seg->dirty_pages & run;
    seg->used_pages |= run;
    seg->dirty_pages &= ~run;
    dirty_add(h, -(int64_t)__builtin_popcountll(was_dirty) * (int64_t)SLAB_PAGE_SIZE);
    _ta_unlock(&h->pages_lock);

    span_t *s = &seg->spans[first];
    s->start = (char *)seg + (size_t)first * SLAB_PAGE_SIZE;
    s->links = (uint16_t *)((char *)seg + LINK_AREA + (size_t)unit * LINK_UNIT);
    s->block_size = ci->block_size;
    s->capacity = ci->capacity;
    s->recip = block_recip(ci->block_size);
    s->class_idx = (uint8_t)c;
    s->pages = ci->pages;
    s->held = LINK_END;
    s->link_unit = (uint16_t)unit;
    s->link_units = (uint16_t)units;
    s->used = 0;
    s->used_flushed = 0;
    s->next = s->prev = NULL;
    /* thread_free is left alone: END, maybe NOTIFIED from an earlier span
     * here, whose descriptor its heap's remote_spans may still hold. */
    for (size_t i = 0; i + 1 < ci->capacity; i++)
        s->links[i] = (uint16_t)(i + 1);
    s->links[ci->capacity - 1] = LINK_END;
    for (size_t i = ci->capacity; i < entries; i++)
        s->links[i] = LINK_TAIL;
    s->free = 0;
    s->local_free = LINK_END;
    for (int i = 0; i < ci->pages; i++)
        seg->page_span[first + i] = s;
    atomic_fetch_add_explicit(&committed_bytes, span_bytes, memory_order_relaxed);
    atomic_fetch_add_explicit(&span_count, 1, memory_order_relaxed);
    return s;
}

static void partial_push(heap_t *h, span_t *s)
{
    TA_LIST_PUSH(h->partial[s->class_idx], s);
    s->state = SPAN_LISTED;
}

static void partial_unlink(heap_t *h, span_t *s)
{
    TA_LIST_UNLINK(h->partial[s->class_idx], s);
}

static void heap_purge(heap_t *h);
static bool purge_watch_start(void);

/* Whether h's free pages go back now: too many, or waited RETAIN_MS. */
static bool dirty_due(heap_t *h, uint64_t now)
{
    size_t dirty = atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed);
    uint64_t since = atomic_load_explicit(&h->dirty_since_ms, memory_order_relaxed);
    return dirty > PURGE_LIMIT || (dirty && now - since >= (uint64_t)_ta_opt(TA_OPT_RETAIN_MS));
}

/* An empty span's pages go back to its segment (pages_lock held): to the
 * kernel at once when purge_now, else as free pages that wait. */
static void span_free_pages(heap_t *h, span_t *s, bool purge_now, uint64_t now)
{
    segment_t *seg = segment_of(s);
    int first = (int)(s - seg->spans);
    for (int i = 0; i < s->pages; i++)
        seg->page_span[first + i] = &no_span;
    link_units_free(seg, s);
    uint64_t run = (s->pages == 64 ? ~0ULL : ((1ULL << s->pages) - 1)) << first;
    s->state = SPAN_FREE;
    seg->used_pages &= ~run;
    if (purge_now && _ta_os_advise_dontneed(s->start, (size_t)s->pages * SLAB_PAGE_SIZE) == 0) {
        /* clean */
    } else {
        seg->dirty_pages |= run;
        if (atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed) == 0)
            atomic_store_explicit(&h->dirty_since_ms, now, memory_order_relaxed);
        dirty_add(h, (int64_t)s->pages * (int64_t)SLAB_PAGE_SIZE);
    }
    atomic_fetch_sub_explicit(&committed_bytes, (uint64_t)s->pages * SLAB_PAGE_SIZE,
                              memory_order_relaxed);
    atomic_fetch_sub_explicit(&span_count, 1, memory_order_relaxed);
}

/* Gives an empty span's pages back to its segment (pages_lock taken here). */
static void span_release(heap_t *h, span_t *s)
{
    uint64_t now = _ta_os_now_ms();
    segment_t *seg = segment_of(s);
    if (s->state == SPAN_LISTED)
        partial_unlink(h, s);
    if (h->current[s->class_idx] == s)
        h->current[s->class_idx] = &no_span;
    span_flush(h, s);
    pages_lock_own(h);
    /* A big span's pages wait like the others: purged at once (when the
     * bound of the large pool was the cure for python-json's peak RSS),
     * a program churning blocks of 16-64 KiB faulted them again on every
     * cycle (small-mixed: 26 K faults against mimalloc's 12 K). */
    span_free_pages(h, s, false, now);
    if (seg->used_pages == META_MASK && !h->sweeping) { /* only the metadata left */
        if (h->spare == NULL)
            h->spare = seg;
        else if (h->spare != seg)
            segment_release(h, seg);
    }
    /* Free pages go back once a heap holds too many, or once they have
     * waited RETAIN_MS (pages reused sooner cost no fault; mimalloc's
     * delayed reset). */
    if (dirty_due(h, now))
        heap_purge(h);
    bool waiting = atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed) != 0;
    _ta_unlock(&h->pages_lock);
    /* Free pages left to wait in this thread's own heap: should it go idle
     * now, the purge thread gives them back (purge_idle_owners). Only the
     * owner wakes it: a tidier of an abandoned heap holds tidy_lock, which
     * fork takes after the purge thread's mutex, and purges at its end. */
    if (waiting && h == _ta_thread_heap && purge_watch_start())
        purge_hook(&purge_hooks.wake);
}

/* Returns free pages to the kernel, one madvise per run of dirty pages,
 * and the link area's pages that no span uses. */
static void heap_purge(heap_t *h)
{
    for (segment_t *seg = h->segments; seg; seg = seg->next) {
        uint64_t d = seg->dirty_pages;
        while (d) {
            int start = __builtin_ctzll(d);
            uint64_t rest = d >> start;
            int len = rest == ~0ULL ? 64 - start : __builtin_ctzll(~rest);
            uint64_t run = (len == 64 ? ~0ULL : ((1ULL << len) - 1)) << start;
            if (_ta_os_advise_dontneed((char *)seg + (size_t)start * SLAB_PAGE_SIZE,
                                       (size_t)len * SLAB_PAGE_SIZE) == 0) {
                seg->dirty_pages &= ~run; /* a failed advice leaves them dirty */
                dirty_add(h, -(int64_t)len * (int64_t)SLAB_PAGE_SIZE);
            }
            d &= ~run;
        }
        links_purge(seg);
    }
}

/* ---- blocks ------------------------------------------------------------------------ */


/* An empty single-page span stays listed while its class has no other
 * partial span: a class that cycles through one span at a time (a
 * producer whose blocks another thread frees) would otherwise release and
 * rebuild it, writing the segment's header lines that every free reads.
 * The owner's tidy releases it (after mimalloc's delayed page retire). */
static inline bool span_keep_empty(const heap_t *h, const span_t *s)
{
    const span_t *first = h->partial[s->class_idx];
    if (s->pages != 1 || s->class_idx >= PARK_FIRST_CLASS)
        return false;
    return s->state == SPAN_LISTED ? first == s && s->next == NULL : first == NULL;
}

/* ---- parked spans -----------------------------------------------------------
 * An emptied current span of a big class (16 KiB blocks and up) leaves the
 * fast path but stays built, in its class's parked slot. The owner's next
 * allocation of the class takes it back with one exchange, so a program
 * that frees its last big block and allocates another pays no rebuild;
 * the purge thread takes it, under pages_lock, once nothing was parked or
 * taken back for RETAIN_MS, so a thread that frees its last big block and
 * goes idle keeps none of it (PyTorch's small tensors under
 * ta_torch_install, issue 24). Without parking those spans stayed current,
 * committed, for good. (mimalloc keeps an emptied page that is its
 * queue's only one for a few slow paths, _mi_page_retire; an idle thread
 * runs none.) The small classes keep an empty current span: a block there
 * costs less than the exchanges. */
_Static_assert(CLASS_SIZE(PARK_FIRST_CLASS) == (size_t)16 << 10, "slab.h's PARK_FIRST_CLASS");

static inline void park_gen_bump(heap_t *h)
{
    atomic_store_explicit(&h->park_gen, atomic_load_explicit(&h->park_gen, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static void span_park(heap_t *h, span_t *s)
{
    int c = s->class_idx;
    span_flush(h, s);
    h->current[c] = &no_span;
    s->state = SPAN_PARKED;
    park_gen_bump(h);
    /* seq_cst: pairs with the purge thread's last look before it sleeps. */
    span_t *old = atomic_exchange_explicit(&h->parked[c - PARK_FIRST_CLASS], s,
                                           memory_order_seq_cst);
    if (old != NULL) /* cannot happen: alloc_slow takes a parked span first */
        span_release(h, old);
    if (purge_watch_start())
        purge_hook(&purge_hooks.wake);
}

/* The owner takes back class c's parked span, or NULL. */
static inline span_t *span_unpark(heap_t *h, int c)
{
    if (c < PARK_FIRST_CLASS)
        return NULL;
    _Atomic(span_t *) *slot = &h->parked[c - PARK_FIRST_CLASS];
    if (atomic_load_explicit(slot, memory_order_relaxed) == NULL)
        return NULL;
    span_t *s = atomic_exchange_explicit(slot, NULL, memory_order_acquire);
    if (s != NULL)
        park_gen_bump(h);
    return s;
}

/* The owner takes back every parked span and releases it (a sweep or a
 * tidy walks every span next). Taking pages_lock once after the exchanges
 * waits out a purge thread releasing one it took first. */
static void heap_unpark_all(heap_t *h)
{
    for (int c = PARK_FIRST_CLASS; c < CLASS_COUNT; c++) {
        span_t *s = span_unpark(h, c);
        if (s != NULL)
            span_release(h, s);
    }
    pages_lock_own(h);
    _ta_unlock(&h->pages_lock);
}

/* A span changed state: it emptied (its pages go back to the segment; a
 * big class's current span is parked) or, full until now, has room again
 * (it is listed). A small class's current span stays, even empty. */
__attribute__((noinline)) static void span_after_free(heap_t *h, span_t *s)
{
    if (s->used & USED_FULL) {
        s->used &= ~USED_FULL;
        span_flush(h, s);
        if (s->used == 0 && !span_keep_empty(h, s))
            span_release(h, s);
        else
            partial_push(h, s);
    } else if (s->used == 0 && s->state == SPAN_LISTED && !span_keep_empty(h, s)) {
        span_release(h, s);
    } else if (s->used == 0 && s->state == SPAN_CURRENT && s->class_idx >= PARK_FIRST_CLASS &&
               !h->sweeping && h == _ta_thread_heap) {
        /* Only the owner parks (and so wakes the purge thread): a tidier
         * of an abandoned heap holds tidy_lock, which fork takes after the
         * purge thread's mutex, and releases the empty current spans at
         * its end. A sweep parks what it emptied at its end. */
        span_park(h, s);
    }
}

/* n of s's blocks came back at once (freed by others, or held by a
 * trimmer). */
static void span_gave_back(heap_t *h, span_t *s, uint32_t n)
{
    s->used -= (int32_t)n;
    if (s->used <= 0)
        span_after_free(h, s);
}

/* Takes the list other threads freed into s and returns its head
 * (LINK_END: none). TF_NOTIFIED stays unless clear_notified (whoever took
 * s off remote_spans clears it). Release as well as acquire: the next
 * thread to set NOTIFIED writes next_notified, which the caller has just
 * read. */
static uint32_t thread_free_take(span_t *s, bool clear_notified)
{
    uint32_t old = atomic_load_explicit(&s->thread_free, memory_order_relaxed), want;
    do {
        bool notified = old & TF_NOTIFIED;
        if ((old & 0xFFFF) == LINK_END && !(clear_notified && notified))
            return LINK_END;
        want = LINK_END | (notified && !clear_notified ? TF_NOTIFIED : 0);
    } while (!atomic_compare_exchange_weak_explicit(&s->thread_free, &old, want,
                                                    memory_order_acq_rel, memory_order_relaxed));
    return old & 0xFFFF;
}

/* Puts the chain from first (not empty) onto s's local_free; returns its
 * length. */
static uint32_t chain_to_local(span_t *s, uint32_t first)
{
    uint32_t n = 1, last = first;
    for (; s->links[last] != LINK_END; n++)
        last = s->links[last];
    s->links[last] = s->local_free;
    s->local_free = (uint16_t)first;
    return n;
}

static uint32_t span_take_thread_free(span_t *s, bool clear_notified)
{
    uint32_t first = thread_free_take(s, clear_notified);
    return first == LINK_END ? 0 : chain_to_local(s, first);
}

/* Reports what is wrong with a pointer that failed free's block test, or
 * whose link says it is not handed out. */
__attribute__((noreturn, noinline, cold)) static void block_bad(const void *p, const char *call)
{
    segment_t *seg = segment_of(p);
    TA_CHECK(seg->magic == SEGMENT_MAGIC, call, p, "corrupted slab segment");
    size_t page = ((uintptr_t)p - (uintptr_t)seg) >> SLAB_PAGE_SHIFT;
    TA_CHECK(page >= META_PAGES, call, p, "invalid pointer");
    const span_t *s = seg->page_span[page];
    /* A span released when its last block was freed: no state is left to
     * tell a second free of that block from a stray pointer. */
    TA_CHECK(s != &no_span, call, p, "double free or invalid pointer (a page of no block)");
    size_t off = (size_t)((const char *)p - s->start);
    uint32_t b = (uint32_t)((off * s->recip) >> 42);
    TA_CHECK((size_t)b * s->block_size == off && s->links[b] != LINK_TAIL, call, p,
             "invalid pointer (not the start of a block)");
    _ta_fatal(call, p, "double free");
}

/* Finds p's span and block index, or reports a pointer that is not the
 * start of a block. */
static inline span_t *block_locate(const void *p, const char *call, uint32_t *idx)
{
    segment_t *seg = segment_of(p);
    span_t *s = seg->page_span[((uintptr_t)p >> SLAB_PAGE_SHIFT) % SEGMENT_PAGES];
    size_t off = (size_t)((const char *)p - s->start);
    uint32_t b = (uint32_t)((off * s->recip) >> 42);
    if (TA_UNLIKELY((size_t)b * s->block_size != off))
        block_bad(p, call);
    *idx = b;
    return s;
}

/* ---- trimming other threads' heaps --------------------------------------------
 * Blocks that other threads free wait on their spans' thread_free lists
 * until the owner takes them, which an idle owner never does. A trimmer
 * (malloc_trim in any thread, or the purge thread once remote_spans has
 * waited RETAIN_MS untaken) takes over remote_spans with one exchange, so
 * the owner's fast paths are untouched, and for each span takes its list
 * and gives back every OS page that lies wholly under blocks it took: the
 * owner cannot hand those blocks out (they are on no list of its) and
 * nobody else may touch them (they are freed). It chains the blocks on
 * those pages onto the span's held list and pushes the others back. The
 * owner's next sweep (trimmed) frees the held blocks and takes what was
 * pushed back. A flag
 * per heap (trim_busy), taken with an exchange and never waited on, keeps
 * a trimmer and the owner's sweep apart. */

/* Gives back the pages wholly under the blocks of s that a trimmer took
 * (the chain from first); returns true if it held any. */
static bool trim_span(span_t *s, uint32_t first)
{
    uint64_t taken[SPAN_MAX_BLOCKS / 64] = {0};
    for (uint32_t b = first; b != LINK_END; b = s->links[b])
        taken[b / 64] |= 1ULL << (b % 64);
    size_t page = _ta_os_page_size(), bs = s->block_size, cap = s->capacity;
    size_t used_end = cap * bs; /* the tail beyond holds no block */
    size_t npages = (used_end + page - 1) / page;
    uint64_t marks[SPAN_MAX_OS_PAGES / 64] = {0};
    bool any = false;
    for (size_t p = 0; p < npages; p++) {
        size_t lo = p * page / bs, hi = ((p + 1) * page - 1) / bs;
        if (hi >= cap)
            hi = cap - 1;
        bool all = true;
        for (size_t b = lo; b <= hi && all; b++)
            all = bit_get(taken, b);
        if (all) {
            marks[p / 64] |= 1ULL << (p % 64);
            any = true;
        }
    }
    /* The blocks on marked pages go onto the held list, the others back
     * onto thread_free. */
    uint32_t back = LINK_END, back_tail = LINK_END;
    for (uint32_t b = first, next; b != LINK_END; b = next) {
        next = s->links[b];
        size_t off = (size_t)b * bs;
        bool on_marked = false;
        for (size_t p = off / page; any && p * page < off + bs && !on_marked; p++)
            on_marked = bit_get(marks, p);
        if (on_marked) {
            s->links[b] = s->held;
            s->held = (uint16_t)b;
            continue;
        }
        s->links[b] = (uint16_t)back;
        if (back == LINK_END)
            back_tail = b;
        back = b;
    }
    for (size_t p = 0; p < npages;) {
        if (!bit_get(marks, p)) {
            p++;
            continue;
        }
        size_t run = 1;
        while (p + run < npages && bit_get(marks, p + run))
            run++;
        /* A failed advice keeps the pages resident; the blocks stay held. */
        if (_ta_os_advise_dontneed(s->start + p * page, run * page) == 0)
            atomic_fetch_add_explicit(&remote_released_bytes, run * page, memory_order_relaxed);
        p += run;
    }
    if (back != LINK_END) {
        uint32_t old = atomic_load_explicit(&s->thread_free, memory_order_relaxed);
        do {
            s->links[back_tail] = (uint16_t)old;
        } while (!atomic_compare_exchange_weak_explicit(
            &s->thread_free, &old, back | (old & TF_NOTIFIED), memory_order_release,
            memory_order_relaxed));
    }
    return any;
}

/* Takes over h's remote_spans and gives back what it can (see above). */
static void heap_trim_remote(heap_t *h)
{
    if (atomic_exchange_explicit(&h->trim_busy, true, memory_order_acquire))
        return; /* another trimmer, or the owner sweeping */
    span_t *s = atomic_exchange_explicit(&h->remote_spans, NULL, memory_order_acquire);
    bool left = false;
    while (s) {
        span_t *next = s->next_notified;
        uint32_t first = thread_free_take(s, false);
        if (first != LINK_END)
            left |= trim_span(s, first);
        /* The last touch of s: NOTIFIED kept its segment mapped until now.
         * What still waits on its list the owner's sweep finds, and a
         * later free by another thread notifies it anew. */
        uint32_t old =
            atomic_fetch_and_explicit(&s->thread_free, ~TF_NOTIFIED, memory_order_release);
        left |= (old & 0xFFFF) != LINK_END;
        s = next;
    }
    if (left)
        atomic_store_explicit(&h->trimmed, true, memory_order_relaxed);
    atomic_store_explicit(&h->trim_busy, false, memory_order_release);
}

/* Frees the blocks a trimmer held in s (walking only their links: the
 * others' belong to whoever frees those blocks); returns how many. */
static uint32_t span_unhold(span_t *s)
{
    uint32_t n = chain_to_local(s, s->held);
    s->held = LINK_END;
    return n;
}

/* The owner looks at every span: takes what other threads freed into it
 * (also what a trimmer left on no list), frees the blocks a trimmer held
 * (unless one is at work now: the next sweep does), and brings the
 * statistics up to date. */
static void heap_sweep(heap_t *h)
{
    heap_unpark_all(h);
    bool merge = atomic_load_explicit(&h->trimmed, memory_order_relaxed) &&
                 !atomic_exchange_explicit(&h->trim_busy, true, memory_order_acquire);
    if (merge)
        atomic_store_explicit(&h->trimmed, false, memory_order_relaxed);
    h->sweeping = true;
    for (segment_t *seg = h->segments; seg; seg = seg->next) {
        for (int i = META_PAGES; i < SEGMENT_PAGES; i++) {
            span_t *s = &seg->spans[i];
            if (s->state == SPAN_FREE)
                continue;
            uint32_t n = span_take_thread_free(s, false);
            if (merge && s->held != LINK_END)
                n += span_unhold(s);
            if (n)
                span_gave_back(h, s, n);
            if (s->state != SPAN_FREE)
                span_flush(h, s);
        }
    }
    h->sweeping = false;
    if (merge)
        atomic_store_explicit(&h->trim_busy, false, memory_order_release);
    for (int c = PARK_FIRST_CLASS; h == _ta_thread_heap && c < CLASS_COUNT; c++)
        if (h->current[c] != &no_span && h->current[c]->used == 0)
            span_park(h, h->current[c]);
    heap_release_empty(h);
}

/* Takes the spans other threads freed into off remote_spans, and sweeps
 * when asked to (a tidy) or after a trimmer. */
static void heap_collect(heap_t *h, bool sweep)
{
    atomic_store_explicit(&h->collects,
                          atomic_load_explicit(&h->collects, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    if (atomic_load_explicit(&h->remote_spans, memory_order_relaxed) != NULL) {
        span_t *s = atomic_exchange_explicit(&h->remote_spans, NULL, memory_order_acquire);
        while (s) {
            span_t *next = s->next_notified; /* read before NOTIFIED goes */
            uint32_t n = span_take_thread_free(s, true);
            if (n)
                span_gave_back(h, s, n);
            s = next;
        }
    }
    if (sweep || atomic_load_explicit(&h->trimmed, memory_order_relaxed))
        heap_sweep(h);
}

/* The owner's frees, then other threads', become the allocation list. */
static bool span_refill(heap_t *h, span_t *s)
{
    s->used -= (int32_t)span_take_thread_free(s, false);
    if (s->free == LINK_END) {
        s->free = s->local_free;
        s->local_free = LINK_END;
    }
    span_flush(h, s);
    return s->free != LINK_END;
}

/* A span with no free block leaves the class's slot, on no list; a free
 * into it lists it again (span_after_free). */
static void span_set_full(heap_t *h, span_t *s)
{
    s->state = SPAN_FULL;
    s->used |= USED_FULL;
    h->current[s->class_idx] = &no_span;
}

/* Makes s (listed or parked, so with free blocks) its class's current span
 * and pops a block; NULL if it had none after all (cannot happen). */
static void *span_take_current(heap_t *h, span_t *s)
{
    s->state = SPAN_CURRENT;
    h->current[s->class_idx] = s;
    if (span_refill(h, s))
        return _ta_span_pop(s);
    span_set_full(h, s);
    return NULL;
}

static void *alloc_slow(heap_t *h, int c)
{
    span_t *s = h->current[c];
    void *p;
    if (s != &no_span) {
        if (span_refill(h, s))
            return _ta_span_pop(s);
        span_set_full(h, s);
    } else if ((s = span_unpark(h, c)) != NULL && (p = span_take_current(h, s)) != NULL) {
        return p;
    }
    heap_collect(h, false);
    while ((s = h->partial[c]) != NULL) {
        partial_unlink(h, s);
        if ((p = span_take_current(h, s)) != NULL)
            return p;
    }
    if ((s = span_new(h, c)) == NULL)
        return NULL;
    s->state = SPAN_CURRENT;
    h->current[c] = s;
    return _ta_span_pop(s);
}

/* Every small request but malloc's fast path: alignment, zeroing, sizes
 * over 1 KiB, a thread without a heap yet, a current span used up. */
static void heap_abandon(heap_t *h);
static void *small_alloc(size_t size, size_t alignment, bool zero);

/* An allocation by another key destructor after this thread's heap was
 * given up: glibc runs destructors in at most four rounds, and a heap
 * adopted in the last one would be owned by no thread and never given up.
 * So a thread that is ending adopts a heap for the one block and gives it
 * up again at once. */
__attribute__((noinline, cold)) static void *alloc_while_exiting(size_t size, size_t alignment,
                                                               bool zero)
{
    tls_exiting = false;
    void *p = small_alloc(size, alignment, zero);
    heap_t *h = _ta_thread_heap;
    if (h != &empty_heap) {
        _ta_thread_heap = &empty_heap;
        _ta_os_key_set(heap_key, NULL);
        heap_abandon(h);
    }
    tls_exiting = true;
    return p;
}

void *_ta_small_alloc(size_t size, size_t alignment, bool zero)
{
    if (TA_UNLIKELY(tls_exiting))
        return alloc_while_exiting(size, alignment, zero);
    return small_alloc(size, alignment, zero);
}

static void *small_alloc(size_t size, size_t alignment, bool zero)
{
    if (TA_UNLIKELY(alignment > TA_SMALL_MAX_ALIGN)) {
        errno = EINVAL;
        return NULL;
    }
    heap_t *h = heap_get();
    if (TA_UNLIKELY(h == NULL)) {
        errno = ENOMEM;
        return NULL;
    }
    if (alignment > TA_MIN_ALIGN) {
        size = _ta_align_up(size ? size : 1, alignment);
    }
    int c = class_of(size);
    /* Blocks are aligned to their size's largest power-of-two factor (spans
     * start on 64 KiB); move up until the class size is a multiple. */
    while (c < CLASS_COUNT && alignment > TA_MIN_ALIGN && classes[c].block_size % alignment)
        c++;
    if (TA_UNLIKELY(c >= CLASS_COUNT)) {
        errno = ENOMEM;
        return NULL;
    }
    span_t *s = h->current[c];
    void *p;
    if (TA_LIKELY(s->free != LINK_END))
        p = _ta_span_pop(s);
    else if ((p = alloc_slow(h, c)) == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    if (zero)
        memset(p, 0, classes[c].block_size);
    return p;
}


/* The spans other threads free into are pushed onto the owner's
 * remote_spans by the first free that finds them not NOTIFIED. Returns
 * true when the purge thread must be woken: the heap is abandoned, or
 * the purge thread is not watching the live heaps. */
static bool heap_notify(heap_t *h, span_t *s)
{
    span_t *top = atomic_load_explicit(&h->remote_spans, memory_order_relaxed);
    do {
        s->next_notified = top;
    } while (!atomic_compare_exchange_weak_explicit(&h->remote_spans, &top, s, memory_order_seq_cst,
                                                    memory_order_relaxed));
    /* seq_cst, paired with heap_abandon: either this sees the heap
     * abandoned, or its owner sees this span after giving the heap up. */
    if (top == NULL && atomic_load_explicit(&h->abandoned, memory_order_seq_cst))
        return true;
    return purge_watch_start();
}

/* Whether the purge thread must be woken to watch the live heaps: true
 * for the one caller that finds it not watching. Pairs with its last look
 * before it sleeps (seq_cst on both sides): either it sees this caller's
 * work (a span on remote_spans, free pages waiting) or this sees it
 * asleep. */
static bool purge_watch_start(void)
{
    return !atomic_load_explicit(&purge_watching, memory_order_seq_cst) &&
           !atomic_exchange_explicit(&purge_watching, true, memory_order_seq_cst);
}

/* A block of another thread's heap: pushed onto its span's thread_free
 * with one compare-and-swap, which also sets NOTIFIED (acquiring the
 * clear of it, see span_take_thread_free). While NOTIFIED, the span's
 * segment stays mapped, so the push onto remote_spans after it is safe. */
__attribute__((noinline)) static void free_remote(segment_t *seg, span_t *s, uint32_t b,
                                                  const char *call, const void *p)
{
    uint16_t *link = &s->links[b];
    if (TA_UNLIKELY(*link != LINK_ALLOC))
        block_bad(p, call);
    uint32_t old = atomic_load_explicit(&s->thread_free, memory_order_relaxed);
    do {
        *link = (uint16_t)old;
    } while (!atomic_compare_exchange_weak_explicit(&s->thread_free, &old, b | TF_NOTIFIED,
                                                    memory_order_acq_rel, memory_order_relaxed));
    if (!(old & TF_NOTIFIED) && heap_notify(seg->heap, s))
        purge_hook(&purge_hooks.wake);
}

void _ta_small_free(void *p)
{
    const char *call = "free";
    uint32_t b;
    span_t *s = block_locate(p, call, &b);
    heap_t *h = _ta_thread_heap;
    if (TA_LIKELY(segment_of(p)->heap == h)) {
        uint16_t *link = &s->links[b];
        if (TA_UNLIKELY(*link != LINK_ALLOC))
            block_bad(p, call);
        *link = s->local_free;
        s->local_free = (uint16_t)b;
        if (TA_UNLIKELY(--s->used <= 0))
            span_after_free(h, s);
        return;
    }
    free_remote(segment_of(p), s, b, call, p);
}

size_t _ta_small_usable(const void *p, const char *call)
{
    uint32_t b;
    span_t *s = block_locate(p, call, &b);
    uint16_t link = s->links[b];
    TA_CHECK(link != LINK_TAIL, call, p, "invalid pointer (not the start of a block)");
    TA_CHECK(link == LINK_ALLOC, call, p, "pointer to a free block");
    return s->block_size;
}

/* ---- trim, thread exit, fork --------------------------------------------------------- */

/* Takes pending frees and drops empty current spans. Free pages go back
 * to the kernel when force is set or once they have waited RETAIN_MS (a
 * heap adopted soon after reuses them without faults). Returns true while
 * free pages wait. */
static bool heap_tidy(heap_t *h, bool force)
{
    heap_collect(h, true);
    heap_unpark_all(h);
    for (int c = 0; c < CLASS_COUNT; c++) {
        span_t *s = h->current[c];
        if (s != &no_span && s->used == 0) {
            h->current[c] = &no_span;
            span_release(h, s);
        }
        if ((s = h->partial[c]) != NULL && s->used == 0 && s->next == NULL)
            span_release(h, s); /* the one kept empty (span_keep_empty) */
    }
    live_flush(h);
    pages_lock_own(h);
    if (!force && atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed) &&
        !dirty_due(h, _ta_os_now_ms())) {
        _ta_unlock(&h->pages_lock);
        return true;
    }
    if (h->spare) {
        segment_t *spare = h->spare;
        h->spare = NULL;
        segment_release(h, spare); /* one that must stay is found again later */
    }
    heap_purge(h);
    _ta_unlock(&h->pages_lock);
    return false;
}

/* Tidies the abandoned heaps that have pending frees or free pages (all
 * of them when every is set). Each is taken off the list so that no
 * thread adopts it meanwhile, then put back. */
static bool tidy_abandoned(bool every)
{
    bool waiting = false;
    _ta_lock(&tidy_lock);
    _ta_lock(&heaps_lock);
    heap_t *taken = abandoned;
    abandoned = NULL;
    _ta_unlock(&heaps_lock);
    heap_t *last = NULL;
    for (heap_t *h = taken; h; h = h->next_abandoned) {
        if (every || atomic_load_explicit(&h->remote_spans, memory_order_relaxed) ||
            atomic_load_explicit(&h->dirty_bytes, memory_order_relaxed) ||
            atomic_load_explicit(&h->trimmed, memory_order_relaxed))
            waiting |= heap_tidy(h, every);
        last = h;
    }
    if (last) {
        _ta_lock(&heaps_lock);
        last->next_abandoned = abandoned;
        abandoned = taken;
        _ta_unlock(&heaps_lock);
    }
    _ta_unlock(&tidy_lock);
    return waiting;
}

/* The first heap of all_heaps; the links never change after publication. */
static heap_t *heaps_first(void)
{
    _ta_lock(&heaps_lock);
    heap_t *h = all_heaps;
    _ta_unlock(&heaps_lock);
    return h;
}

void _ta_small_trim(void)
{
    for (heap_t *h = heaps_first(); h; h = h->next_all)
        if (h != _ta_thread_heap && !atomic_load_explicit(&h->abandoned, memory_order_relaxed))
            heap_trim_remote(h);
    if (_ta_thread_heap != &empty_heap)
        heap_tidy(_ta_thread_heap, true);
    tidy_abandoned(true);
}

/* The purge thread's look at the live heaps: a remote list that has waited
 * RETAIN_MS with no drain by its owner is trimmed. Returns true while a
 * list waits. Only the purge thread uses the watch_* fields. */
static bool watch_live_heaps(void)
{
    uint64_t now = _ta_os_now_ms(), wait = (uint64_t)_ta_opt(TA_OPT_RETAIN_MS);
    bool waiting = false;
    for (heap_t *h = heaps_first(); h; h = h->next_all) {
        if (atomic_load_explicit(&h->abandoned, memory_order_relaxed))
            continue; /* tidy_abandoned drains those */
        span_t *head = atomic_load_explicit(&h->remote_spans, memory_order_seq_cst);
        if (head == NULL || head == h->watch_head) {
            h->watch_since_ms = 0; /* nothing new since the last trim */
            continue;
        }
        uint64_t collects = atomic_load_explicit(&h->collects, memory_order_relaxed);
        if (h->watch_since_ms == 0 || collects != h->watch_collects) {
            h->watch_collects = collects;
            h->watch_since_ms = now;
            waiting = true;
        } else if (now - h->watch_since_ms < wait) {
            waiting = true;
        } else {
            heap_trim_remote(h);
            h->watch_head = atomic_load_explicit(&h->remote_spans, memory_order_relaxed);
            h->watch_since_ms = 0;
        }
    }
    return waiting;
}

/* The purge thread's look at the live heaps' free pages. An owner that
 * left free pages to wait and then went idle never releases the span that
 * would give them back; once they have waited RETAIN_MS the purge thread
 * does, under the heap's pages_lock (a busy lock is tried on the next
 * pass; the owner's span paths hold it only briefly). Returns true while
 * pages wait. */
/* Whether h's parked spans have stayed parked RETAIN_MS: nothing parked or
 * taken back since the purge thread's earlier look. Sets *waiting while
 * some wait. */
static bool parked_due(heap_t *h, uint64_t now, bool *waiting)
{
    bool any = false;
    for (int i = 0; i < CLASS_COUNT - PARK_FIRST_CLASS; i++)
        any |= atomic_load_explicit(&h->parked[i], memory_order_seq_cst) != NULL;
    if (!any)
        return false;
    uint32_t gen = atomic_load_explicit(&h->park_gen, memory_order_relaxed);
    if (gen != h->watch_park_gen || h->watch_park_ms == 0) {
        h->watch_park_gen = gen;
        h->watch_park_ms = now;
    } else if (now - h->watch_park_ms >= (uint64_t)_ta_opt(TA_OPT_RETAIN_MS)) {
        return true; /* watch_park_ms is cleared once they are taken */
    }
    *waiting = true;
    return false;
}

/* With at_once (memory pressure, from any thread) every heap's waiting
 * pages go, due or not, and the purge thread's watch_* fields are left
 * alone. */
static bool purge_idle_owners(bool at_once)
{
    uint64_t now = _ta_os_now_ms();
    int pid = _ta_os_pid();
    bool waiting = false;
    for (heap_t *h = heaps_first(); h; h = h->next_all) {
        if (atomic_load_explicit(&h->abandoned, memory_order_relaxed) || h->orphaned)
            continue; /* tidy_abandoned gives back the abandoned ones' */
        bool unpark = false;
        for (int i = 0; at_once && i < CLASS_COUNT - PARK_FIRST_CLASS; i++)
            unpark |= atomic_load_explicit(&h->parked[i], memory_order_seq_cst) != NULL;
        if (!at_once)
            unpark = parked_due(h, now, &waiting);
        bool dirty = atomic_load_explicit(&h->dirty_bytes, memory_order_seq_cst) != 0;
        bool purge = dirty && (at_once || dirty_due(h, now));
        waiting |= dirty && !purge;
        if (!unpark && !purge)
            continue;
        /* The pid first: a _Fork child that inherits the lock held knows
         * whose it was (pages_lock_own). A mark already there is the
         * parent's, in a _Fork child: left for the owner to take over. */
        int none = 0;
        if (!atomic_compare_exchange_strong_explicit(&h->pages_holder_pid, &none, pid,
                                                     memory_order_relaxed, memory_order_relaxed))
            continue;
        if (!_ta_lock_try(&h->pages_lock)) {
            atomic_store_explicit(&h->pages_holder_pid, 0, memory_order_relaxed);
            waiting = true;
            continue;
        }
        for (int i = 0; unpark && i < CLASS_COUNT - PARK_FIRST_CLASS; i++) {
            span_t *s = atomic_exchange_explicit(&h->parked[i], NULL, memory_order_acquire);
            if (s != NULL) /* parked RETAIN_MS: its pages go at once */
                span_free_pages(h, s, true, now);
        }
        if (unpark && !at_once)
            h->watch_park_ms = 0;
        if (at_once || dirty_due(h, now))
            heap_purge(h); /* pages whose advice fails stay: not waited for */
        _ta_unlock(&h->pages_lock);
        atomic_store_explicit(&h->pages_holder_pid, 0, memory_order_relaxed);
    }
    return waiting;
}

bool _ta_small_purge_pass(void)
{
    bool more = tidy_abandoned(false); /* later frees wake the purge thread again */
    if (watch_live_heaps() | purge_idle_owners(false))
        return true;
    atomic_store_explicit(&purge_watching, false, memory_order_seq_cst);
    if (watch_live_heaps() | purge_idle_owners(false)) { /* work came in meanwhile */
        atomic_store_explicit(&purge_watching, true, memory_order_relaxed);
        return true;
    }
    return more;
}

void _ta_small_release_now(void)
{
    tidy_abandoned(true);
    purge_idle_owners(true);
}

/* The tests' hook, in the test build only (TA_TEST_HOOKS). */
#ifdef TA_TEST_HOOKS
void (*_Atomic _ta_small_abandon_hook)(int stage);

static void abandon_hook(int stage)
{
    void (*hook)(int) = atomic_load_explicit(&_ta_small_abandon_hook, memory_order_relaxed);
    if (hook)
        hook(stage);
}
#else
static inline void abandon_hook(int stage)
{
    (void)stage;
}
#endif

static void heap_abandon(heap_t *h)
{
    /* Free pages wait RETAIN_MS like a live heap's: a thread pool's next
     * thread adopts the heap and reuses them without faults (mstress,
     * whose rounds start new threads, spent 29% of its time refaulting
     * what each exit purged); the purge thread gives back what waits.
     * Without one (PURGE_THREAD off, or it could not start) nothing would:
     * no allocation path looks at abandoned heaps. */
    bool waiting = heap_tidy(h, !purge_thread_runs());
    abandon_hook(0);
    atomic_store_explicit(&h->abandoned, true, memory_order_seq_cst);
    abandon_hook(1);
    _ta_lock(&heaps_lock);
    h->next_abandoned = abandoned;
    abandoned = h;
    _ta_unlock(&heaps_lock);
    /* A free that came in after the tidy but read the heap as still owned
     * woke no one (heap_notify): the purge thread must drain it now. */
    if (waiting || atomic_load_explicit(&h->remote_spans, memory_order_seq_cst) != NULL)
        purge_hook(&purge_hooks.wake);
}

static void thread_exit_cb(void *arg)
{
    heap_t *h = arg;
    if (h == NULL)
        return;
    _ta_thread_heap = &empty_heap;
    tls_exiting = true;
    heap_abandon(h);
    purge_hook(&purge_hooks.thread_exiting); /* perhaps the last thread but the purge thread */
}

void _ta_small_thread_done(void)
{
    heap_t *h = _ta_thread_heap;
    if (h != &empty_heap) {
        _ta_thread_heap = &empty_heap;
        _ta_os_key_set(heap_key, NULL);
        heap_abandon(h);
    }
}

void _ta_small_fork_prepare(void)
{
    _ta_lock(&tidy_lock);
    _ta_lock(&heaps_lock);
}

void _ta_small_fork_parent(void)
{
    _ta_unlock(&heaps_lock);
    _ta_unlock(&tidy_lock);
}

/* In the child only the forking thread lives on. The other threads' heaps
 * may have been in the middle of an update when fork happened (they take
 * no lock), so the child never adopts them: they stay orphaned, and blocks
 * the child frees into them are not reused. A leak bounded by what those
 * threads held, instead of a corrupted heap. */
void _ta_small_fork_child(void)
{
    /* Their locks may be held for good (a thread inside a span path at
     * fork): the purge thread leaves them alone. */
    for (heap_t *h = all_heaps; h; h = h->next_all)
        if (h != _ta_thread_heap && !atomic_load_explicit(&h->abandoned, memory_order_relaxed))
            h->orphaned = true;
    _ta_unlock(&heaps_lock);
    _ta_unlock(&tidy_lock);
    atomic_store(&purge_watching, false); /* the child has no purge thread yet */
}

/* The calling thread's spans, counted now: its own figures are exact. */
static void heap_flush_stats(heap_t *h)
{
    pages_lock_own(h); /* the purge thread may be freeing a parked span */
    for (segment_t *seg = h->segments; seg; seg = seg->next)
        for (int i = META_PAGES; i < SEGMENT_PAGES; i++)
            if (seg->spans[i].state != SPAN_FREE)
                span_flush(h, &seg->spans[i]);
    _ta_unlock(&h->pages_lock);
    live_flush(h);
}

void _ta_small_stats(ta_stats_t *st)
{
    if (_ta_thread_heap != &empty_heap)
        heap_flush_stats(_ta_thread_heap);
    int64_t live = atomic_load_explicit(&small_live, memory_order_relaxed);
    st->small_live_bytes = live > 0 ? (uint64_t)live : 0;
    st->small_peak_bytes = (uint64_t)atomic_load_explicit(&small_peak, memory_order_relaxed);
    st->small_committed_bytes = atomic_load_explicit(&committed_bytes, memory_order_relaxed);
    st->small_segment_bytes = atomic_load_explicit(&segment_bytes, memory_order_relaxed);
    st->small_spans = atomic_load_explicit(&span_count, memory_order_relaxed);
    st->heaps = atomic_load_explicit(&heap_count, memory_order_relaxed);
    int64_t dirty = atomic_load_explicit(&dirty_total, memory_order_relaxed);
    st->small_dirty_bytes = dirty > 0 ? (uint64_t)dirty : 0;
    st->small_remote_released_bytes =
        atomic_load_explicit(&remote_released_bytes, memory_order_relaxed);
    st->mappings += atomic_load_explicit(&mapping_count, memory_order_relaxed);
}
