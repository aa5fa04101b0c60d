/* SPDX-License-Identifier: MIT */
/*
 * The small path: size-class slabs in 4 MiB segments that this file maps
 * itself. A segment is 64 slab pages of 64 KiB; page 0 holds the segment's
 * metadata (span descriptors with free bitmaps), so nothing is kept inside
 * a free block except the link of a pending cross-thread free. A span is a
 * run of pages serving one size class.
 *
 * Every thread owns a heap (segments, spans per class) and allocates and
 * frees its own blocks without locks or atomics. A block freed by another
 * thread is pushed on its owner heap's lock-free stack, which the owner
 * drains when a class runs dry and on trim (the idea of mimalloc's
 * thread-free lists, kept to one list per heap). A span that empties gives
 * its pages back to the segment; free pages are returned to the kernel
 * with MADV_DONTNEED once a heap holds more than a few MiB of them, and on
 * trim. A heap whose thread exits is abandoned and later adopted whole by
 * a new thread, so heaps are never destroyed.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

#define SEGMENT_SHIFT 22
#define SEGMENT_SIZE ((size_t)1 << SEGMENT_SHIFT) /* 4 MiB */
#define SLAB_PAGE_SHIFT 16
#define SLAB_PAGE_SIZE ((size_t)1 << SLAB_PAGE_SHIFT) /* 64 KiB */
#define SEGMENT_PAGES 64
#define SPAN_MAX_BLOCKS 4096
#define SPAN_MAX_PAGES 16 /* slab pages of the largest span */
#define SPAN_MAX_OS_PAGES (SPAN_MAX_PAGES * SLAB_PAGE_SIZE / 4096) /* at 4 KiB pages */
#define SEGMENT_MAGIC 0x5441534547ULL                              /* "TASEG" */
#define PURGE_LIMIT ((size_t)8 << 20)                              /* free pages a heap may keep */
#define STATS_BATCH 65536 /* live-byte deltas flushed beyond this */

/* ---- size classes: 16-byte steps to 128, then four per doubling -------- */

#define CLASS_COUNT 60

typedef struct {
    uint32_t block_size;
    uint16_t capacity; /* blocks per span */
    uint8_t pages;     /* slab pages per span */
} class_info_t;

static class_info_t classes[CLASS_COUNT];
static uint8_t small_class[1024 / 16 + 1]; /* class by (size + 15) / 16, up to 1 KiB */

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
    if (size <= 128)
        return size ? (int)((size - 1) >> 4) : 0;
    int lg = 63 - __builtin_clzll((unsigned long long)(size - 1)); /* 2^lg < size <= 2^(lg+1) */
    int quarter = (int)(((size - 1) >> (lg - 2)) & 3); /* which quarter of the doubling */
    return 8 + (lg - 7) * 4 + quarter;
}

