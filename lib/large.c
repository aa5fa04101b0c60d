/* SPDX-License-Identifier: MIT */
/*
 * The large path: every block at or above the threshold is a mapping of
 * its own, or a piece of a pooled one, starts at its first byte and owns
 * its pages. Metadata lives out of band in a hash table keyed by address.
 * Freed blocks go back to the kernel or, within the pool's byte and age
 * bounds, wait for the next large request, which takes the best fit and
 * grows it with mremap or cuts it, keeping the cut end in the pool. Pool
 * pieces of one mapping join up again when both are free. No two blocks
 * ever share a page. The pool idea and its bounds
 * follow rpmalloc 2.0's huge-mapping cache; the age limit is enforced on
 * every free and by the purge thread (purge.c), so that memory goes back
 * even if the program goes quiet.
 *
 * Locking: one lock guards the table, the pool and the statistics. No
 * kernel call is made while holding it: work is decided under the lock,
 * then done after it is released.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <string.h>

/* ---- the region table ---------------------------------------------------- */

typedef struct {
    uintptr_t addr;  /* 0 = empty slot */
    size_t capacity; /* mapped bytes */
    size_t size;     /* requested bytes, for statistics */
    bool pinned;     /* registered with the CUDA runtime (cuda.c) */
    uint64_t origin; /* the mapping it was cut from (see pool_insert_locked) */
} region_t;

#define TABLE_MIN_SLOTS 1024

static ta_lock_t large_lock;
static region_t *table;
static size_t table_slots; /* power of two */
static size_t table_used;

static size_t slot_of(uintptr_t addr, size_t slots)
{
    uint64_t h = (uint64_t)(addr >> 12) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 20) & (slots - 1);
}

static region_t *table_find(uintptr_t addr)
{
    if (table == NULL)
        return NULL;
    for (size_t i = slot_of(addr, table_slots);; i = (i + 1) & (table_slots - 1)) {
        if (table[i].addr == addr)
            return &table[i];
        if (table[i].addr == 0)
            return NULL;
    }
}

static void table_put(region_t *slots, size_t nslots, region_t r)
{
    size_t i = slot_of(r.addr, nslots);
    while (slots[i].addr != 0)
        i = (i + 1) & (nslots - 1);
    slots[i] = r;
}

/* Linear probing with backward-shift deletion: no tombstones to clean. */
static void table_remove(region_t *r)
{
    size_t mask = table_slots - 1;
    size_t hole = (size_t)(r - table);
    for (size_t i = (hole + 1) & mask; table[i].addr != 0; i = (i + 1) & mask) {
        size_t home = slot_of(table[i].addr, table_slots);
        /* move entry i into the hole if its home is not in (hole, i] */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            table[hole] = table[i];
            hole = i;
        }
    }
    table[hole].addr = 0;
    table_used--;
}

/* Makes room for one more entry; called without the lock held. The new
 * table is mapped outside the lock and swapped in under it. */
static int table_reserve(void)
{
    for (;;) {
        _ta_lock(&large_lock);
        size_t need = table_used + 1;
        size_t slots = table_slots;
        if (need * 10 <= slots * 7) /* load factor 0.7 */
            return 0;               /* returns with the lock held */
        _ta_unlock(&large_lock);

        size_t new_slots = slots ? slots * 2 : TABLE_MIN_SLOTS;
        size_t bytes = _ta_align_up(new_slots * sizeof(region_t), _ta_os_page_size());
        void *mem;
        int rc = _ta_os_map(bytes, _ta_os_page_size(), &mem);
        if (rc != 0)
            return rc;
        region_t *old = NULL;
        size_t old_bytes = 0;
        _ta_lock(&large_lock);
        if (table_slots == slots) {
            for (size_t i = 0; i < table_slots; i++)
                if (table[i].addr)
                    table_put(mem, new_slots, table[i]);
            old = table;
            old_bytes = _ta_align_up(table_slots * sizeof(region_t), _ta_os_page_size());
            table = mem;
            table_slots = new_slots;
            mem = NULL;
        }
        _ta_unlock(&large_lock);
        if (old)
            _ta_os_unmap(old, old_bytes);
        if (mem)
            _ta_os_unmap(mem, bytes);
    }
}

