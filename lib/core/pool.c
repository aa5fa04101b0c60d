/* SPDX-License-Identifier: MIT */
/*
 * The retain pool's data structure (pool.h). Three views of one set of
 * nodes, each a range:
 *
 *  - size bins, as in TLSF (Masmano et al., "TLSF: a new dynamic memory
 *    allocator for real-time systems", 2004): a bin per eighth of a power
 *    of two of pages, exact below 16 pages, a bitmap of the non-empty ones.
 *    A take scans at most SCAN_MAX nodes of its own bin, then the first
 *    non-empty bins above it, whose nodes are all big enough.
 *  - a hash on both ends of every range (open addressing, linear probing,
 *    backward-shift deletion): a put finds the ranges that end where it
 *    starts and start where it ends in O(1).
 *  - a list in the order the ranges were freed: expiry and eviction take
 *    its head. A range cut by a take stays where it was in this order, so
 *    an old mapping's pieces expire with it.
 *
 * Node indices are 32 bits; index 0 means none.
 */
#include "pool.h"

#include <string.h>

struct ta_pool_node {
    ta_range_t r;
    uint32_t bin_prev, bin_next;
    uint32_t age_prev, age_next;
    uint32_t bin; /* the bin it is in */
};

#define SCAN_MAX 8          /* nodes looked at per bin */
#define FIRST_CAPACITY 256u /* nodes in the first storage */
#define SLOTS_PER_NODE 4    /* two keys per node at a load of at most 1/2 */
#define NONE 0u

/* ---- size bins ------------------------------------------------------------ */

static uint32_t bin_of(size_t pages)
{
    if (pages < 16)
        return (uint32_t)pages;
    unsigned lg = 63u - (unsigned)__builtin_clzll(pages);
    return (lg - 2) * 8 + (uint32_t)((pages >> (lg - 3)) & 7);
}

static void bin_link(ta_pool_t *p, uint32_t i)
{
    ta_pool_node_t *n = &p->nodes[i];
    n->bin = bin_of(n->r.size / p->page);
    n->bin_prev = NONE;
    n->bin_next = p->bin_head[n->bin];
    if (n->bin_next != NONE)
        p->nodes[n->bin_next].bin_prev = i;
    p->bin_head[n->bin] = i;
    p->bitmap[n->bin / 64] |= 1ull << (n->bin % 64);
}

static void bin_unlink(ta_pool_t *p, uint32_t i)
{
    ta_pool_node_t *n = &p->nodes[i];
    if (n->bin_prev != NONE)
        p->nodes[n->bin_prev].bin_next = n->bin_next;
    else
        p->bin_head[n->bin] = n->bin_next;
    if (n->bin_next != NONE)
        p->nodes[n->bin_next].bin_prev = n->bin_prev;
    if (p->bin_head[n->bin] == NONE)
        p->bitmap[n->bin / 64] &= ~(1ull << (n->bin % 64));
}

/* The first non-empty bin at or above b, or TA_POOL_BINS. */
static uint32_t bin_next_nonempty(const ta_pool_t *p, uint32_t b)
{
    for (uint32_t w = b / 64; w < TA_POOL_BINS / 64; w++) {
        uint64_t bits = p->bitmap[w];
        if (w == b / 64)
            bits &= ~0ull << (b % 64);
        if (bits)
            return w * 64 + (uint32_t)__builtin_ctzll(bits);
    }
    return TA_POOL_BINS;
}

/* The last non-empty bin below b, or TA_POOL_BINS. */
static uint32_t bin_prev_nonempty(const ta_pool_t *p, uint32_t b)
{
    for (int w = (int)(b / 64); w >= 0; w--) {
        uint64_t bits = p->bitmap[w];
        if ((uint32_t)w == b / 64)
            bits &= (1ull << (b % 64)) - 1;
        if (bits)
            return (uint32_t)w * 64 + 63u - (uint32_t)__builtin_clzll(bits);
    }
    return TA_POOL_BINS;
}

/* ---- the hash on range ends ------------------------------------------------- */

static uint32_t slot_count(uint32_t capacity)
{
    return capacity * SLOTS_PER_NODE;
}

static uintptr_t key_of(const ta_pool_t *p, uint32_t slot_value)
{
    const ta_range_t *r = &p->nodes[slot_value >> 1].r;
    return (slot_value & 1) ? r->addr + r->size : r->addr;
}