static void classes_init(void)
{
    for (int c = 0; c < CLASS_COUNT; c++) {
        size_t bs;
        if (c < 8) {
            bs = 16 * (size_t)(c + 1);
        } else {
            int step = c - 8; /* 160 192 224 256 | 320 ... */
            size_t base = (size_t)128 << (step / 4);
            bs = base + (base / 4) * (size_t)(step % 4 + 1);
        }
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
    for (size_t i = 0; i < sizeof small_class; i++)
        small_class[i] = (uint8_t)class_of_computed(i * 16);
}

static inline int class_of(size_t size)
{
    if (TA_LIKELY(size <= 1024))
        return small_class[(size + 15) >> 4];
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
    for (size_t size = 0; size <= 1024; size++)
        if (class_of(size) != class_of_computed(size) || classes[class_of(size)].block_size < size)
            return false;
    return true;
}

/* ---- metadata: spans, segments, heaps ------------------------------------ */

struct heap_s;

typedef struct span_s {
    struct span_s *next, *prev; /* the heap's partial list of this class */
    char *start;                /* its first block (from the span's index, it would take a
                                   division by sizeof(span_t) on every call) */
    uint32_t block_size;
    uint16_t capacity;
    uint16_t used;
    uint64_t summary; /* bit w set: free_bits[w] has a free block */
    uint64_t recip;   /* ceil(2^42 / block_size): block index without a division */
    uint8_t class_idx;
    uint8_t pages;
    uint8_t in_use;
    uint8_t listed;                           /* on the partial list */
    uint64_t free_bits[SPAN_MAX_BLOCKS / 64]; /* 1 = free */
    /* OS pages of this span given back by a trimmer (see "trimming other
     * threads' heaps"): the blocks on them wait here for the owner. */
    _Atomic uint64_t released[SPAN_MAX_OS_PAGES / 64];
} span_t;

typedef struct segment_s {
    uint64_t magic;
    struct heap_s *heap;
    struct segment_s *next, *prev;
    uint64_t used_pages;              /* bit i: page i belongs to a span (bit 0: this header) */
    uint64_t dirty_pages;             /* free pages still backed by memory */
    uint8_t page_span[SEGMENT_PAGES]; /* page -> first page of its span */
    span_t spans[SEGMENT_PAGES];      /* indexed by a span's first page */
} segment_t;

_Static_assert(sizeof(segment_t) <= SLAB_PAGE_SIZE, "segment header must fit in page 0");

typedef struct heap_s {
    span_t *current[CLASS_COUNT];
    span_t *partial[CLASS_COUNT];
    segment_t *segments;
    segment_t *spare;       /* one empty segment kept to avoid map/unmap churn */
    _Atomic(void *) remote; /* blocks freed by other threads */
    struct heap_s *next_all;
    struct heap_s *next_abandoned;
    size_t dirty_bytes;
    uint64_t dirty_since_ms; /* when dirty_bytes last left zero */
    bool registered;         /* on all_heaps */
    atomic_bool abandoned;   /* no thread owns it: it sits on the abandoned list */
    int64_t live_delta;      /* not yet flushed to small_live */
    /* Trimming by other threads (malloc_trim, the purge thread). */
    atomic_bool trim_busy;        /* a trimmer or the owner's merge holds the released bits */
    atomic_bool released_pending; /* some span has released pages for the owner to merge */
    _Atomic uint64_t collects;    /* the owner's drains of remote, for idleness */
    uint64_t watch_collects;      /* the purge thread's view: collects when last seen */
    uint64_t watch_since_ms;      /* since when remote has waited, undrained */
    void *watch_head;             /* remote's head after the purge thread's last trim */
} heap_t;

static _Atomic int64_t dirty_total; /* sum of the heaps' dirty_bytes, for statistics */

/* Every change of a heap's free-page bytes goes through here, so that the
 * statistics never read another thread's heap. */
static inline void dirty_add(heap_t *h, int64_t delta)
{
    h->dirty_bytes = (size_t)((int64_t)h->dirty_bytes + delta);
    atomic_fetch_add_explicit(&dirty_total, delta, memory_order_relaxed);
}

/* ---- global state ---------------------------------------------------------- */

static ta_lock_t heaps_lock; /* guards all_heaps, abandoned, heap_chunk */
static heap_t *all_heaps;
static heap_t *abandoned;
static char *heap_chunk;
static size_t heap_chunk_left;
static atomic_bool slab_ready;
static pthread_key_t heap_key;

static TA_TLS heap_t *tls_heap;

static _Atomic int64_t small_live, small_peak;
static _Atomic uint64_t committed_bytes, segment_bytes, span_count, heap_count;

/* One bit per 4 MiB of a 48-bit address space marks slab segments, so that
 * free() can tell a slab block from a large block without touching either
 * (the test itself is inline, in internal.h). */
#define SEGMAP_BITS ((size_t)1 << (48 - SEGMENT_SHIFT))
_Static_assert(SEGMENT_SHIFT == TA_SEGMENT_SHIFT, "internal.h's ownership test");
_Atomic(uint64_t *) _ta_segmap;

static bool segmap_ensure(void)
{
    if (atomic_load_explicit(&_ta_segmap, memory_order_acquire))
        return true;
    void *mem;
    size_t bytes = SEGMAP_BITS / 8;
    if (_ta_os_map(bytes, _ta_os_page_size(), &mem) != 0)
        return false;
    uint64_t *expected = NULL;
    if (!atomic_compare_exchange_strong(&_ta_segmap, &expected, (uint64_t *)mem))
        _ta_os_unmap(mem, bytes);
    return true;
}

static void segmap_set(uintptr_t seg, bool on)
{
    uint64_t *map = atomic_load_explicit(&_ta_segmap, memory_order_acquire);
    size_t bit = seg >> SEGMENT_SHIFT;
    _Atomic uint64_t *word = (_Atomic uint64_t *)&map[bit / 64];
    if (on)
        atomic_fetch_or_explicit(word, 1ULL << (bit % 64), memory_order_release);
    else
        atomic_fetch_and_explicit(word, ~(1ULL << (bit % 64)), memory_order_release);
}

/* ---- statistics helpers ------------------------------------------------------ */

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

static inline void live_add(heap_t *h, int64_t bytes)
{
    int64_t d = h->live_delta + bytes;
    h->live_delta = d;
    if (TA_UNLIKELY((uint64_t)(d + STATS_BATCH) > 2 * (uint64_t)STATS_BATCH))
        live_flush(h);
}

/* ---- heaps ---------------------------------------------------------------------- */

static void thread_exit_cb(void *arg);

static void slab_init_once(void)
{
    _ta_lock(&heaps_lock);
    if (!atomic_load_explicit(&slab_ready, memory_order_relaxed)) {
        classes_init();
        pthread_key_create(&heap_key, thread_exit_cb);
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
 * wins and the others carve from it and unmap theirs (before, each
 * installed its own, and the chunks replaced were lost). */
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
            atomic_fetch_add_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
    }
    if (!h->registered) { /* new: fresh zero memory */
        h->registered = true;
        _ta_lock(&heaps_lock);
        h->next_all = all_heaps;
        all_heaps = h;
        _ta_unlock(&heaps_lock);
        atomic_fetch_add_explicit(&heap_count, 1, memory_order_relaxed);
    }
    tls_heap = h;
    pthread_setspecific(heap_key, h);
    return h;
}

static inline heap_t *heap_get(void)
{
    heap_t *h = tls_heap;
    return TA_LIKELY(h != NULL) ? h : heap_acquire();
}

/* ---- segments and page runs ------------------------------------------------------ */

static inline segment_t *segment_of(const void *p)
{
    return (segment_t *)((uintptr_t)p & ~(uintptr_t)(SEGMENT_SIZE - 1));
}

static segment_t *segment_new(heap_t *h)
{
    if (!segmap_ensure())
        return NULL;
    void *mem;
    if (_ta_os_map(SEGMENT_SIZE, SEGMENT_SIZE, &mem) != 0)
        return NULL;
    atomic_fetch_add_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
    _ta_os_name(mem, SEGMENT_SIZE, "tensoralloc-slab");
    segment_t *seg = mem;
    seg->magic = SEGMENT_MAGIC;
    seg->heap = h;
    seg->used_pages = 1;
    seg->next = h->segments;
    if (h->segments)
        h->segments->prev = seg;
    h->segments = seg;
    segmap_set((uintptr_t)seg, true);
    atomic_fetch_add_explicit(&segment_bytes, SEGMENT_SIZE, memory_order_relaxed);
    return seg;
}

static void segment_unlink(heap_t *h, segment_t *seg)
{
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        h->segments = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
}

/* Unmaps an empty segment. If the kernel refuses, the segment stays as
 * the heap's spare, to be tried again on the next trim. The links live in
 * the segment itself: it leaves the list before its memory goes. */
static void segment_release(heap_t *h, segment_t *seg)
{
    uint64_t dirty = seg->dirty_pages;
    segment_unlink(h, seg);
    segmap_set((uintptr_t)seg, false);
    if (_ta_os_unmap(seg, SEGMENT_SIZE) != 0) {
        segmap_set((uintptr_t)seg, true);
        seg->prev = NULL;
        seg->next = h->segments;
        if (h->segments)
            h->segments->prev = seg;
        h->segments = seg;
        h->spare = seg;
        return;
    }
    dirty_add(h, -(int64_t)__builtin_popcountll(dirty) * (int64_t)SLAB_PAGE_SIZE);
    atomic_fetch_sub_explicit(&segment_bytes, SEGMENT_SIZE, memory_order_relaxed);
    atomic_fetch_sub_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
}

/* First run of k free pages, or -1. */
static int find_run(uint64_t used, int k)
{
    uint64_t want = k == 64 ? ~0ULL : ((1ULL << k) - 1);
    for (int i = 1; i + k <= SEGMENT_PAGES; i++)
        if (((used >> i) & want) == 0)
            return i;
    return -1;
}

static span_t *span_new(heap_t *h, int c)
{
    const class_info_t *ci = &classes[c];
    segment_t *seg;
    int first = -1;
    for (seg = h->segments; seg; seg = seg->next)
        if ((first = find_run(seg->used_pages, ci->pages)) >= 0)
            break;
    if (seg == NULL) {
        if ((seg = segment_new(h)) == NULL)
            return NULL;
        first = find_run(seg->used_pages, ci->pages);
    }
    if (h->spare == seg) /* the kept empty segment is in use again */
        h->spare = NULL;
    uint64_t run = (ci->pages == 64 ? ~0ULL : ((1ULL << ci->pages) - 1)) << first;
    uint64_t was_dirty = seg->dirty_pages & run;
    seg->used_pages |= run;
    seg->dirty_pages &= ~run;
    dirty_add(h, -(int64_t)__builtin_popcountll(was_dirty) * (int64_t)SLAB_PAGE_SIZE);
    for (int i = 0; i < ci->pages; i++)
        seg->page_span[first + i] = (uint8_t)first;

    span_t *s = &seg->spans[first];
    s->next = s->prev = NULL;
    s->start = (char *)seg + (size_t)first * SLAB_PAGE_SIZE;
    s->block_size = ci->block_size;
    s->capacity = ci->capacity;
    s->used = 0;
    s->recip = block_recip(ci->block_size);
    s->class_idx = (uint8_t)c;
    s->pages = ci->pages;
    s->in_use = 1;
    s->listed = 0;
    size_t words = (ci->capacity + 63) / 64;
    for (size_t w = 0; w < words; w++)
        s->free_bits[w] = ~0ULL;
    if (ci->capacity % 64)
        s->free_bits[words - 1] = (1ULL << (ci->capacity % 64)) - 1;
    s->summary = words == 64 ? ~0ULL : (1ULL << words) - 1;
    atomic_fetch_add_explicit(&committed_bytes, (uint64_t)ci->pages * SLAB_PAGE_SIZE,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&span_count, 1, memory_order_relaxed);
    return s;
}

static void partial_push(heap_t *h, span_t *s)
{
    s->prev = NULL;
    s->next = h->partial[s->class_idx];
    if (s->next)
        s->next->prev = s;
    h->partial[s->class_idx] = s;
    s->listed = 1;
}

static void partial_unlink(heap_t *h, span_t *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        h->partial[s->class_idx] = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->next = s->prev = NULL;
    s->listed = 0;
}

static void heap_purge(heap_t *h);

/* Gives an empty span's pages back to its segment. */
static void span_release(heap_t *h, segment_t *seg, span_t *s)
{
    if (s->listed)
        partial_unlink(h, s);
    if (h->current[s->class_idx] == s)
        h->current[s->class_idx] = NULL;
    int first = (int)(s - seg->spans);
    uint64_t run = (s->pages == 64 ? ~0ULL : ((1ULL << s->pages) - 1)) << first;
    s->in_use = 0;
    seg->used_pages &= ~run;
    seg->dirty_pages |= run;
    if (h->dirty_bytes == 0)
        h->dirty_since_ms = _ta_os_now_ms();
    dirty_add(h, (int64_t)s->pages * (int64_t)SLAB_PAGE_SIZE);
    atomic_fetch_sub_explicit(&committed_bytes, (uint64_t)s->pages * SLAB_PAGE_SIZE,
                              memory_order_relaxed);
    atomic_fetch_sub_explicit(&span_count, 1, memory_order_relaxed);
    if (seg->used_pages == 1) { /* only the header left */
        if (h->spare == NULL) {
            h->spare = seg;
        } else if (h->spare != seg) {
            segment_release(h, seg);
            return;
        }
    }
    if (h->dirty_bytes > PURGE_LIMIT)
        heap_purge(h);
}

/* Returns free pages to the kernel, one madvise per run of dirty pages. */
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
    }
}