/* ---- pinning: the CUDA module marks blocks and is called back to unpin a
 * block before its pages are unmapped, pooled or moved --------------------- */

static void unpin_none(uintptr_t base, size_t capacity)
{
    (void)base;
    (void)capacity;
}

static void (*volatile unpin_hook)(uintptr_t, size_t) = unpin_none;

void _ta_large_set_unpin_hook(void (*hook)(uintptr_t base, size_t capacity))
{
    unpin_hook = hook ? hook : unpin_none;
}

int _ta_large_pin_mark(const void *p, bool pin, uintptr_t *base, size_t *capacity)
{
    _ta_lock(&large_lock);
    region_t *r = table_find((uintptr_t)p);
    int rc = 0;
    if (r == NULL)
        rc = -1;
    else if (r->pinned == pin)
        rc = 1;
    else {
        r->pinned = pin;
        /* The driver may change the pages' VMA: never join this block
         * with its neighbours again. */
        r->origin = 0;
        *base = r->addr;
        *capacity = r->capacity;
    }
    _ta_unlock(&large_lock);
    return rc;
}

/* Finds the block at p (lock held) and, if it is pinned, unpins it first:
 * its pages are about to be unmapped, pooled or moved. The hook runs with
 * the lock released; the block cannot go meanwhile (only its owner frees
 * or resizes it). */
static region_t *find_unpinned_locked(uintptr_t p)
{
    region_t *r = table_find(p);
    if (r && TA_UNLIKELY(r->pinned)) {
        r->pinned = false;
        region_t pinned = *r;
        _ta_unlock(&large_lock);
        unpin_hook(pinned.addr, pinned.capacity);
        _ta_lock(&large_lock);
        r = table_find(p);
    }
    return r;
}

/* ---- statistics (guarded by large_lock) ----------------------------------- */

static struct {
    uint64_t live_bytes, peak_bytes, live_count, mapped_bytes, alloc_count;
    uint64_t mapped_peak; /* the most the live blocks ever mapped, for the pool's bound */
    uint64_t pool_hits, pool_misses, pool_expired, fallbacks;
} large_stats;

static inline void mapped_add_locked(int64_t delta)
{
    large_stats.mapped_bytes = (uint64_t)((int64_t)large_stats.mapped_bytes + delta);
    if (large_stats.mapped_bytes > large_stats.mapped_peak)
        large_stats.mapped_peak = large_stats.mapped_bytes;
}

/* ---- the retain pool -------------------------------------------------------- */

typedef struct {
    uintptr_t addr;
    size_t capacity;
    uint64_t freed_ms;
    uint64_t origin;
} pool_entry_t;

#define POOL_MAX_ENTRIES 1024
#define EVICT_BATCH 32 /* victims collected per pass, on the stack */

static pool_entry_t pool[POOL_MAX_ENTRIES];
static size_t pool_count;
static size_t pool_bytes;

/* What the pool may hold now: RETAIN_BYTES, and no more than keeps the
 * large path's footprint (live mappings plus pool) within 1.25 times the
 * most its live blocks ever mapped. A process that drops a model keeps all
 * of it for the next one (live falls to zero); one whose large blocks come
 * and go a few at a time (Python's strings and lists) keeps about one
 * working set, not RETAIN_MS worth of every size it freed (python-json's
 * peak RSS was 1.6x mimalloc's). The quarter above the peak is what
 * churn of varied sizes needs to find a fitting entry: without it,
 * large-churn (1-64 MiB) ran at 0.6x, faulting fresh huge pages. */
static size_t pool_limit_locked(void)
{
    size_t max = (size_t)_ta_opt(TA_OPT_RETAIN_BYTES);
    uint64_t room =
        large_stats.mapped_peak + large_stats.mapped_peak / 4 - large_stats.mapped_bytes;
    return room < max ? (size_t)room : max;
}
static uint64_t last_origin;