static uint32_t home_of(uintptr_t key, uint32_t slots)
{
    uint64_t h = (uint64_t)(key >> 12) * 0x9E3779B97F4A7C15ULL;
    return (uint32_t)(h >> 32) & (slots - 1);
}

static void hash_put(ta_pool_t *p, uint32_t value)
{
    uint32_t mask = slot_count(p->capacity) - 1;
    uint32_t i = home_of(key_of(p, value), mask + 1);
    while (p->slots[i] != 0)
        i = (i + 1) & mask;
    p->slots[i] = value;
}

/* The node whose start (is_end false) or end is key, or NONE. */
static uint32_t hash_find(const ta_pool_t *p, uintptr_t key, bool is_end)
{
    if (p->capacity == 0)
        return NONE;
    uint32_t mask = slot_count(p->capacity) - 1;
    for (uint32_t i = home_of(key, mask + 1);; i = (i + 1) & mask) {
        uint32_t v = p->slots[i];
        if (v == 0)
            return NONE;
        if ((v & 1) == (uint32_t)is_end && key_of(p, v) == key)
            return v >> 1;
    }
}

static void hash_remove(ta_pool_t *p, uint32_t value)
{
    uint32_t mask = slot_count(p->capacity) - 1;
    uint32_t hole = home_of(key_of(p, value), mask + 1);
    while (p->slots[hole] != value)
        hole = (hole + 1) & mask;
    for (uint32_t i = (hole + 1) & mask; p->slots[i] != 0; i = (i + 1) & mask) {
        uint32_t home = home_of(key_of(p, p->slots[i]), mask + 1);
        if (((i - home) & mask) >= ((i - hole) & mask)) { /* home not in (hole, i] */
            p->slots[hole] = p->slots[i];
            hole = i;
        }
    }
    p->slots[hole] = 0;
}

/* ---- the age list ---------------------------------------------------------- */

/* Links node i after node `after` (NONE: at the head). */
static void age_link_after(ta_pool_t *p, uint32_t i, uint32_t after)
{
    ta_pool_node_t *n = &p->nodes[i];
    n->age_prev = after;
    n->age_next = after != NONE ? p->nodes[after].age_next : p->age_head;
    if (after != NONE)
        p->nodes[after].age_next = i;
    else
        p->age_head = i;
    if (n->age_next != NONE)
        p->nodes[n->age_next].age_prev = i;
    else
        p->age_tail = i;
}

static void age_unlink(ta_pool_t *p, uint32_t i)
{
    ta_pool_node_t *n = &p->nodes[i];
    if (n->age_prev != NONE)
        p->nodes[n->age_prev].age_next = n->age_next;
    else
        p->age_head = n->age_next;
    if (n->age_next != NONE)
        p->nodes[n->age_next].age_prev = n->age_prev;
    else
        p->age_tail = n->age_prev;
}

/* ---- nodes ------------------------------------------------------------------- */

static uint32_t node_new(ta_pool_t *p)
{
    uint32_t i = p->free_list;
    if (i != NONE) {
        p->free_list = p->nodes[i].bin_next;
        p->spare--;
    } else {
        i = ++p->used;
    }
    return i;
}

/* Puts range r in node i: the bins, the hash and the sums (not the age list). */
static void node_enter(ta_pool_t *p, uint32_t i, ta_range_t r)
{
    p->nodes[i].r = r;
    bin_link(p, i);
    hash_put(p, i << 1);
    hash_put(p, i << 1 | 1);
    p->bytes += r.size;
    p->count++;
}

static void node_leave(ta_pool_t *p, uint32_t i)
{
    bin_unlink(p, i);
    hash_remove(p, i << 1);
    hash_remove(p, i << 1 | 1);
    p->bytes -= p->nodes[i].r.size;
    p->count--;
}

/* Gives back node i, out of the bins and the hash already. */
static void node_recycle(ta_pool_t *p, uint32_t i)
{
    age_unlink(p, i);
    p->nodes[i].bin_next = p->free_list;
    p->free_list = i;
    p->spare++;
}

static void node_free(ta_pool_t *p, uint32_t i)
{
    node_leave(p, i);
    node_recycle(p, i);
}

/* ---- storage ------------------------------------------------------------------ */

