/* SPDX-License-Identifier: MIT */
/*
 * The huge-page rule (thp.c): whether a large mapping is advised
 * MADV_HUGEPAGE. Included by large.c.
 */
#ifndef TA_THP_H
#define TA_THP_H

#include "base/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Whether the mapping at addr of cap bytes, fresh_bytes of which were
 * never touched, should be advised (THP: off, on, auto). Under auto a
 * wholly fresh mapping may be kept as a probe, its residency read at a
 * later call; filled: its caller writes it whole at once (a load), so it
 * is advised and never a probe. Takes no lock the caller holds; may call
 * mincore. */
bool _ta_thp_advise(void *addr, size_t cap, size_t fresh_bytes, bool filled);
/* Whether any mapping may be advised: THP is not off and the kernel has
 * it (what _ta_thp_advise answers for a block its caller fills). */
bool _ta_thp_enabled(void);
/* A large block at addr is being freed (before its pages go): a probe is
 * read now, or blocks that live shorter than the next request (large-
 * churn, malloc-large) would never be read and never get huge pages. */
void _ta_thp_freeing(uintptr_t addr);
/* In a forked child, before any allocation. */
void _ta_thp_fork_child(void);

#endif
