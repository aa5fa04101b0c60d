/* SPDX-License-Identifier: MIT */
/*
 * The statistics (stats.c) for the front door: the exit report, which
 * alloc.c's destructor prints so that a static link that never asks for
 * statistics still has it (alloc.c's object is in every program).
 */
#ifndef TA_STATS_H
#define TA_STATS_H

#include "core.h"

/* Prints the statistics to stderr when the option STATS is set. */
void _ta_stats_exit_report(void);

#endif