/* ---- blocks ------------------------------------------------------------------------ */

/* The lowest free block: the summary names the first word with one, so
 * this is two bit scans, not a search (s has a free block). */
static inline void *span_take(span_t *s)
{
    uint64_t summary = s->summary;
    size_t w = (size_t)__builtin_ctzll(summary);
    uint64_t bits = s->free_bits[w];
    size_t b = (size_t)__builtin_ctzll(bits);
    bits &= bits - 1;
    s->free_bits[w] = bits;
    if (bits == 0)
        s->summary = summary & (summary - 1);
    s->used++;
    return s->start + (w * 64 + b) * s->block_size;
}

/* A span that is not its class's current one changed state: it emptied
 * (its pages go back to the segment) or has room again (it is listed). */
__attribute__((noinline)) static void span_after_free(heap_t *h, segment_t *seg, span_t *s)
{
    if (s->used == 0)
        span_release(h, seg, s);
    else
        partial_push(h, s);
}

/* Frees block idx of span s, owned by heap h (the calling thread's). */
static inline void block_free_local(heap_t *h, segment_t *seg, span_t *s, uint32_t idx,
                                    const char *call, const void *p)
{
    uint64_t bit = 1ULL << (idx % 64);
    TA_CHECK(!(s->free_bits[idx / 64] & bit), call, p, "double free");
    s->free_bits[idx / 64] |= bit;
    s->summary |= 1ULL << (idx / 64);
    bool was_full = s->used == s->capacity;
    s->used--;
    live_add(h, -(int64_t)s->block_size);
    if (TA_UNLIKELY((s->used == 0 || was_full) && h->current[s->class_idx] != s))
        span_after_free(h, seg, s);
}