void _ta_pool_init(ta_pool_t *p, size_t page, size_t huge)
{
    memset(p, 0, sizeof *p);
    p->page = page;
    p->huge = huge;
}

bool _ta_pool_has_room(const ta_pool_t *p, uint32_t nodes)
{
    return p->capacity - p->used + p->spare >= nodes;
}

static size_t storage_bytes(uint32_t capacity)
{
    return (capacity + 1) * sizeof(ta_pool_node_t) + slot_count(capacity) * sizeof(uint32_t);
}

size_t _ta_pool_storage_bytes(const ta_pool_t *p)
{
    return storage_bytes(p->capacity ? 2 * p->capacity : FIRST_CAPACITY);
}

void *_ta_pool_grow(ta_pool_t *p, void *mem, size_t bytes, size_t *old_bytes)
{
    uint32_t capacity = p->capacity ? 2 * p->capacity : FIRST_CAPACITY;
    (void)bytes; /* _ta_pool_storage_bytes(p), zeroed */
    void *old = p->nodes;
    *old_bytes = p->capacity ? storage_bytes(p->capacity) : 0;
    ta_pool_node_t *nodes = mem;
    if (old)
        memcpy(nodes, p->nodes, (p->used + 1) * sizeof(ta_pool_node_t));
    p->nodes = nodes;
    p->slots = (uint32_t *)(nodes + capacity + 1);
    p->capacity = capacity;
    /* rehash the ranges: walk the age list, which holds every node */
    for (uint32_t i = p->age_head; i != NONE; i = p->nodes[i].age_next) {
        hash_put(p, i << 1);
        hash_put(p, i << 1 | 1);
    }
    return old;
}

/* ---- put ------------------------------------------------------------------------ */

/* Only ranges of one mapping join: a range of one origin lies in one VMA,
 * which mremap can grow or move whole (joining across origins made the
 * model shapes fault more, not less: docs/benchmarks.md). */
static bool joinable(const ta_pool_t *p, uint32_t i, uint64_t origin)
{
    return i != NONE && origin != 0 && p->nodes[i].r.origin == origin;
}

/* Grows node i by r (its neighbour) in place, keeping its place in the age
 * order. */
static void node_extend(ta_pool_t *p, uint32_t i, ta_range_t r)
{
    ta_range_t n = p->nodes[i].r;
    node_leave(p, i);
    n.addr = n.addr < r.addr ? n.addr : r.addr;
    n.size += r.size;
    node_enter(p, i, n);
}

int _ta_pool_put(ta_pool_t *p, ta_range_t r)
{
    uint32_t left = hash_find(p, r.addr, true);
    uint32_t right = hash_find(p, r.addr + r.size, false);
    if (!joinable(p, left, r.origin))
        left = NONE;
    if (!joinable(p, right, r.origin))
        right = NONE;
    if (left == NONE && right == NONE) {
        if (p->age_tail != NONE && r.freed_ms < p->nodes[p->age_tail].r.freed_ms)
            r.freed_ms = p->nodes[p->age_tail].r.freed_ms; /* the list stays in order */
        uint32_t i = node_new(p);
        node_enter(p, i, r);
        age_link_after(p, i, p->age_tail);
        return 0;
    }
    /* joins the older neighbour, which keeps its age */
    uint32_t keep = left, other = right;
    if (keep == NONE || (other != NONE && p->nodes[other].r.freed_ms < p->nodes[keep].r.freed_ms)) {
        keep = right;
        other = left;
    }
    if (other != NONE) {
        ta_range_t o = p->nodes[other].r;
        node_free(p, other);
        r.addr = r.addr < o.addr ? r.addr : o.addr;
        r.size += o.size;
    }
    node_extend(p, keep, r);
    return other != NONE ? 2 : 1;
}

/* ---- take ------------------------------------------------------------------------- */

static uintptr_t align_up(uintptr_t x, size_t a)
{
    return (x + a - 1) & ~(uintptr_t)(a - 1);
}

static bool fits(const ta_range_t *r, size_t size, size_t align)
{
    uintptr_t start = align_up(r->addr, align);
    return start >= r->addr && start - r->addr + size <= r->size;
}

/* A node of bin b that fits, or NONE (at most SCAN_MAX looked at); *largest
 * keeps the largest node seen that is smaller than size and can be grown
 * (one origin). */
