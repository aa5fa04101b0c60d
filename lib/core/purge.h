/* SPDX-License-Identifier: MIT */
/*
 * The purge thread (purge.c): the pool's age bound and exited threads'
 * heaps, in the background. Included by the front door (alloc.c).
 */
#ifndef TA_PURGE_H
#define TA_PURGE_H

#include "core.h"

/* ---- the purge thread (purge.c) ----------------------------------------- */
/* Process set-up (the owning process, the wake-up and thread-exit hooks it
 * installs into the slabs): called by every thread that reaches set-up
 * before it is done, so that none allocates or exits without the hooks. */
void _ta_purge_init(void);
/* There is work with a deadline: wakes the purge thread if it runs.
 * Never starts a thread (it runs under free, which glibc calls with its
 * own locks held). */
void _ta_purge_wake(void);
/* A thread is ending (its heap's key destructor): the purge thread looks
 * whether it is the last one left. */
void _ta_purge_thread_exiting(void);
/* Starts the purge thread where it may run and does not: called on
 * allocation paths only, outside every lock of ours. */
bool _ta_purge_thread_running(void);
bool _ta_purge_may_start(void);
void _ta_purge_start(void);
static inline void _ta_purge_ensure(void)
{
    if (TA_UNLIKELY(!_ta_purge_thread_running()) && _ta_purge_may_start())
        _ta_purge_start();
}
/* glibc's view: has the process ever had a second thread. */
bool _ta_process_has_threads(void);
void _ta_purge_fork_prepare(void);
void _ta_purge_fork_parent(void);
void _ta_purge_fork_child(void);

#endif