/* Validates p and finds its segment, span and block index. */
static span_t *block_locate(const void *p, const char *call, segment_t **seg_out, uint32_t *idx_out)
{
    segment_t *seg = segment_of(p);
    TA_CHECK(seg->magic == SEGMENT_MAGIC, call, p, "corrupted slab segment");
    size_t page = ((uintptr_t)p - (uintptr_t)seg) >> SLAB_PAGE_SHIFT;
    TA_CHECK(page > 0, call, p, "invalid pointer");
    span_t *s = &seg->spans[seg->page_span[page]];
    TA_CHECK(s->in_use, call, p, "invalid pointer (free page)");
    size_t off = (size_t)((const char *)p - s->start);
    uint32_t idx = (uint32_t)((off * s->recip) >> 42);
    TA_CHECK(idx < s->capacity && (size_t)idx * s->block_size == off, call, p,
             "invalid pointer (not the start of a block)");
    *seg_out = seg;
    *idx_out = idx;
    return s;
}

/* ---- trimming other threads' heaps --------------------------------------------
 * Blocks that other threads free wait on the owner's remote list until the
 * owner drains it, which an idle owner never does. A trimmer (malloc_trim
 * in any thread, or the purge thread once a list has waited RETAIN_MS
 * undrained) takes the list over with one exchange, so the owner's fast
 * paths are untouched, and gives back every OS page that lies wholly
 * under blocks it took: the owner cannot hand those blocks out (they are
 * not in its free bitmap) and nobody else may touch them (they are
 * freed). It marks those pages in the span's released bits and pushes the
 * other blocks back. The owner, on its next drain, frees the blocks that
 * touch marked pages. A flag per heap (trim_busy), taken with an exchange
 * and never waited on, keeps a trimmer and the owner's merge apart, so
 * the owner only ever sees a trimmer's marks complete. */

