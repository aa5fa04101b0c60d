/* SPDX-License-Identifier: MIT */
/*
 * The retain pool as a data structure: a set of free address ranges, each
 * with the mapping it was cut from (origin) and the time it was freed.
 * Take, put, expire and trim are O(1) in the number of ranges (a bounded
 * scan of size bins found through a bitmap; a hash on both ends of every
 * range for joins; a list in the order ranges were freed). It knows
 * nothing of the kernel: its storage is handed to it (pool_grow), so the
 * unit tests run it on plain memory.
 *
 * Not thread safe: the large path calls it under its lock.
 */
#ifndef TA_POOL_H
#define TA_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A free range. origin: the mapping it lies in (one VMA); 0 if unknown,
 * and then it never joins a neighbour. */
typedef struct {
    uintptr_t addr;
    size_t size;
    uint64_t origin;
    uint64_t freed_ms;
} ta_range_t;

#define TA_POOL_BINS 384 /* 48 powers of two of pages, 8 bins each */

typedef struct ta_pool_node ta_pool_node_t;

typedef struct {
    size_t bytes;     /* sum of the ranges' sizes */
    size_t count;     /* ranges */
    size_t page;      /* every address and size is a multiple */
    size_t huge;      /* huge page size: cut rules keep it whole (0: none) */
    bool share_tails; /* blocks under a huge page are wanted: the rest of a
                         big block's last huge page stays pooled for them */
    uint64_t bitmap[TA_POOL_BINS / 64];
    uint32_t bin_head[TA_POOL_BINS];
    uint32_t age_head, age_tail; /* oldest first; node indices, 0 = none */
    ta_pool_node_t *nodes;       /* nodes[0] unused */
    uint32_t *slots;             /* hash on range ends -> node index << 1 | is_end */
    uint32_t capacity;           /* nodes that fit the storage */
    uint32_t used;               /* nodes handed out, the free list's start */
    uint32_t free_list;          /* nodes given back, linked through bin_next */
    uint32_t spare;              /* nodes on the free list */
} ta_pool_t;

void _ta_pool_init(ta_pool_t *p, size_t page, size_t huge);

/* Storage: a pool with fewer than `nodes` spare nodes wants growing. The
 * caller gets `_ta_pool_storage_bytes(p)` bytes of zeroed memory, hands
 * them to _ta_pool_grow and frees what it returns (NULL the first time;
 * *old_bytes says how much). */
bool _ta_pool_has_room(const ta_pool_t *p, uint32_t nodes);
size_t _ta_pool_storage_bytes(const ta_pool_t *p);
void *_ta_pool_grow(ta_pool_t *p, void *mem, size_t bytes, size_t *old_bytes);

/* Adds a free range (needs room for 1 node), joining it with the free
 * ranges of the same nonzero origin on either side; the joined range takes
 * the older neighbour's age and place in the age order; a range older than
 * the newest one in the pool gets that one's age. Returns how many
 * neighbours it joined (0-2). */
int _ta_pool_put(ta_pool_t *p, ta_range_t r);

/* What a take found. */
typedef enum {
    TA_POOL_EMPTY, /* nothing in the pool */
    TA_POOL_FIT,   /* *out is a block of at least size bytes at an aligned address */
    TA_POOL_SHORT, /* *out is the largest range of a known origin found,
                      smaller than size: grow it */
} ta_pool_take_t;

/* Takes a block for a request of size bytes at align (needs room for 1
 * node). A fit is cut from a range: what is left on either side stays in
 * the pool in the range's place in the age order. A block of a huge page
 * or more from a huge-page-aligned range keeps the rest of its last huge
 * page (out->size may exceed size) unless share_tails is set; a smaller block from a big aligned
 * range comes off its end, so the rest keeps its huge-page alignment. */
ta_pool_take_t _ta_pool_take(ta_pool_t *p, size_t size, size_t align, ta_range_t *out);

/* For a block put together from pieces (large.c moves them into it with
 * mremap): takes whole the largest range of a known origin of min to max
 * bytes. False if there is none. */
bool _ta_pool_take_piece(ta_pool_t *p, size_t max, size_t min, ta_range_t *out);

/* Takes out the range that starts at addr; false if there is none. */
bool _ta_pool_take_at(ta_pool_t *p, uintptr_t addr, ta_range_t *out);

/* Takes out the oldest range if it was freed at or before `before_ms`;
 * else, while the pool holds more than max_bytes, the excess off the end
 * of the oldest range (in whole huge pages where it has them). Returns
 * false when there is none to take. */
bool _ta_pool_expire_one(ta_pool_t *p, uint64_t before_ms, size_t max_bytes, ta_range_t *out);

/* Checks every internal link and sum; returns NULL or what is wrong (for
 * the unit tests). */
const char *_ta_pool_check(const ta_pool_t *p);

#endif
