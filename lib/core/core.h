/* SPDX-License-Identifier: MIT */
/*
 * The allocator core (lib/core/): the ta_* front door (alloc.c), the
 * statistics (stats.c), and below them the purge thread, the small and the
 * large path and the retain pool. This header is the only way in from the
 * layers above (the CUDA module, the model cache, the preload face): the
 * public ta_* API (tensoralloc.h) and the calls below.
 */
#ifndef TA_CORE_H
#define TA_CORE_H

#include "base/base.h"
#include "tensoralloc.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A block with a mapping of its own (alloc.c), never a slab block, even
 * near the map-count guard: for CUDA staging buffers, which are pinned. */
void *_ta_alloc_mapped(size_t size, size_t alignment);
/* A block its caller writes whole at once (the model cache's loads): a
 * fresh large one is advised huge pages at once under THP=auto, where an
 * ordinary request may first be a probe (lib/core/thp.c). Free with
 * ta_free. */
void *_ta_alloc_filled(size_t size);
/* Marks (pin) or unmarks the large block starting at p as registered with
 * CUDA and returns its mapping. Returns 0, -1 if p is not a live large
 * block, 1 if it already is in that state. */
int _ta_large_pin_mark(const void *p, bool pin, uintptr_t *base, size_t *capacity);
/* Called, without locks held, before a pinned block's pages are unmapped,
 * pooled or moved (installed by the CUDA module). */
void _ta_large_set_unpin_hook(void (*hook)(uintptr_t base, size_t capacity));

#endif