static _Atomic uint64_t remote_released_bytes;
static atomic_bool purge_watching; /* the purge thread watches the live heaps' lists */

#define TRIM_STACK_BLOCKS 1024 /* taken at once when no scratch can be mapped */

static bool bits_any(const uint64_t *w, size_t first, size_t last)
{
    for (size_t b = first; b <= last; b++)
        if (w[b / 64] >> (b % 64) & 1)
            return true;
    return false;
}

static void push_chain(heap_t *h, void *first, void *last)
{
    void *head = atomic_load_explicit(&h->remote, memory_order_relaxed);
    do {
        *(void **)last = head;
    } while (!atomic_compare_exchange_weak_explicit(&h->remote, &head, first, memory_order_release,
                                                    memory_order_relaxed));
}

/* In-place heapsort by address: no allocation, O(n log n). */
static void sift_down(void **a, size_t root, size_t n)
{
    for (size_t child; (child = 2 * root + 1) < n; root = child) {
        if (child + 1 < n && a[child + 1] > a[child])
            child++;
        if (a[root] >= a[child])
            return;
        void *t = a[root];
        a[root] = a[child];
        a[child] = t;
    }
}

static void sort_by_address(void **a, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        sift_down(a, i, n);
    for (size_t end = n; end-- > 1;) {
        void *t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

/* Gives back the pages wholly under blocks b[0..n) of span s (sorted) and
 * marks them; the blocks that touch none of them are linked onto *back.
 * Returns true if any page was marked. */
static bool trim_span(span_t *s, void **b, size_t n, void **back, void **back_tail)
{
    size_t page = _ta_os_page_size();
    char *start = s->start;
    size_t bs = s->block_size;
    size_t used_end = (size_t)s->capacity * bs; /* the tail beyond holds no block */
    size_t npages = (used_end + page - 1) / page;
    uint32_t covered[SPAN_MAX_OS_PAGES] = {0};
    for (size_t i = 0; i < n; i++) {
        size_t off = (size_t)((char *)b[i] - start), end = off + bs;
        for (size_t p = off / page; p * page < end; p++) {
            size_t lo = off > p * page ? off : p * page;
            size_t hi = end < (p + 1) * page ? end : (p + 1) * page;
            covered[p] += (uint32_t)(hi - lo);
        }
    }
    uint64_t marks[SPAN_MAX_OS_PAGES / 64] = {0};
    bool any = false;
    for (size_t p = 0; p < npages; p++) {
        size_t want = used_end - p * page < page ? used_end - p * page : page;
        if (covered[p] == want) {
            marks[p / 64] |= 1ULL << (p % 64);
            any = true;
        }
    }
    /* Link the others before giving pages back: the links live in blocks. */
    for (size_t i = 0; i < n; i++) {
        size_t off = (size_t)((char *)b[i] - start);
        if (any && bits_any(marks, off / page, (off + bs - 1) / page))
            continue; /* on a released page: the owner frees it from the marks */
        *(void **)b[i] = *back;
        if (*back == NULL)
            *back_tail = b[i];
        *back = b[i];
    }
    for (size_t p = 0; p < npages;) {
        if (!(marks[p / 64] >> (p % 64) & 1)) {
            p++;
            continue;
        }
        size_t run = 1;
        while (p + run < npages && (marks[(p + run) / 64] >> ((p + run) % 64) & 1))
            run++;
        /* A failed advice keeps the pages resident; the marks still hold. */
        if (_ta_os_advise_dontneed(start + p * page, run * page) == 0)
            atomic_fetch_add_explicit(&remote_released_bytes, run * page, memory_order_relaxed);
        p += run;
    }
    for (size_t w = 0; w < SPAN_MAX_OS_PAGES / 64; w++)
        if (marks[w])
            atomic_fetch_or_explicit(&s->released[w], marks[w], memory_order_relaxed);
    return any;
}

/* Takes over h's remote list and gives back what it can (see above). The
 * blocks are sorted by address in a scratch mapping, so that each span's
 * blocks lie together; without one, the first TRIM_STACK_BLOCKS are
 * trimmed and the rest pushed back as they were. */
static void heap_trim_remote(heap_t *h)
{
    if (atomic_exchange_explicit(&h->trim_busy, true, memory_order_acquire))
        return; /* another trimmer, or the owner merging */
    void *list = atomic_exchange_explicit(&h->remote, NULL, memory_order_acquire);
    size_t n = 0;
    for (void *b = list; b; b = *(void **)b)
        n++;
    void *stack[TRIM_STACK_BLOCKS], **blocks = stack, *scratch = NULL;
    size_t scratch_bytes = _ta_align_up(n * sizeof(void *), _ta_os_page_size());
    if (n > TRIM_STACK_BLOCKS && _ta_os_map(scratch_bytes, _ta_os_page_size(), &scratch) == 0)
        blocks = scratch;
    size_t cap = blocks == stack ? TRIM_STACK_BLOCKS : n, taken = 0;
    for (; list && taken < cap; list = *(void **)list)
        blocks[taken++] = list;
    void *back = NULL, *back_tail = NULL;
    if (list) { /* what did not fit goes back first, untouched */
        void *last = list;
        while (*(void **)last)
            last = *(void **)last;
        push_chain(h, list, last);
    }
    sort_by_address(blocks, taken);
    bool marked = false;
    for (size_t i = 0; i < taken;) {
        segment_t *seg;
        uint32_t idx;
        span_t *s = block_locate(blocks[i], "free", &seg, &idx);
        char *end = s->start + (size_t)s->capacity * s->block_size;
        size_t j = i + 1;
        while (j < taken && (char *)blocks[j] < end && (char *)blocks[j] > (char *)blocks[i])
            j++;
        marked |= trim_span(s, blocks + i, j - i, &back, &back_tail);
        i = j;
    }
    if (scratch)
        _ta_os_unmap(scratch, scratch_bytes);
    if (back)
        push_chain(h, back, back_tail);
    if (marked)
        atomic_store_explicit(&h->released_pending, true, memory_order_relaxed);
    atomic_store_explicit(&h->trim_busy, false, memory_order_release);
}

/* The owner frees the blocks on pages a trimmer gave back. Skipped while a
 * trimmer is at work (the next drain merges). */
static void heap_merge_released(heap_t *h)
{
    if (!atomic_load_explicit(&h->released_pending, memory_order_relaxed) ||
        atomic_exchange_explicit(&h->trim_busy, true, memory_order_acquire))
        return;
    atomic_store_explicit(&h->released_pending, false, memory_order_relaxed);
    size_t page = _ta_os_page_size();
    for (segment_t *seg = h->segments, *next_seg; seg; seg = next_seg) {
        next_seg = seg->next;
        /* Take every span's marks first: freeing the last block of the
         * last span may release the segment itself. */
        uint64_t marks[SEGMENT_PAGES][SPAN_MAX_OS_PAGES / 64];
        uint8_t marked[SEGMENT_PAGES];
        int n = 0;
        for (int i = 1; i < SEGMENT_PAGES; i++) {
            span_t *s = &seg->spans[i];
            if (!s->in_use || seg->page_span[i] != i)
                continue;
            uint64_t any = 0;
            for (size_t w = 0; w < SPAN_MAX_OS_PAGES / 64; w++)
                any |= marks[n][w] =
                    atomic_exchange_explicit(&s->released[w], 0, memory_order_relaxed);
            if (any)
                marked[n++] = (uint8_t)i;
        }
        for (int k = 0; k < n; k++) {
            span_t *s = &seg->spans[marked[k]];
            char *start = s->start;
            size_t bs = s->block_size;
            for (uint32_t idx = 0, cap = s->capacity; idx < cap; idx++) {
                size_t off = (size_t)idx * bs;
                if (bits_any(marks[k], off / page, (off + bs - 1) / page))
                    block_free_local(h, seg, s, idx, "free", start + off);
            }
        }
    }
    atomic_store_explicit(&h->trim_busy, false, memory_order_release);
}

/* Drains the blocks other threads freed into h, and the ones a trimmer
 * left on released pages. */
static void heap_collect(heap_t *h)
{
    atomic_fetch_add_explicit(&h->collects, 1, memory_order_relaxed);
    void *list = atomic_exchange_explicit(&h->remote, NULL, memory_order_acquire);
    while (list) {
        void *next = *(void **)list;
        segment_t *seg;
        uint32_t idx;
        span_t *s = block_locate(list, "free", &seg, &idx);
        block_free_local(h, seg, s, idx, "free", list);
        list = next;
    }
    heap_merge_released(h);
}

static void *alloc_slow(heap_t *h, int c)
{
    /* The current span is full: it leaves the class's slot unlisted, and a
     * free into it (also one drained just below) lists it again. */
    h->current[c] = NULL;
    heap_collect(h);
    span_t *s = h->partial[c];
    if (s) {
        partial_unlink(h, s);
    } else if ((s = span_new(h, c)) == NULL) {
        return NULL;
    }
    h->current[c] = s;
    return span_take(s);
}

/* Every case but the common one: alignment, zeroing, sizes over 1 KiB, a
 * thread without a heap yet, a current span used up. Out of line, so that
 * the fast path below needs no stack frame. */
__attribute__((noinline)) static void *small_alloc_general(size_t size, size_t alignment, bool zero)
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
    if (TA_LIKELY(s != NULL && s->summary != 0))
        p = span_take(s);
    else if ((p = alloc_slow(h, c)) == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    live_add(h, classes[c].block_size);
    if (zero)
        memset(p, 0, classes[c].block_size);
    return p;
}

/* The fast path: a thread with a heap asks for up to 1 KiB, naturally
 * aligned, not zeroed, and its current span of that class has a free
 * block. A summary of free words marks it (s->summary != 0 exactly when
 * a block is free), so used and capacity need not be read. */
void *_ta_small_alloc(size_t size, size_t alignment, bool zero)
{
    heap_t *h = tls_heap;
    if (TA_LIKELY(h != NULL && size <= 1024 && alignment <= TA_MIN_ALIGN && !zero)) {
        span_t *s = h->current[small_class[(size + 15) >> 4]];
        if (TA_LIKELY(s != NULL && s->summary != 0)) {
            void *p = span_take(s);
            live_add(h, s->block_size);
            return p;
        }
    }
    return small_alloc_general(size, alignment, zero);
}

/* A block of another thread's heap: pushed onto that heap's remote list. */
__attribute__((noinline)) static bool free_remote(heap_t *owner, void *p)
{
    void *head = atomic_load_explicit(&owner->remote, memory_order_relaxed);
    do {
        *(void **)p = head;
    } while (!atomic_compare_exchange_weak_explicit(&owner->remote, &head, p, memory_order_seq_cst,
                                                    memory_order_relaxed));
    if (head == NULL && atomic_load_explicit(&owner->abandoned, memory_order_relaxed))
        return true;
    /* Pairs with the purge thread's last look before it sleeps (seq_cst on
     * both sides): either it sees this block or this sees it asleep. */
    return !atomic_load_explicit(&purge_watching, memory_order_seq_cst) &&
           !atomic_exchange_explicit(&purge_watching, true, memory_order_seq_cst);
}

bool _ta_small_free(void *p, const char *call)
{
    segment_t *seg;
    uint32_t idx;
    span_t *s = block_locate(p, call, &seg, &idx);
    heap_t *h = tls_heap;
    if (TA_LIKELY(seg->heap == h)) {
        block_free_local(h, seg, s, idx, call, p);
        return false;
    }
    return free_remote(seg->heap, p);
}

size_t _ta_small_usable(const void *p, const char *call)
{
    segment_t *seg;
    uint32_t idx;
    span_t *s = block_locate(p, call, &seg, &idx);
    TA_CHECK(!(s->free_bits[idx / 64] & (1ULL << (idx % 64))), call, p, "pointer to a free block");
    return s->block_size;
}

/* ---- trim, thread exit, fork --------------------------------------------------------- */

/* Drains pending frees and drops empty current spans. Free pages go back
 * to the kernel when force is set or once they have waited RETAIN_MS (a
 * heap adopted soon after reuses them without faults). Returns true while
 * free pages wait. */
static bool heap_tidy(heap_t *h, bool force)
{
    heap_collect(h);
    for (int c = 0; c < CLASS_COUNT; c++) {
        span_t *s = h->current[c];
        if (s && s->used == 0) {
            h->current[c] = NULL;
            span_release(h, segment_of(s), s);
        }
    }
    live_flush(h);
    if (!force && h->dirty_bytes &&
        _ta_os_now_ms() - h->dirty_since_ms < (uint64_t)_ta_opt(TA_OPT_RETAIN_MS))
        return true;
    if (h->spare) {
        segment_t *spare = h->spare;
        h->spare = NULL;
        segment_release(h, spare);
    }
    heap_purge(h);
    return false;
}

/* Tidies the abandoned heaps that have pending frees or free pages (all
 * of them when every is set). Each is taken off the list so that no
 * thread adopts it meanwhile, then put back. */
static bool tidy_abandoned(bool every)
{
    bool waiting = false;
    _ta_lock(&heaps_lock);
    heap_t *taken = abandoned;
    abandoned = NULL;
    _ta_unlock(&heaps_lock);
    heap_t *last = NULL;
    for (heap_t *h = taken; h; h = h->next_abandoned) {
        if (every || atomic_load_explicit(&h->remote, memory_order_relaxed) || h->dirty_bytes ||
            atomic_load_explicit(&h->released_pending, memory_order_relaxed))
            waiting |= heap_tidy(h, every);
        last = h;
    }
    if (last) {
        _ta_lock(&heaps_lock);
        last->next_abandoned = abandoned;
        abandoned = taken;
        _ta_unlock(&heaps_lock);
    }
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
        if (h != tls_heap && !atomic_load_explicit(&h->abandoned, memory_order_relaxed))
            heap_trim_remote(h);
    if (tls_heap)
        heap_tidy(tls_heap, true);
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
        void *head = atomic_load_explicit(&h->remote, memory_order_seq_cst);
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
            h->watch_head = atomic_load_explicit(&h->remote, memory_order_relaxed);
            h->watch_since_ms = 0;
        }
    }
    return waiting;
}

