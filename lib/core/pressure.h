/* SPDX-License-Identifier: MIT */
/*
 * The response to memory pressure (pressure.c): for the purge thread that
 * watches the kernel's signals, and the statistics.
 */
#ifndef TA_PRESSURE_H
#define TA_PRESSURE_H

#include "core.h"

/* Gives back what the allocator keeps, counts and logs the event, calls
 * the listeners (sources: TA_PRESSURE_* bits). */
void _ta_pressure_respond(unsigned sources);
/* The sources the purge thread watches now (0 when none). */
void _ta_pressure_watching(unsigned sources);
void _ta_pressure_stats(ta_stats_t *st);
void _ta_pressure_fork_child(void);

#endif
