/* SPDX-License-Identifier: MIT */
/*
 * The large path (large.c): one mapping per block, the retain pool, packs
 * and the map-count guard. Included by the files above it in lib/core/.
 */
#ifndef TA_LARGE_H
#define TA_LARGE_H

#include "core.h"

/* ---- large path (large.c) ------------------------------------------------ */
/* The large path never calls up: what a call leaves for its caller (the
 * front door, lib/core/alloc.c) comes back as bits in *events. */
enum {
    TA_LARGE_WAKE = 1,     /* the purge thread has a deadline to keep (pool, parked unmaps) */
    TA_LARGE_AT_LIMIT = 2, /* nothing mapped: a fresh mapping would reach the map-count guard */
};
/* What a request asks of _ta_large_alloc, as bits in how. */
enum {
    TA_LARGE_ZERO = 1,          /* the caller needs zeroed memory */
    TA_LARGE_NEAR_LIMIT_OK = 2, /* map even near the map-count guard */
    TA_LARGE_FILLED = 4,        /* the caller writes the block whole at once: huge pages */
};
/* Allocates a block with its own mapping; alignment is a power of two.
 * Near the map-count guard a request the pool cannot serve maps only with
 * TA_LARGE_NEAR_LIMIT_OK, else it returns NULL with TA_LARGE_AT_LIMIT.
 * Returns NULL with errno set on failure. */
void *_ta_large_alloc(size_t size, size_t alignment, unsigned how, unsigned *events);
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
/* Would a new mapping be refused by the vm.max_map_count guard? */
bool _ta_large_near_map_limit(void);
void _ta_large_stats(ta_stats_t *st);
void _ta_large_fork_prepare(void);
void _ta_large_fork_parent(void);
void _ta_large_fork_child(void);

#endif