/* A region to unmap once the lock is released. */
typedef struct {
    uintptr_t addr;
    size_t size;
} unmap_t;

static void pool_remove_at(size_t i)
{
    pool_bytes -= pool[i].capacity;
    pool[i] = pool[--pool_count];
}

/* Each mapping made by map or moved by mremap gets a new origin; the
 * blocks and pool pieces cut from it keep it. Nothing is done to part of
 * a piece, so pieces of one origin lie in one VMA and, adjacent and both
 * free, can join into one entry that mremap can still move or grow (it
 * refuses a range spanning two VMAs). Origin 0 never joins. */
static uint64_t new_origin_locked(void)
{
    return ++last_origin;
}

/* Puts a free range into the pool (room checked by the caller), joining
 * it with free neighbours cut from the same mapping. Returns how many
 * entries it joined (each one mapping fewer to count). */
static int pool_insert_locked(pool_entry_t e)
{
    int joined = 0;
    for (size_t i = 0; e.origin != 0 && i < pool_count;) {
        pool_entry_t n = pool[i];
        if (n.origin == e.origin &&
            (n.addr + n.capacity == e.addr || e.addr + e.capacity == n.addr)) {
            pool_remove_at(i);
            e.addr = n.addr < e.addr ? n.addr : e.addr;
            e.capacity += n.capacity;
            joined++;
            if (joined == 2)
                break;
            continue; /* the entry moved into slot i: look at it too */
        }
        i++;
    }
    pool[pool_count++] = e;
    pool_bytes += e.capacity;
    return joined;
}

/* Takes out the entry that serves a request of capacity cap best: the
 * smallest entry >= cap whose address meets align, else the largest
 * smaller one (to be grown). Returns false if the pool has nothing. */
static bool pool_take(size_t cap, size_t align, pool_entry_t *out)
{
    size_t best = POOL_MAX_ENTRIES, below = POOL_MAX_ENTRIES;
    for (size_t i = 0; i < pool_count; i++) {
        if (pool[i].addr & (align - 1))
            continue;
        if (pool[i].capacity >= cap) {
            if (best == POOL_MAX_ENTRIES || pool[i].capacity < pool[best].capacity)
                best = i;
        } else if (below == POOL_MAX_ENTRIES || pool[i].capacity > pool[below].capacity) {
            below = i;
        }
    }
    size_t pick = best != POOL_MAX_ENTRIES ? best : below;
    if (pick == POOL_MAX_ENTRIES)
        return false;
    *out = pool[pick];
    pool_remove_at(pick);
    return true;
}

/* Moves up to cap entries that are too old, or beyond the byte bound,
 * into out[]; returns how many. */
static size_t pool_evict(uint64_t now_ms, size_t max_bytes, uint64_t max_age, unmap_t *out,
                         size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < pool_count && n < cap;) {
        bool aged = now_ms - pool[i].freed_ms >= max_age;
        if (aged || pool_bytes > max_bytes) {
            out[n++] = (unmap_t){pool[i].addr, pool[i].capacity};
            if (aged)
                large_stats.pool_expired++;
            pool_remove_at(i);
        } else {
            i++;
        }
    }
    return n;
}

/* ---- the huge-page rule ------------------------------------------------------
 * THP=1 advises every mapping of 2 MiB and more. THP=2 (auto, the default)
 * advises a fresh mapping only while this process has recently given back
 * at least as many bytes: huge pages are then carved from memory the kernel
 * just got back. Taking never-touched or long-free memory as huge pages
 * was twice as slow as 4 KiB pages on model-switch here (a VM whose free
 * memory is reported to the host), while recycling it as huge pages made
 * large-churn 3x faster (docs/design.md). */

#define RECYCLE_WINDOW_MS 1000

static _Atomic uint64_t recycled_bytes, recycled_since_ms;