static uint32_t bin_scan(const ta_pool_t *p, uint32_t b, size_t size, size_t align,
                         uint32_t *largest)
{
    uint32_t i = p->bin_head[b];
    for (int k = 0; k < SCAN_MAX && i != NONE; k++, i = p->nodes[i].bin_next) {
        const ta_range_t *r = &p->nodes[i].r;
        if (fits(r, size, align))
            return i;
        if (r->size < size && r->origin != 0 &&
            (*largest == NONE || r->size > p->nodes[*largest].r.size))
            *largest = i;
    }
    return NONE;
}

/* Where in range r the block goes: [*start, *end). */
static void cut_place(const ta_pool_t *p, const ta_range_t *r, size_t size, size_t align,
                      uintptr_t *start, uintptr_t *end)
{
    uintptr_t r_end = r->addr + r->size;
    size_t huge = p->huge;
    bool huge_aligned = huge && (r->addr & (huge - 1)) == 0;
    if (huge_aligned && size < huge && r->size - size >= huge &&
        ((r_end - size) & (align - 1)) == 0) {
        *start = r_end - size; /* off the end: the rest stays huge aligned */
        *end = r_end;
        return;
    }
    *start = align_up(r->addr, align);
    *end = *start + size;
    /* Cut inside a huge page splits it (tripled model-switch's time): the
     * block keeps the rest of its last huge page, unless smaller blocks
     * want it (the rest then waits for them in the pool; a diffusion UNet's
     * 2.5-7 MiB tensors held 180 MiB of such rests, 7% of its peak). */
    if (huge && size >= huge && (*start & (huge - 1)) == 0 && !p->share_tails) {
        uintptr_t rounded = *start + align_up(size, huge);
        if (rounded <= r_end)
            *end = rounded;
    }
}

/* Cuts [start, end) out of node i's range; the pieces left on either side
 * keep the node's place in the age order. */
static void cut(ta_pool_t *p, uint32_t i, uintptr_t start, uintptr_t end)
{
    ta_range_t r = p->nodes[i].r;
    ta_range_t head = r, tail = r;
    head.size = start - r.addr;
    tail.addr = end;
    tail.size = r.addr + r.size - end;
    node_leave(p, i);
    if (head.size == 0 && tail.size == 0) {
        node_recycle(p, i);
        return;
    }
    node_enter(p, i, head.size ? head : tail);
    if (head.size && tail.size) {
        uint32_t t = node_new(p);
        node_enter(p, t, tail);
        age_link_after(p, t, i);
    }
}

ta_pool_take_t _ta_pool_take(ta_pool_t *p, size_t size, size_t align, ta_range_t *out)
{
    if (p->count == 0)
        return TA_POOL_EMPTY;
    size = align_up(size, p->page);
    uint32_t largest = NONE;
    uint32_t b = bin_of(size / p->page);
    uint32_t found = bin_scan(p, b, size, align, &largest);
    for (uint32_t c = bin_next_nonempty(p, b + 1); found == NONE && c < TA_POOL_BINS;
         c = bin_next_nonempty(p, c + 1)) {
        found = bin_scan(p, c, size, align, &largest);
    }
    if (found == NONE) {
        uint32_t below = b ? bin_prev_nonempty(p, b) : TA_POOL_BINS;
        if (below < TA_POOL_BINS)
            bin_scan(p, below, size, align, &largest);
        if (largest == NONE)
            return TA_POOL_EMPTY; /* none that fits or can be grown */
        *out = p->nodes[largest].r;
        node_free(p, largest);
        return TA_POOL_SHORT;
    }
    ta_range_t r = p->nodes[found].r;
    uintptr_t start, end;
    cut_place(p, &r, size, align, &start, &end);
    cut(p, found, start, end);
    *out = (ta_range_t){start, end - start, r.origin, r.freed_ms};
    return TA_POOL_FIT;
}

/* The largest range of a known origin of min to max bytes among the first
 * bins at and below max's, or NONE. */