bool _ta_small_purge_pass(void)
{
    bool more = tidy_abandoned(false); /* later frees wake the purge thread again */
    if (watch_live_heaps())
        return true;
    atomic_store_explicit(&purge_watching, false, memory_order_seq_cst);
    if (watch_live_heaps()) { /* a free came in meanwhile */
        atomic_store_explicit(&purge_watching, true, memory_order_relaxed);
        return true;
    }
    return more;
}

static void heap_abandon(heap_t *h)
{
    heap_tidy(h, true);
    atomic_store_explicit(&h->abandoned, true, memory_order_relaxed);
    _ta_lock(&heaps_lock);
    h->next_abandoned = abandoned;
    abandoned = h;
    _ta_unlock(&heaps_lock);
}

static void thread_exit_cb(void *arg)
{
    heap_t *h = arg;
    if (h == NULL)
        return;
    tls_heap = NULL;
    heap_abandon(h);
}

void _ta_small_thread_done(void)
{
    heap_t *h = tls_heap;
    if (h) {
        tls_heap = NULL;
        pthread_setspecific(heap_key, NULL);
        heap_abandon(h);
    }
}

void _ta_small_fork_prepare(void)
{
    _ta_lock(&heaps_lock);
}

void _ta_small_fork_parent(void)
{
    _ta_unlock(&heaps_lock);
}

/* In the child only the forking thread lives on. The other threads' heaps
 * may have been in the middle of an update when fork happened (they take
 * no lock), so the child never adopts them: they stay orphaned, and blocks
 * the child frees into them are not reused. A leak bounded by what those
 * threads held, instead of a corrupted heap. */
void _ta_small_fork_child(void)
{
    _ta_unlock(&heaps_lock);
    atomic_store(&purge_watching, false); /* the child has no purge thread yet */
}

void _ta_small_stats(ta_stats_t *st)
{
    if (tls_heap)
        live_flush(tls_heap);
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
}