static void recycled_add(size_t bytes)
{
    uint64_t now = _ta_os_now_ms();
    if (now - atomic_load_explicit(&recycled_since_ms, memory_order_relaxed) > RECYCLE_WINDOW_MS) {
        atomic_store_explicit(&recycled_since_ms, now, memory_order_relaxed);
        atomic_store_explicit(&recycled_bytes, 0, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&recycled_bytes, bytes, memory_order_relaxed);
}

/* Should a mapping of cap bytes, fresh_bytes of which are untouched, be
 * advised MADV_HUGEPAGE? */
static bool thp_wanted(size_t cap, size_t fresh_bytes)
{
    long long mode = _ta_opt(TA_OPT_THP);
    if (cap < TA_HUGE_PAGE || mode == 0 || !_ta_os_thp_available())
        return false;
    if (mode == 1 || fresh_bytes == 0)
        return true;
    uint64_t now = _ta_os_now_ms();
    if (now - atomic_load_explicit(&recycled_since_ms, memory_order_relaxed) > RECYCLE_WINDOW_MS)
        return false;
    uint64_t credit = atomic_load_explicit(&recycled_bytes, memory_order_relaxed);
    while (credit >= fresh_bytes) {
        if (atomic_compare_exchange_weak_explicit(&recycled_bytes, &credit, credit - fresh_bytes,
                                                  memory_order_relaxed, memory_order_relaxed))
            return true;
    }
    return false;
}

/* ---- parked unmaps ------------------------------------------------------------
 * A munmap can fail: at vm.max_map_count, unmapping the middle of a mapping
 * needs a VMA split the kernel refuses (ENOMEM). The range is then given
 * back with MADV_DONTNEED (which splits nothing), all but its first page,
 * and parked: a node in that first page links it into a list that nothing
 * bounds, so no range is ever lost. Parked ranges are retried on trim, on
 * memory pressure and by the purge thread, at growing intervals
 * (PARK_FIRST_MS doubling) and PARK_TIMED_TRIES times at most: a process
 * idle at the limit stops trying and uses no CPU. Guarded by large_lock. */

#define PARK_FIRST_MS 100
#define PARK_TIMED_TRIES 5 /* the last timed retry about 3 s after the failure */

typedef struct parked_s {
    struct parked_s *next;
    size_t size;
    uint64_t retry_ms; /* next timed retry */
    uint32_t tries;    /* retries made */
} parked_t;

static parked_t *parked_list;
static size_t parked_count, parked_bytes;

static bool parked_timed_left_locked(void)
{
    for (parked_t *q = parked_list; q; q = q->next)
        if (q->tries < PARK_TIMED_TRIES)
            return true;
    return false;
}

static void park_range(uintptr_t addr, size_t size, uint32_t tries)
{
    size_t page = _ta_os_page_size();
    if (tries == 0 && size > page) /* give the memory back at least */
        _ta_os_advise_dontneed((void *)(addr + page), size - page);
    parked_t *q = (parked_t *)addr;
    q->size = size;
    q->tries = tries;
    q->retry_ms = _ta_os_now_ms() + ((uint64_t)PARK_FIRST_MS << (tries < 20 ? tries : 20));
    _ta_lock(&large_lock);
    q->next = parked_list;
    parked_list = q;
    __atomic_store_n(&parked_count, parked_count + 1, __ATOMIC_RELAXED);
    parked_bytes += size;
    _ta_unlock(&large_lock);
}

/* Retries the parked ranges whose time has come (all of them when force
 * is set): each once per call, without the lock held. */
static void parked_retry(bool force)
{
    uint64_t now = _ta_os_now_ms();
    _ta_lock(&large_lock);
    parked_t *due = NULL, **pp = &parked_list;
    while (*pp) {
        parked_t *q = *pp;
        if (force || (q->tries < PARK_TIMED_TRIES && now >= q->retry_ms)) {
            *pp = q->next;
            __atomic_store_n(&parked_count, parked_count - 1, __ATOMIC_RELAXED);
            parked_bytes -= q->size;
            q->next = due;
            due = q;
        } else {
            pp = &q->next;
        }
    }
    _ta_unlock(&large_lock);
    while (due) {
        parked_t *q = due;
        due = q->next;
        size_t size = q->size;
        uint32_t tries = q->tries + 1; /* forced retries count too */
        if (_ta_os_unmap(q, size) == 0) {
            atomic_fetch_sub_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
            recycled_add(size);
        } else {
            park_range((uintptr_t)q, size, tries);
        }
    }
}

/* Gives a range back to the kernel. counted: the range is a mapping the
 * guard already counts (else a piece cut off one, which becomes one when
 * its unmap fails). A failed munmap parks the range and adds
 * TA_LARGE_WAKE to *events (its timed retries need the purge thread).
 * Called without the lock held. */
static void release_mapping(uintptr_t addr, size_t size, bool counted, unsigned *events)
{
    if (_ta_os_unmap((void *)addr, size) == 0) {
        if (counted)
            atomic_fetch_sub_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
        recycled_add(size);
        return;
    }
    if (!counted)
        atomic_fetch_add_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
    park_range(addr, size, 0);
    _ta_log(false, "tensoralloc: munmap(%p, %zu) failed; parked, will retry\n", (void *)addr, size);
    *events |= TA_LARGE_WAKE; /* the timed retries */
}

static void unmap_all(const unmap_t *list, size_t n, unsigned *events)
{
    for (size_t i = 0; i < n; i++)
        release_mapping(list[i].addr, list[i].size, true, events);
}

/* ---- the vm.max_map_count guard --------------------------------------------- */

static long map_limit(void)
{
    static long kernel_limit; /* read once, then only through atomics */
    long override = (long)_ta_opt(TA_OPT_MAX_MAP_COUNT);
    if (override > 0)
        return override;
    long k = __atomic_load_n(&kernel_limit, __ATOMIC_RELAXED);
    if (k == 0) {
        k = _ta_os_max_map_count();
        __atomic_store_n(&kernel_limit, k, __ATOMIC_RELAXED);
    }
    /* Leave room for the program's own mappings: libraries, stacks, files. */
    long reserve = k / 8 > 1024 ? k / 8 : 1024;
    return k > 2 * reserve ? k - reserve : k / 2;
}

bool _ta_large_near_map_limit(void)
{
    return atomic_load_explicit(&_ta_live_mappings, memory_order_relaxed) + 1 >= map_limit();
}

/* ---- allocation ------------------------------------------------------------------ */

static size_t natural_alignment(size_t cap)
{
    return cap >= TA_HUGE_PAGE ? TA_HUGE_PAGE : _ta_os_page_size();
}

/* Always the whole mapping: advising part of it would split the VMA, and
 * mremap refuses (EFAULT) to move or grow a range spanning two VMAs. */
static void name_and_advise(void *p, size_t cap, size_t fresh_bytes)
{
    if (thp_wanted(cap, fresh_bytes))
        _ta_os_advise_hugepage(p, cap);
    _ta_os_name(p, cap, "tensoralloc");
}

/* The unused part of a pooled mapping stays in the pool as an entry of its
 * own, with the age of the mapping it came from: its pages are touched, so
 * the next load reuses them instead of faulting fresh ones in (unmapping
 * the tails made model-switch fault 26% more pages than tcmalloc, and the
 * kernel zero them; docs/design.md). Even a piece too small for the large
 * path is kept: it joins its block again when that is freed. A piece
 * beyond the pool's bounds is unmapped. Called without the lock. */
static void pool_keep_piece(pool_entry_t piece, unsigned *events)
{
    bool kept = false, first = false;
    int joined = 0;
    if (_ta_opt(TA_OPT_RETAIN_MS) > 0) {
        _ta_lock(&large_lock);
        if (pool_count < POOL_MAX_ENTRIES && pool_bytes + piece.capacity <= pool_limit_locked()) {
            first = pool_count == 0;
            joined = pool_insert_locked(piece);
            kept = true;
        }
        _ta_unlock(&large_lock);
    }
    if (!kept) {
        release_mapping(piece.addr, piece.capacity, false, events);
        return;
    }
    /* A piece of a mapping may become a mapping of its own when its
     * neighbour is unmapped: count it as one for the max_map_count guard. */
    atomic_fetch_add_explicit(&_ta_live_mappings, 1 - joined, memory_order_relaxed);
    if (first)
        *events |= TA_LARGE_WAKE; /* the pool has a deadline to keep */
}

/* Fits a pooled entry to *capp: cuts it (the rest kept in the pool) or grows
 * it, and stores the capacity the block ends up with. Returns the block's
 * address, or NULL (the entry is then unmapped). A grown block was moved:
 * its origin becomes 0, for the caller to give it a new one. */
static void *pool_fit(pool_entry_t *entry, size_t *capp, size_t align, bool zero, unsigned *events)
{
    pool_entry_t e = *entry;
    size_t cap = *capp;
    void *p = (void *)e.addr;
    size_t dirty = e.capacity;
    bool huge_aligned = (e.addr & (TA_HUGE_PAGE - 1)) == 0;
    uintptr_t from_end = e.addr + e.capacity - cap;
    if (e.capacity > cap && cap < TA_HUGE_PAGE && huge_aligned &&
        e.capacity - cap >= TA_HUGE_PAGE && (from_end & (align - 1)) == 0) {
        /* A small block from a big entry comes off its end, so that the
         * rest keeps its 2 MiB alignment for blocks of 2 MiB and more. */
        pool_keep_piece((pool_entry_t){e.addr, e.capacity - cap, e.freed_ms, e.origin}, events);
        p = (void *)from_end;
        dirty = cap;
    } else if (e.capacity > cap) {
        /* Cut a huge-page mapping only on a 2 MiB boundary: cutting inside
         * a huge page splits it, and on model-switch that tripled the run
         * time (docs/design.md). The block keeps the rest of that page. */
        size_t huge_cut = _ta_align_up(cap, TA_HUGE_PAGE);
        if (cap >= TA_HUGE_PAGE && huge_aligned && huge_cut < e.capacity)
            cap = huge_cut;
        if (cap < e.capacity)
            pool_keep_piece((pool_entry_t){e.addr + cap, e.capacity - cap, e.freed_ms, e.origin},
                            events);
        dirty = cap;
    } else if (e.capacity < cap) {
        if (_ta_os_remap_aligned(p, e.capacity, cap, align, &p) != 0) {
            release_mapping(e.addr, e.capacity, true, events);
            return NULL;
        }
        name_and_advise(p, cap, cap - e.capacity);
        entry->origin = 0;
    }
    if (zero)
        memset(p, 0, dirty);
    *capp = cap;
    return p;
}

/* The pool entry freed longest ago. */
static size_t pool_oldest(void)
{
    size_t oldest = 0;
    for (size_t i = 1; i < pool_count; i++)
        if (pool[i].freed_ms < pool[oldest].freed_ms)
            oldest = i;
    return oldest;
}

void *_ta_large_alloc(size_t size, size_t alignment, bool zero, bool near_limit_ok,
                      unsigned *events)
{
    size_t page = _ta_os_page_size();
    if (size > SIZE_MAX - TA_HUGE_PAGE) {
        errno = ENOMEM;
        return NULL;
    }
    size_t cap = _ta_align_up(size ? size : 1, page);
    size_t align = natural_alignment(cap);
    if (alignment > align)
        align = alignment;

    void *p = NULL;
    pool_entry_t e = {0};
    _ta_lock(&large_lock);
    bool from_pool = pool_take(cap, align, &e);
    _ta_unlock(&large_lock);
    if (from_pool)
        p = pool_fit(&e, &cap, align, zero, events);

    if (p == NULL) {
        if (!near_limit_ok && _ta_large_near_map_limit()) {
            *events |= TA_LARGE_AT_LIMIT; /* the front door decides (lib/alloc.c) */
            return NULL;
        }
        int rc = _ta_os_map(cap, align, &p);
        if (rc != 0) {
            errno = ENOMEM;
            return NULL;
        }
        atomic_fetch_add_explicit(&_ta_live_mappings, 1, memory_order_relaxed);
        name_and_advise(p, cap, cap);
        from_pool = false;
        e.origin = 0;
    }

    if (table_reserve() != 0) { /* on success the lock is held */
        release_mapping((uintptr_t)p, cap, true, events);
        errno = ENOMEM;
        return NULL;
    }
    uint64_t origin = e.origin != 0 ? e.origin : new_origin_locked();
    table_put(table, table_slots, (region_t){(uintptr_t)p, cap, size, false, origin});
    table_used++;
    large_stats.live_bytes += size;
    if (large_stats.live_bytes > large_stats.peak_bytes)
        large_stats.peak_bytes = large_stats.live_bytes;
    large_stats.live_count++;
    mapped_add_locked((int64_t)cap);
    large_stats.alloc_count++;
    if (from_pool)
        large_stats.pool_hits++;
    else
        large_stats.pool_misses++;
    _ta_unlock(&large_lock);
    return p;
}

bool _ta_large_lookup(const void *p, size_t *usable)
{
    _ta_lock(&large_lock);
    region_t *r = table_find((uintptr_t)p);
    if (r)
        *usable = r->capacity;
    _ta_unlock(&large_lock);
    return r != NULL;
}

bool _ta_large_free(void *p, unsigned *events)
{
    unmap_t victims[EVICT_BATCH + 2];
    size_t n = 0;
    int joined = 0;
    uint64_t now = _ta_os_now_ms();
    uint64_t max_age = (uint64_t)_ta_opt(TA_OPT_RETAIN_MS);

    _ta_lock(&large_lock);
    region_t *r = find_unpinned_locked((uintptr_t)p);
    if (r == NULL) {
        _ta_unlock(&large_lock);
        return false;
    }
    region_t gone = *r;
    table_remove(r);
    large_stats.live_bytes -= gone.size;
    large_stats.live_count--;
    mapped_add_locked(-(int64_t)gone.capacity);
    size_t max_bytes = pool_limit_locked();
    if (gone.capacity <= max_bytes && max_age > 0) {
        /* Make room: first what is over its age, then the oldest, so that
         * the newest mapping (the likeliest to be wanted) stays. */
        n = pool_evict(now, max_bytes, max_age, victims, EVICT_BATCH);
        if (pool_count == POOL_MAX_ENTRIES) {
            size_t o = pool_oldest();
            victims[n++] = (unmap_t){pool[o].addr, pool[o].capacity};
            pool_remove_at(o);
        }
        if (pool_count == 0)
            *events |= TA_LARGE_WAKE; /* the pool has a deadline to keep */
        joined = pool_insert_locked((pool_entry_t){gone.addr, gone.capacity, now, gone.origin});
        while (pool_bytes > max_bytes && n < EVICT_BATCH + 1) {
            size_t o = pool_oldest();
            victims[n++] = (unmap_t){pool[o].addr, pool[o].capacity};
            pool_remove_at(o);
        }
    } else {
        victims[n++] = (unmap_t){gone.addr, gone.capacity};
    }
    _ta_unlock(&large_lock);
    if (joined)
        atomic_fetch_sub_explicit(&_ta_live_mappings, joined, memory_order_relaxed);
    unmap_all(victims, n, events);
    if (TA_UNLIKELY(__atomic_load_n(&parked_count, __ATOMIC_RELAXED) != 0))
        parked_retry(false); /* without a purge thread, frees keep the retries going */
    return true;
}

bool _ta_large_expire(void)
{
    unmap_t victims[EVICT_BATCH];
    size_t n;
    bool left;
    unsigned events = 0;
    do {
        _ta_lock(&large_lock);
        n = pool_evict(_ta_os_now_ms(), pool_limit_locked(), (uint64_t)_ta_opt(TA_OPT_RETAIN_MS),
                       victims, EVICT_BATCH);
        left = pool_count > 0;
        _ta_unlock(&large_lock);
        unmap_all(victims, n, &events); /* the caller is the purge thread */
    } while (n == EVICT_BATCH);
    parked_retry(false);
    _ta_lock(&large_lock);
    left |= parked_timed_left_locked();
    _ta_unlock(&large_lock);
    return left;
}

void *_ta_large_realloc(void *p, size_t size)
{
    size_t page = _ta_os_page_size();
    if (size > SIZE_MAX - TA_HUGE_PAGE) {
        errno = ENOMEM;
        return NULL;
    }
    size_t cap = _ta_align_up(size, page);
    _ta_lock(&large_lock);
    region_t *r = find_unpinned_locked((uintptr_t)p);
    if (r == NULL) {
        _ta_unlock(&large_lock);
        return NULL;
    }
    region_t old = *r;
    if (cap == old.capacity) { /* same pages: only the accounting changes */
        large_stats.live_bytes += size - old.size;
        if (large_stats.live_bytes > large_stats.peak_bytes)
            large_stats.peak_bytes = large_stats.live_bytes;
        r->size = size;
        _ta_unlock(&large_lock);
        return p;
    }
    /* Take the entry out while the kernel moves the pages; nobody else may
     * legally touch this block meanwhile. */
    table_remove(r);
    _ta_unlock(&large_lock);

    void *q = NULL;
    int rc = _ta_os_remap_aligned(p, old.capacity, cap, natural_alignment(cap), &q);
    if (rc == 0 && cap > old.capacity)
        name_and_advise(q, cap, cap - old.capacity);

    _ta_lock(&large_lock);
    if (rc != 0) { /* failed: put the old block back as it was */
        table_put(table, table_slots, old);
        table_used++;
        _ta_unlock(&large_lock);
        errno = ENOMEM;
        return NULL;
    }
    table_put(table, table_slots, (region_t){(uintptr_t)q, cap, size, false, new_origin_locked()});
    table_used++;
    large_stats.live_bytes += size - old.size;
    if (large_stats.live_bytes > large_stats.peak_bytes)
        large_stats.peak_bytes = large_stats.live_bytes;
    mapped_add_locked((int64_t)cap - (int64_t)old.capacity);
    _ta_unlock(&large_lock);
    return q;
}

/* Each pass takes what is in the pool when it starts: a failed unmap parks
 * its range instead of putting it back, so this always ends. */
unsigned _ta_large_trim(bool parked)
{
    unmap_t victims[EVICT_BATCH];
    size_t n;
    unsigned events = 0;
    parked_retry(parked);
    do {
        _ta_lock(&large_lock);
        n = pool_evict(_ta_os_now_ms(), 0, 0, victims, EVICT_BATCH);
        _ta_unlock(&large_lock);
        unmap_all(victims, n, &events);
    } while (n == EVICT_BATCH);
    return events;
}

/* A request the slabs served because fresh mappings would take the
 * process to the map-count guard (lib/alloc.c decides; counted here with
 * the large path's other statistics). */
void _ta_large_count_fallback(void)
{
    _ta_lock(&large_lock);
    large_stats.fallbacks++;
    _ta_unlock(&large_lock);
}

void _ta_large_stats(ta_stats_t *st)
{
    _ta_lock(&large_lock);
    st->large_live_bytes = large_stats.live_bytes;
    st->large_peak_bytes = large_stats.peak_bytes;
    st->large_live_count = large_stats.live_count;
    st->large_mapped_bytes = large_stats.mapped_bytes;
    st->large_alloc_count = large_stats.alloc_count;
    st->pool_bytes = pool_bytes;
    st->pool_entries = pool_count;
    st->pool_hits = large_stats.pool_hits;
    st->pool_misses = large_stats.pool_misses;
    st->pool_expired = large_stats.pool_expired;
    st->maxmap_fallbacks = large_stats.fallbacks;
    st->parked_count = parked_count;
    st->parked_bytes = parked_bytes;
    _ta_unlock(&large_lock);
    st->map_limit = (uint64_t)map_limit();
}

/* ---- fork: hold the lock across fork so the child's table is whole ------- */

void _ta_large_fork_prepare(void)
{
    _ta_lock(&large_lock);
}

void _ta_large_fork_parent(void)
{
    _ta_unlock(&large_lock);
}

void _ta_large_fork_child(void)
{
    _ta_unlock(&large_lock);
}