static uint32_t largest_between(const ta_pool_t *p, size_t min, size_t max)
{
    uint32_t best = NONE;
    uint32_t b = bin_of(max / p->page);
    for (int bins = 0; bins < 4 && best == NONE && b < TA_POOL_BINS; bins++) {
        uint32_t i = p->bin_head[b];
        for (int k = 0; k < SCAN_MAX && i != NONE; k++, i = p->nodes[i].bin_next) {
            const ta_range_t *r = &p->nodes[i].r;
            if (r->size <= max && r->size >= min && r->origin != 0 &&
                (best == NONE || r->size > p->nodes[best].r.size))
                best = i;
        }
        b = b ? bin_prev_nonempty(p, b) : TA_POOL_BINS;
    }
    return best;
}

bool _ta_pool_take_piece(ta_pool_t *p, size_t max, size_t min, ta_range_t *out)
{
    max &= ~(p->page - 1);
    if (p->count == 0 || max == 0)
        return false;
    uint32_t i = largest_between(p, min, max);
    if (i == NONE)
        return false;
    *out = p->nodes[i].r;
    node_free(p, i);
    return true;
}

bool _ta_pool_take_at(ta_pool_t *p, uintptr_t addr, ta_range_t *out)
{
    uint32_t i = hash_find(p, addr, false);
    if (i == NONE)
        return false;
    *out = p->nodes[i].r;
    node_free(p, i);
    return true;
}

/* ---- expire ------------------------------------------------------------------------ */

bool _ta_pool_expire_one(ta_pool_t *p, uint64_t before_ms, size_t max_bytes, ta_range_t *out)
{
    uint32_t i = p->age_head;
    if (i == NONE || (p->nodes[i].r.freed_ms > before_ms && p->bytes <= max_bytes))
        return false;
    ta_range_t r = p->nodes[i].r;
    if (r.freed_ms > before_ms) {
        /* over the byte bound only: the excess comes off the oldest range's
         * end, whole huge pages where the range has them */
        size_t excess = align_up(p->bytes - max_bytes, p->page);
        if (p->huge && r.size >= p->huge && (r.addr & (p->huge - 1)) == 0)
            excess = align_up(excess, p->huge);
        if (excess < r.size) {
            cut(p, i, r.addr + r.size - excess, r.addr + r.size);
            *out = (ta_range_t){r.addr + r.size - excess, excess, r.origin, r.freed_ms};
            return true;
        }
    }
    *out = r;
    node_free(p, i);
    return true;
}

/* ---- the self-check ------------------------------------------------------------------ */

const char *_ta_pool_check(const ta_pool_t *p)
{
    size_t bytes = 0, count = 0;
    uint64_t last_ms = 0;
    uint32_t prev = NONE;
    for (uint32_t i = p->age_head; i != NONE; prev = i, i = p->nodes[i].age_next) {
        const ta_pool_node_t *n = &p->nodes[i];
        if (n->age_prev != prev)
            return "age list: broken back link";
        if (n->r.freed_ms < last_ms)
            return "age list: out of order";
        last_ms = n->r.freed_ms;
        if (n->r.size == 0 || n->r.size % p->page || n->r.addr % p->page)
            return "a range not in whole pages";
        if (n->bin != bin_of(n->r.size / p->page))
            return "a node in the wrong bin";
        if (hash_find(p, n->r.addr, false) != i || hash_find(p, n->r.addr + n->r.size, true) != i)
            return "hash: a range's end not found";
        bytes += n->r.size;
        count++;
        if (count > p->used)
            return "age list: a cycle";
    }
    if (prev != p->age_tail)
        return "age list: wrong tail";
    if (bytes != p->bytes || count != p->count)
        return "sums disagree with the ranges";
    size_t in_bins = 0;
    for (uint32_t b = 0; b < TA_POOL_BINS; b++) {
        bool set = (p->bitmap[b / 64] >> (b % 64)) & 1;
        if (set != (p->bin_head[b] != NONE))
            return "bitmap disagrees with a bin";
        for (uint32_t i = p->bin_head[b]; i != NONE; i = p->nodes[i].bin_next) {
            if (p->nodes[i].bin != b)
                return "a bin holds a node of another";
            if (++in_bins > count)
                return "bins: a cycle or a stray node";
        }
    }
    if (in_bins != count)
        return "bins miss a range";
    size_t keys = 0;
    for (uint32_t s = 0; s < slot_count(p->capacity); s++)
        keys += p->slots[s] != 0;
    if (keys != 2 * count)
        return "hash: stray keys";
    return NULL;
}
