/* SPDX-License-Identifier: MIT */
/*
 * The response to memory pressure: what the allocator keeps goes back to
 * the kernel at once (the large path's retain pool and parked ranges, the
 * free slab pages of every heap: memory no one uses), then the listeners
 * hear of it (the model cache evicts; a server may refuse work). The
 * purge thread (purge.c) watches the kernel's signals and calls
 * _ta_pressure_respond; ta_pressure_signal does the same for a caller.
 * docs/cache.md "Memory pressure".
 */
#define _GNU_SOURCE
#include "pressure.h"
#include "large.h"
#include "slab.h"

#include <errno.h>
#include <pthread.h>

#define MAX_LISTENERS 16

/* One response at a time; listeners are added and removed under it, so a
 * removal waits for the call in progress. */
static pthread_mutex_t respond_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct {
    ta_pressure_fn fn;
    void *arg;
} listeners[MAX_LISTENERS];
static int listener_count;                /* guarded by respond_mutex */
static _Atomic(pthread_t) responder;      /* the thread inside a response, else 0 */
static _Atomic uint64_t events, released; /* statistics */
static _Atomic unsigned watching;         /* TA_PRESSURE_* sources the purge thread opened */

/* What the allocator holds that no one uses: pool, parked ranges, free
 * slab pages. */
static uint64_t held_free(void)
{
    ta_stats_t st = {.size = sizeof st};
    _ta_large_stats(&st);
    _ta_small_stats(&st);
    return st.pool_bytes + st.parked_bytes + st.small_dirty_bytes;
}

static bool inside_response(void)
{
    return pthread_equal(atomic_load(&responder), pthread_self());
}

void _ta_pressure_respond(unsigned sources)
{
    pthread_mutex_lock(&respond_mutex);
    atomic_store(&responder, pthread_self());
    uint64_t before = held_free();
    _ta_large_trim(true);
    _ta_small_release_now();
    uint64_t after = held_free();
    ta_pressure_event_t ev = {
        .sources = sources,
        .events = atomic_fetch_add(&events, 1) + 1,
        .released_bytes = before > after ? before - after : 0,
    };
    atomic_fetch_add(&released, ev.released_bytes);
    char figure[256];
    _ta_os_pressure_figure(figure, sizeof figure);
    ev.figure = figure;
    _ta_log(false, "tensoralloc: memory pressure (%s): gave back %llu KiB\n", figure,
            (unsigned long long)(ev.released_bytes >> 10));
    for (int i = 0; i < listener_count; i++)
        if (listeners[i].fn) /* NULL: removed by an earlier listener of this response */
            listeners[i].fn(&ev, listeners[i].arg);
    int kept = 0;
    for (int i = 0; i < listener_count; i++)
        if (listeners[i].fn)
            listeners[kept++] = listeners[i];
    listener_count = kept;
    if (listener_count) { /* what they freed (evicted entries) goes back too, not RETAIN_MS later */
        _ta_large_trim(true);
        _ta_small_release_now();
    }
    atomic_store(&responder, (pthread_t)0);
    pthread_mutex_unlock(&respond_mutex);
}

void _ta_pressure_watching(unsigned sources)
{
    atomic_store(&watching, sources);
}

void _ta_pressure_stats(ta_stats_t *st)
{
    st->pressure_events = atomic_load(&events);
    st->pressure_released_bytes = atomic_load(&released);
    st->pressure_sources = atomic_load(&watching);
}

int ta_pressure_listen(ta_pressure_fn fn, void *arg)
{
    if (fn == NULL)
        return EINVAL;
    if (inside_response())
        return EDEADLK;
    int rc = 0;
    pthread_mutex_lock(&respond_mutex);
    for (int i = 0; i < listener_count && rc == 0; i++)
        if (listeners[i].fn == fn && listeners[i].arg == arg)
            rc = EEXIST;
    if (rc == 0 && listener_count == MAX_LISTENERS)
        rc = ENOSPC;
    if (rc == 0) {
        listeners[listener_count].fn = fn;
        listeners[listener_count++].arg = arg;
    }
    pthread_mutex_unlock(&respond_mutex);
    return rc;
}

/* From a listener of the response in progress (a cache destroyed by
 * another's callback) the entry is only marked: the response's loop skips
 * it and drops it at its end, so nothing calls the freed listener. */
int ta_pressure_unlisten(ta_pressure_fn fn, void *arg)
{
    bool inside = inside_response(); /* then respond_mutex is this thread's */
    int rc = ENOENT;
    if (!inside)
        pthread_mutex_lock(&respond_mutex);
    for (int i = 0; i < listener_count; i++) {
        if (listeners[i].fn == fn && listeners[i].arg == arg) {
            if (inside)
                listeners[i].fn = NULL;
            else
                listeners[i] = listeners[--listener_count];
            rc = 0;
            break;
        }
    }
    if (!inside)
        pthread_mutex_unlock(&respond_mutex);
    return rc;
}

int ta_pressure_signal(void)
{
    if (inside_response())
        return EDEADLK;
    _ta_pressure_respond(TA_PRESSURE_CALLER);
    return 0;
}

/* A fork child: a response cut in half by the fork is not the child's
 * (the listeners stay; a cache is the child's as the POSIX rule says). */
void _ta_pressure_fork_child(void)
{
    pthread_mutex_init(&respond_mutex, NULL);
    atomic_store(&responder, (pthread_t)0);
    atomic_store(&watching, 0);
}
