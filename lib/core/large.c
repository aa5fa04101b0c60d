/* SPDX-License-Identifier: MIT */
/*
 * The large path: every block at or above the threshold is a mapping of
 * its own, or a piece of a pooled one or of a run (blocks under 2 MiB),
 * starts at its first byte and owns its pages. Metadata lives out of band in a hash table keyed by
 * address. Freed blocks go back to the kernel or, within the pool's byte and age bounds, wait for
 * the next large request, which takes the best fit and grows it with mremap or cuts it, keeping the
 * cut end in the pool. Pool pieces of one mapping join up again when both are free. No two blocks
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
#include "large.h"
#include "pool.h"
#include "thp.h"

#include <errno.h>
#include <string.h>

/* ---- the region table ---------------------------------------------------- */

typedef struct {
    uintptr_t addr;  /* 0 = empty slot */
    size_t capacity; /* mapped bytes */
    size_t size;     /* requested bytes, for statistics */
    bool pinned;     /* registered with the CUDA runtime (cuda.c) */
    bool packed;     /* a piece of a pack (origin: the pack's number) */
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

/* ---- the retain pool (pool.c) and the mapping count ------------------------- */

static ta_pool_t pool;
static ta_pool_t pack_free; /* the free space inside packs (see "packs") */

/* What the pool may hold now: RETAIN_BYTES, and no more than keeps the
 * large path's footprint (live mappings plus pool) within 1/32
 * above the most its live blocks ever mapped. A process that drops a
 * model keeps all of it for the next one (live falls to zero); one whose
 * large blocks come and go a few at a time (Python's strings and lists)
 * keeps about one working set, not RETAIN_MS worth of every size it freed
 * (python-json's peak RSS was 1.6x mimalloc's). The bound was a quarter
 * above the peak while fresh memory got no huge pages (THP=auto: large-
 * churn ran at 0.6x without it); with THP on, the quarter only raised the
 * peak (model-vit 1.07x its peak live, issue 25) and bought no speed. */
#define POOL_SLACK(peak) ((peak) / 32)

static size_t pool_limit_locked(void)
{
    size_t max = (size_t)_ta_opt(TA_OPT_RETAIN_BYTES);
    uint64_t room =
        large_stats.mapped_peak + POOL_SLACK(large_stats.mapped_peak) - large_stats.mapped_bytes;
    return room < max ? (size_t)room : max;
}

/* Each mapping made by map or moved by mremap gets a new origin; the
 * blocks and pool ranges cut from it keep it. Nothing is done to part of
 * a range, so a range of one origin lies in one VMA, which mremap can move
 * or grow. That holds only while the program leaves its blocks whole: one
 * it mprotected, madvised or mlocked in part lies in several VMAs, and a
 * move of it fails (before 6.17, after unmapping the destination: the OS
 * layer maps the hole again or reports it lost, see _ta_os_move). Pool
 * ranges join only equal nonzero origins (pool.c); a pinned block gets
 * origin 0 (the driver may split its VMA), unless it is a pack's piece. */
static uint64_t last_origin;

static uint64_t new_origin_locked(void)
{
    return ++last_origin;
}

/* A range to unmap once the lock is released. */
typedef struct {
    uintptr_t addr;
    size_t size;
} unmap_t;

#define EVICT_BATCH 32 /* victims collected per pass, on the stack */

/* Retention by activity: while large requests keep coming (a model is
 * loading, or the process switches between models) nothing in the pool
 * ages, so an evicted model's pages wait for the next load however long
 * it takes; once requests stop for RETAIN_MS, what has waited as long
 * goes back. The byte and footprint bounds hold throughout. */
static _Atomic uint64_t last_request_ms;

/* Ranges freed at or before this are due at now: 0 (none) while requests
 * came within max_age. */
static uint64_t before_ms(uint64_t now, uint64_t max_age)
{
    uint64_t last = atomic_load_explicit(&last_request_ms, memory_order_relaxed);
    if (last > now || now - last < max_age)
        return 0;
    return now >= max_age ? now - max_age : 0;
}

/* Moves up to EVICT_BATCH of the oldest ranges that were freed at or
 * before before_ms, or are beyond max_bytes, into out[]; returns how many. */
static size_t pool_evict_locked(uint64_t before_ms, size_t max_bytes, unmap_t *out)
{
    size_t n = 0;
    ta_range_t r;
    while (n < EVICT_BATCH && _ta_pool_expire_one(&pool, before_ms, max_bytes, &r)) {
        out[n++] = (unmap_t){r.addr, r.size};
        if (r.freed_ms <= before_ms)
            large_stats.pool_expired++;
    }
    return n;
}

/* Makes room for one more block in the table and two more ranges in the
 * pool; called without the lock held, returns 0 with it held. New storage
 * is mapped outside the lock and swapped in under it. */
static int reserve_locked(void)
{
    size_t page = _ta_os_page_size();
    for (;;) {
        _ta_lock(&large_lock);
        if (pool.page == 0) {
            _ta_pool_init(&pool, page, TA_HUGE_PAGE);
            _ta_pool_init(&pack_free, page, TA_HUGE_PAGE);
        }
        size_t slots = table_slots;
        bool table_full = (table_used + 1) * 10 > slots * 7; /* load factor 0.7 */
        ta_pool_t *grow = !_ta_pool_has_room(&pool, 2)        ? &pool
                          : !_ta_pool_has_room(&pack_free, 2) ? &pack_free
                                                              : NULL;
        if (!table_full && grow == NULL)
            return 0;
        uint32_t pool_capacity = grow ? grow->capacity : 0;
        size_t bytes = table_full ? (slots ? slots * 2 : TABLE_MIN_SLOTS) * sizeof(region_t)
                                  : _ta_pool_storage_bytes(grow);
        bytes = _ta_align_up(bytes, page);
        _ta_unlock(&large_lock);

        void *mem;
        int rc = _ta_os_map(bytes, page, &mem);
        if (rc != 0)
            return rc;
        void *old = NULL;
        size_t old_bytes = 0;
        _ta_lock(&large_lock);
        if (table_full && table_slots == slots) {
            size_t new_slots = slots ? slots * 2 : TABLE_MIN_SLOTS;
            for (size_t i = 0; i < table_slots; i++)
                if (table[i].addr)
                    table_put(mem, new_slots, table[i]);
            old = table;
            old_bytes = _ta_align_up(table_slots * sizeof(region_t), page);
            table = mem;
            table_slots = new_slots;
            mem = NULL;
        } else if (!table_full && grow->capacity == pool_capacity) {
            old = _ta_pool_grow(grow, mem, bytes, &old_bytes);
            old_bytes = _ta_align_up(old_bytes, page);
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
         * with its neighbours again. A piece of a pack keeps its pack's
         * number: it goes back to that pack (packs never move or grow). */
        if (!r->packed)
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
        if (_ta_os_unmap(q, size) != 0)
            park_range((uintptr_t)q, size, tries);
    }
}

/* Gives a range back to the kernel. A failed munmap parks the range and
 * adds TA_LARGE_WAKE to *events (its timed retries need the purge thread).
 * Called without the lock held. */
static void release_mapping(uintptr_t addr, size_t size, unsigned *events)
{
    if (_ta_os_unmap((void *)addr, size) == 0)
        return;
    park_range(addr, size, 0);
    _ta_log(false, "tensoralloc: munmap(%p, %zu) failed; parked, will retry\n", (void *)addr, size);
    *events |= TA_LARGE_WAKE; /* the timed retries */
}

static void unmap_all(const unmap_t *list, size_t n, unsigned *events)
{
    for (size_t i = 0; i < n; i++)
        release_mapping(list[i].addr, list[i].size, events);
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

/* The count is the kernel's: the lines of /proc/self/maps at the last look
 * plus what the calls made since can have added (the OS layer's bound).
 * Adjacent anonymous mappings merge, so counting blocks overcounts by far
 * (42,665 blocks and pool entries counted while the kernel had 38 VMAs).
 * Reading the maps costs O(VMAs), so it is done only when the bound says
 * the limit is near, and at most every RECOUNT_MS. */
#define RECOUNT_MS 100

static _Atomic long vmas_counted, growth_at_count;
static _Atomic uint64_t vmas_counted_ms;

/* The kernel's count at the last look plus what can have been added since. */
static long vmas_bound(void)
{
    return atomic_load_explicit(&vmas_counted, memory_order_relaxed) + _ta_os_vma_growth() -
           atomic_load_explicit(&growth_at_count, memory_order_relaxed);
}

bool _ta_large_near_map_limit(void)
{
    long limit = map_limit();
    if (vmas_bound() + 1 < limit)
        return false;
    uint64_t now = _ta_os_now_ms() + 1; /* 0 means never counted */
    uint64_t last = atomic_load_explicit(&vmas_counted_ms, memory_order_relaxed);
    long growth = _ta_os_vma_growth(), n; /* calls made while reading count twice */
    if ((last == 0 || now - last >= RECOUNT_MS) &&
        atomic_compare_exchange_strong(&vmas_counted_ms, &last, now) && _ta_os_vma_count(&n) == 0) {
        atomic_store_explicit(&growth_at_count, growth, memory_order_relaxed);
        atomic_store_explicit(&vmas_counted, n, memory_order_relaxed);
    }
    return vmas_bound() + 1 >= limit;
}

/* ---- packs -------------------------------------------------------------------
 * At the limit a block cannot have a mapping of its own. It is cut from a
 * pack instead: a mapping of PACK_BYTES or more (one VMA) whose free space
 * is a pool of its own (pack_free; a range's origin is its pack's number,
 * so only ranges of one pack join). A freed piece gives its pages back with
 * MADV_DONTNEED, which changes no VMA, and reads zero from then on; a pack
 * whose pieces are all free is unmapped whole. Every alignment is met by
 * the pool's cut. mremap never touches a piece (it would split the pack):
 * realloc copies. Guarded by large_lock. */

#define PACK_BYTES ((size_t)256 << 20)
#define PACKS_MAX 4096 /* 1 TiB of packs at the least */

static struct {
    uintptr_t base;
    size_t size, used; /* used: bytes of live pieces */
} packs[PACKS_MAX];

/* ---- allocation ------------------------------------------------------------------ */

static size_t natural_alignment(size_t cap)
{
    return cap >= TA_HUGE_PAGE ? TA_HUGE_PAGE : _ta_os_page_size();
}

/* The mapped bytes and the alignment of a block of size bytes; false with
 * ENOMEM for a size no mapping can have (room left for huge-page slack). */
static bool block_shape(size_t size, size_t alignment, size_t *cap, size_t *align)
{
    /* No object exceeds PTRDIFF_MAX (glibc's rule), and the pool's size
     * bins are not made for sizes past it: every entry point is covered
     * here, _ta_alloc_mapped (CUDA staging) included. */
    if (size > PTRDIFF_MAX || alignment > ((size_t)1 << 40)) {
        errno = ENOMEM;
        return false;
    }
    *cap = _ta_align_up(size ? size : 1, _ta_os_page_size());
    *align = natural_alignment(*cap);
    if (alignment > *align)
        *align = alignment;
    return true;
}

/* Under huge pages, the fresh part of a block still gets 4 KiB pages in
 * the 2 MiB region where its end falls (the region passes the mapping's
 * end) and, in a grown block, in the region where the old pages end (it
 * has 4 KiB pages already): up to 511 faults each, which cost 7-8 us apiece
 * on this project's VM, where one MADV_POPULATE_WRITE fills the region's
 * pages in a loop of the kernel's. Those regions are populated now, since
 * the block was advised as one its program writes whole: large-window
 * (20 blocks of 5-25 MiB) took 88 K faults a run, 400 of them huge pages
 * (docs/benchmarks.md "large-window against tcmalloc, counted in pages"). */
static void populate_edges(uintptr_t p, size_t cap, size_t fresh_bytes)
{
    uintptr_t end = p + cap, fresh = end - fresh_bytes;
    uintptr_t head_end = _ta_align_up(fresh, TA_HUGE_PAGE);
    if (head_end > end)
        head_end = end;
    if (fresh < head_end && (fresh & (TA_HUGE_PAGE - 1)) != 0)
        _ta_os_populate_write((void *)fresh, head_end - fresh);
    uintptr_t tail = end & ~(TA_HUGE_PAGE - 1);
    if (tail < head_end)
        tail = head_end;
    if (tail < end)
        _ta_os_populate_write((void *)tail, end - tail);
}

/* Always the whole mapping: advising part of it would split the VMA, and
 * mremap refuses (EFAULT) to move or grow a range spanning two VMAs. */
static void name_and_advise(void *p, size_t cap, size_t fresh_bytes, unsigned how)
{
    if (_ta_thp_advise(p, cap, fresh_bytes, how & TA_LARGE_FILLED)) {
        _ta_os_advise_hugepage(p, cap);
        populate_edges((uintptr_t)p, cap, fresh_bytes);
    }
    _ta_os_name(p, cap, "tensoralloc");
}

/* Enters a new live block (lock held, room reserved). */
static void block_enter_locked(uintptr_t p, size_t cap, size_t size, uint64_t origin, bool pooled)
{
    table_put(table, table_slots,
              (region_t){.addr = p, .capacity = cap, .size = size, .origin = origin});
    table_used++;
    large_stats.live_bytes += size;
    if (large_stats.live_bytes > large_stats.peak_bytes)
        large_stats.peak_bytes = large_stats.live_bytes;
    large_stats.live_count++;
    mapped_add_locked((int64_t)cap);
    large_stats.alloc_count++;
    if (pooled)
        large_stats.pool_hits++;
    else
        large_stats.pool_misses++;
}

#define MAX_PIECES 16 /* ranges moved into one block (each a syscall and a VMA) */

/* A block put together from pooled ranges: a fresh mapping of cap bytes
 * (untouched, so it costs nothing) into which each piece is moved with
 * mremap (page tables move; nothing is copied, zeroed or faulted). So a
 * load reuses an evicted model's pages whatever the shapes of its tensors;
 * only what the pieces do not cover faults. The block lies in several VMAs:
 * origin 0, never grown or joined. pieces[0] is taken already; called with
 * the lock held, returns with it released. */
static void *assemble_unlock(size_t size, size_t cap, size_t align, unsigned how, ta_range_t first,
                             unsigned *events)
{
    ta_range_t pieces[MAX_PIECES];
    size_t offset[MAX_PIECES]; /* where each goes: on huge-page boundaries, so
                                  that the kernel moves huge pages whole */
    size_t n = 1, moved = first.size, next = _ta_align_up(first.size, TA_HUGE_PAGE);
    pieces[0] = first;
    offset[0] = 0;
    /* A range of half the block or more is grown instead: growth in place
     * keeps one VMA and its huge-page advice. */
    while (first.size < cap / 2 && n < MAX_PIECES && next < cap && cap - next >= TA_HUGE_PAGE &&
           _ta_pool_take_piece(&pool, cap - next, TA_HUGE_PAGE, &pieces[n])) {
        offset[n] = next;
        moved += pieces[n].size;
        next = _ta_align_up(next + pieces[n++].size, TA_HUGE_PAGE);
    }
    /* Pieces that cover less than half the block are not worth its VMAs:
     * an assembled block can never be grown or be a piece again, and
     * assembling such blocks made large-churn (1-64 MiB) 15% slower. The
     * nodes the takes freed make room for the puts. */
    if (n > 1 && moved < cap / 2) {
        while (n > 1)
            _ta_pool_put(&pool, pieces[--n]);
        moved = first.size;
    }
    _ta_unlock(&large_lock);

    void *p;
    if (n == 1) { /* one piece: grow it, in place where the kernel can */
        if (_ta_os_remap_aligned((void *)first.addr, first.size, cap, align, &p) != 0) {
            release_mapping(first.addr, first.size, events);
            return NULL;
        }
    } else if (_ta_os_map(cap, align, &p) != 0) {
        for (size_t i = 0; i < n; i++)
            release_mapping(pieces[i].addr, pieces[i].size, events);
        return NULL;
    }
    for (size_t i = 0; i < n && n > 1; i++) {
        void *to = (char *)p + offset[i];
        int rc = _ta_os_move((void *)pieces[i].addr, pieces[i].size, to);
        if (rc == TA_OS_DEST_LOST) { /* another mapping sits in the block: give it up */
            for (size_t j = i; j < n; j++)
                release_mapping(pieces[j].addr, pieces[j].size, events);
            size_t after = offset[i] + pieces[i].size;
            if (offset[i] > 0)
                release_mapping((uintptr_t)p, offset[i], events);
            if (after < cap)
                release_mapping((uintptr_t)p + after, cap - after, events);
            return NULL;
        }
        if (rc != 0)
            release_mapping(pieces[i].addr, pieces[i].size, events); /* that part stays fresh */
    }
    /* advised as a grown block is: growth inherits its VMA's advice */
    name_and_advise(p, cap, n == 1 ? cap - moved : 0, how);
    for (size_t i = 0; i < n && (how & TA_LARGE_ZERO); i++) /* the rest is fresh: zero already */
        memset((char *)p + offset[i], 0, pieces[i].size);
    if (reserve_locked() != 0) {
        release_mapping((uintptr_t)p, cap, events);
        return NULL;
    }
    block_enter_locked((uintptr_t)p, cap, size, n == 1 ? new_origin_locked() : 0, true);
    _ta_unlock(&large_lock);
    return p;
}

/* A block from the pool, or NULL. The pool cuts a fitting range (what is
 * left stays pooled with its pages, so the next load reuses them instead
 * of faulting fresh ones: unmapping the tails made model-switch fault 26%
 * more pages than tcmalloc); if none fits, the block is put together from
 * the largest smaller ranges. Called with the lock held and room reserved;
 * returns with it released. */
static void *pool_alloc_unlock(size_t size, size_t cap, size_t align, unsigned how, bool fit_only,
                               unsigned *events)
{
    ta_range_t r;
    ta_pool_take_t t = _ta_pool_take(&pool, cap, align, &r);
    if (t == TA_POOL_SHORT && fit_only) { /* at the map limit: no new VMAs */
        _ta_pool_put(&pool, r);
        t = TA_POOL_EMPTY;
    }
    if (t == TA_POOL_FIT) {
        block_enter_locked(r.addr, r.size, size, r.origin, true);
        _ta_unlock(&large_lock);
        if (how & TA_LARGE_ZERO)
            memset((void *)r.addr, 0, r.size);
        return (void *)r.addr;
    }
    if (t == TA_POOL_SHORT || (!fit_only && _ta_pool_take_piece(&pool, cap, 0, &r)))
        return assemble_unlock(size, cap, align, how, r, events);
    _ta_unlock(&large_lock);
    return NULL;
}

/* Evicts until the pool is within its bounds (age and bytes); returns
 * whether anything is left in the pool. */
static bool evict_all_due(uint64_t max_age, bool all, unsigned *events)
{
    unmap_t victims[EVICT_BATCH];
    size_t n;
    bool left;
    do {
        _ta_lock(&large_lock);
        uint64_t now = _ta_os_now_ms();
        n = pool_evict_locked(all ? UINT64_MAX : before_ms(now, max_age),
                              all ? 0 : pool_limit_locked(), victims);
        left = pool.count > 0;
        _ta_unlock(&large_lock);
        unmap_all(victims, n, events);
    } while (n == EVICT_BATCH);
    return left;
}

/* Runs: blocks under a huge page (MoE experts of 0.3-1 MiB,
 * too small for a huge page of their own) share a mapping of RUN_BYTES,
 * which can be huge pages, instead of a mapping each: one mmap for many
 * blocks, and 2 MiB faults. Each block still owns its pages; pool pieces
 * of a run join again when its blocks are freed, and the run goes back
 * whole. A run is made only where the pool's bound has room for its rest
 * (so not while a process's large blocks have peaked under 256 MiB). */
#define RUN_BYTES ((size_t)8 << 20)

/* The share of requests under a huge page among the last ~256 large ones,
 * in 1/SHARE_ONE: where it is 1/3 or more (a diffusion UNet's 0.7, the
 * mix's 0.55), a big block cut from the pool leaves the rest of its last
 * huge page pooled for them (pool.h). Where small blocks are rarer, the
 * rests they do not take are unmapped in time, splitting huge pages:
 * large-churn (1 in 6 under 2 MiB) ran at half speed sharing from 1/8 on,
 * and a window of 16 flickered on ViT's bursts (peak RSS up 2%). */
#define SHARE_ONE 65536u
#define SHARE_WINDOW_SHIFT 8
static unsigned sub_huge_share;

void *_ta_large_alloc(size_t size, size_t alignment, unsigned how, unsigned *events)
{
    size_t cap, align;
    if (!block_shape(size, alignment, &cap, &align))
        return NULL;

    /* The first request after an idle gap: what came due during it goes
     * first (the purge thread may not exist, at the mapping limit). */
    uint64_t max_age = (uint64_t)_ta_opt(TA_OPT_RETAIN_MS), now = _ta_os_now_ms();
    if (now - atomic_load_explicit(&last_request_ms, memory_order_relaxed) >= max_age)
        evict_all_due(max_age, false, events);
    atomic_store_explicit(&last_request_ms, now, memory_order_relaxed);
    bool at_limit =
        !(how & TA_LARGE_NEAR_LIMIT_OK) && _ta_large_near_map_limit(); /* may read the maps */
    bool filled_huge = (how & TA_LARGE_FILLED) && _ta_thp_enabled();   /* its runs are advised */
    if (reserve_locked() != 0) {
        errno = ENOMEM;
        return NULL;
    }
    /* A block under a huge page that no pooled range fits is cut from a
     * run: RUN_BYTES mapped at once, the rest pooled for the next ones
     * (not a grown smaller range: growing moves it out of its run).
     * A filled block's run is advised huge pages at once, so it may be
     * made while the pool is within its bounds, not only where they have
     * room for the whole run: a first load comes before the peak that
     * makes room. The pool then exceeds the footprint bound by at most one
     * run's rest (what the next tensors do not take; resident only in the
     * huge page a block touched), and no other run is made until it is
     * back within. */
    size_t limit = pool_limit_locked();
    bool run = cap < TA_HUGE_PAGE && align <= TA_HUGE_PAGE && max_age > 0 &&
               (filled_huge ? pool.bytes <= limit && pool.bytes + RUN_BYTES - cap <=
                                                         (size_t)_ta_opt(TA_OPT_RETAIN_BYTES)
                            : pool.bytes + RUN_BYTES <= limit); /* the block's own cap too */
    sub_huge_share -= sub_huge_share >> SHARE_WINDOW_SHIFT;
    sub_huge_share += cap < TA_HUGE_PAGE ? SHARE_ONE >> SHARE_WINDOW_SHIFT : 0;
    pool.share_tails = sub_huge_share >= SHARE_ONE / 3;
    void *p = pool_alloc_unlock(size, cap, align, how, at_limit || run, events);
    if (p != NULL)
        return p;
    if (at_limit) {
        *events |= TA_LARGE_AT_LIMIT; /* the front door decides (lib/core/alloc.c) */
        return NULL;
    }
    size_t bytes = run ? RUN_BYTES : cap;
    if (run && _ta_os_map(bytes, TA_HUGE_PAGE, &p) != 0)
        run = false, bytes = cap; /* little address space left (RLIMIT_AS): the block alone */
    if (!run && _ta_os_map(bytes, align, &p) != 0) {
        errno = ENOMEM;
        return NULL;
    }
    /* A run may be a probe like any fresh mapping: its blocks are handed
     * out from its start, and the regions no block has touched yet do not
     * count (thp.c). */
    name_and_advise(p, bytes, bytes, how);
    if (reserve_locked() != 0) {
        release_mapping((uintptr_t)p, bytes, events);
        errno = ENOMEM;
        return NULL;
    }
    uint64_t origin = new_origin_locked();
    block_enter_locked((uintptr_t)p, cap, size, origin, false);
    if (run) {
        if (pool.count == 0)
            *events |= TA_LARGE_WAKE; /* the pool has a deadline to keep */
        _ta_pool_put(&pool, (ta_range_t){(uintptr_t)p + cap, bytes - cap, origin, now});
    }
    _ta_unlock(&large_lock);
    return p;
}

/* A new pack of at least `need` bytes into pack_free; false if none can be
 * had. Called without the lock. */
static bool pack_new(size_t need)
{
    size_t bytes = need > PACK_BYTES ? _ta_align_up(need, TA_HUGE_PAGE) : PACK_BYTES;
    void *p;
    if (_ta_os_map(bytes, TA_HUGE_PAGE, &p) != 0)
        return false;
    /* never huge pages: a block's first byte would fault in 2 MiB of its
     * neighbours' (100,000 blocks touched at both ends: 23 GiB resident) */
    _ta_os_name(p, bytes, "tensoralloc-pack");
    if (reserve_locked() != 0) {
        _ta_os_unmap(p, bytes);
        return false;
    }
    size_t i = 0;
    while (i < PACKS_MAX && packs[i].base != 0)
        i++;
    if (i < PACKS_MAX) {
        packs[i].base = (uintptr_t)p;
        packs[i].size = bytes;
        packs[i].used = 0;
        _ta_pool_put(&pack_free, (ta_range_t){(uintptr_t)p, bytes, i + 1, 0});
    }
    _ta_unlock(&large_lock);
    if (i == PACKS_MAX)
        _ta_os_unmap(p, bytes);
    return i < PACKS_MAX;
}

void *_ta_large_alloc_packed(size_t size, size_t alignment)
{
    size_t cap, align;
    if (!block_shape(size, alignment, &cap, &align))
        return NULL;
    for (bool fresh = false;; fresh = true) {
        if (reserve_locked() != 0)
            break;
        ta_range_t r;
        ta_pool_take_t t = _ta_pool_take(&pack_free, cap, align, &r);
        if (t == TA_POOL_FIT) {
            packs[r.origin - 1].used += r.size;
            block_enter_locked(r.addr, r.size, size, r.origin, false);
            table_find(r.addr)->packed = true;
            large_stats.fallbacks++;
            _ta_unlock(&large_lock);
            return (void *)r.addr; /* fresh or given back: reads zero */
        }
        if (t == TA_POOL_SHORT)
            _ta_pool_put(&pack_free, r); /* packs are never grown */
        _ta_unlock(&large_lock);
        if (fresh || !pack_new(cap + (align > TA_HUGE_PAGE ? align : 0)))
            break;
    }
    errno = ENOMEM;
    return NULL;
}

/* Frees a piece of a pack (lock held, the block out of the table already);
 * returns with the lock released. */
static void pack_free_unlock(region_t gone)
{
    size_t i = gone.origin - 1;
    _ta_unlock(&large_lock);
    if (_ta_os_advise_dontneed((void *)gone.addr, gone.capacity) != 0)
        memset((void *)gone.addr, 0, gone.capacity); /* free pack space reads zero */
    bool room = reserve_locked() == 0;
    if (!room) /* the range stays out of the pack's pool: its pages went back */
        _ta_lock(&large_lock);
    packs[i].used -= gone.capacity;
    if (room)
        _ta_pool_put(&pack_free, (ta_range_t){gone.addr, gone.capacity, gone.origin, 0});
    ta_range_t whole = {0};
    if (packs[i].used == 0 && _ta_pool_take_at(&pack_free, packs[i].base, &whole)) {
        if (whole.size == packs[i].size) {
            packs[i].base = 0; /* every piece free: the pack goes */
        } else {
            _ta_pool_put(&pack_free, whole); /* a range is missing (no room once) */
            whole.size = 0;
        }
    }
    _ta_unlock(&large_lock);
    if (whole.size != 0)
        _ta_os_unmap((void *)whole.addr, whole.size);
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
    unmap_t victims[EVICT_BATCH + 1];
    size_t n = 0;
    uint64_t now = _ta_os_now_ms();
    uint64_t max_age = (uint64_t)_ta_opt(TA_OPT_RETAIN_MS);

    if (reserve_locked() != 0) { /* no room to pool it: unmap it */
        max_age = 0;
        _ta_lock(&large_lock);
    }
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
    if (gone.packed) {
        pack_free_unlock(gone);
        return true;
    }
    size_t max_bytes = pool_limit_locked();
    if (gone.capacity <= max_bytes && max_age > 0) {
        if (pool.count == 0)
            *events |= TA_LARGE_WAKE; /* the pool has a deadline to keep */
        _ta_pool_put(&pool, (ta_range_t){gone.addr, gone.capacity, gone.origin, now});
        /* Make room: the oldest first, so that the newest mapping (the
         * likeliest to be wanted) stays. */
        n = pool_evict_locked(before_ms(now, max_age), max_bytes, victims);
    } else {
        victims[n++] = (unmap_t){gone.addr, gone.capacity};
    }
    _ta_unlock(&large_lock);
    _ta_thp_freeing(gone.addr);
    unmap_all(victims, n, events);
    if (n == EVICT_BATCH)
        evict_all_due(max_age, false, events);
    if (TA_UNLIKELY(__atomic_load_n(&parked_count, __ATOMIC_RELAXED) != 0))
        parked_retry(false); /* without a purge thread, frees keep the retries going */
    return true;
}

bool _ta_large_expire(void)
{
    unsigned events = 0; /* the caller is the purge thread */
    bool left = evict_all_due((uint64_t)_ta_opt(TA_OPT_RETAIN_MS), false, &events);
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
    if (old.packed && cap != old.capacity) { /* mremap would split the pack */
        _ta_unlock(&large_lock);
        return NULL;
    }
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
        name_and_advise(q, cap, cap - old.capacity, 0);

    _ta_lock(&large_lock);
    if (rc != 0) { /* failed: put the old block back as it was */
        table_put(table, table_slots, old);
        table_used++;
        _ta_unlock(&large_lock);
        errno = ENOMEM;
        return NULL;
    }
    table_put(
        table, table_slots,
        (region_t){
            .addr = (uintptr_t)q, .capacity = cap, .size = size, .origin = new_origin_locked()});
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
    unsigned events = 0;
    parked_retry(parked);
    evict_all_due(0, true, &events);
    return events;
}

void _ta_large_stats(ta_stats_t *st)
{
    _ta_lock(&large_lock);
    st->large_live_bytes = large_stats.live_bytes;
    st->large_peak_bytes = large_stats.peak_bytes;
    st->large_live_count = large_stats.live_count;
    st->large_mapped_bytes = large_stats.mapped_bytes;
    st->large_alloc_count = large_stats.alloc_count;
    st->pool_bytes = pool.bytes;
    st->pool_entries = pool.count;
    st->pool_hits = large_stats.pool_hits;
    st->pool_misses = large_stats.pool_misses;
    st->pool_expired = large_stats.pool_expired;
    st->maxmap_fallbacks = large_stats.fallbacks;
    st->parked_count = parked_count;
    st->parked_bytes = parked_bytes;
    /* Every live block, pool range and parked range may be a VMA of its own. */
    st->mappings += large_stats.live_count + pool.count + parked_count;
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
    _ta_thp_fork_child();
}
