/* SPDX-License-Identifier: MIT */
/*
 * The purge thread: gives memory back on time even when the program stops
 * calling the allocator. It unmaps pool entries past RETAIN_MS and drains
 * the heaps of exited threads that other threads keep freeing into, and
 * gives back blocks freed into live heaps whose owners stay idle. It is
 * started on the first need (outside any lock), sleeps while there is
 * nothing to do, blocks every signal, and is recreated after fork.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>

static pthread_mutex_t purge_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t purge_cond = PTHREAD_COND_INITIALIZER;
static atomic_int purge_started;
static _Atomic uint64_t purge_failed_ms; /* when pthread_create last failed */
static bool purge_pending;               /* guarded by purge_mutex: a wake since the last pass */

static void *purge_main(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&purge_mutex);
        while (!purge_pending)
            pthread_cond_wait(&purge_cond, &purge_mutex);
        purge_pending = false;
        pthread_mutex_unlock(&purge_mutex);

        /* Work until nothing with a deadline is left, then wait again. */
        for (;;) {
            long long ms = _ta_opt(TA_OPT_RETAIN_MS) / 4;
            ms = ms < 5 ? 5 : ms > 250 ? 250 : ms;
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            bool more = _ta_small_purge_pass();
            more |= _ta_large_expire();
            if (!more)
                break;
        }
    }
    return NULL;
}

/* At vm.max_map_count the thread's stack cannot be mapped: then the pool
 * ages on allocator calls only, and creation is tried again a second
 * later, not on every wake. */
#define PURGE_RETRY_CREATE_MS 1000

static void purge_start(void)
{
    uint64_t failed = atomic_load_explicit(&purge_failed_ms, memory_order_relaxed);
    if (failed != 0 && _ta_os_now_ms() - failed < PURGE_RETRY_CREATE_MS)
        return;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&purge_started, &expected, 1))
        return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits "all blocked" */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 << 10);
    pthread_t tid;
    if (pthread_create(&tid, &attr, purge_main, NULL) != 0) {
        uint64_t now = _ta_os_now_ms();
        atomic_store(&purge_failed_ms, now ? now : 1);
        atomic_store(&purge_started, 0);
        _ta_log(false, "tensoralloc: no purge thread; the pool ages on allocator calls only\n");
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void _ta_purge_wake(void)
{
    if (atomic_load_explicit(&purge_started, memory_order_relaxed) == 0) {
        purge_start();
        if (atomic_load_explicit(&purge_started, memory_order_relaxed) == 0)
            return; /* no thread to wake */
    }
    pthread_mutex_lock(&purge_mutex);
    purge_pending = true;
    pthread_cond_signal(&purge_cond);
    pthread_mutex_unlock(&purge_mutex);
}

void _ta_purge_fork_prepare(void)
{
    pthread_mutex_lock(&purge_mutex);
}

void _ta_purge_fork_parent(void)
{
    pthread_mutex_unlock(&purge_mutex);
}

/* The child has no purge thread; the next need starts one. The mutex and
 * the condition variable are made anew rather than unlocked: glibc's
 * condition variable keeps the parent's waiter (the purge thread) in its
 * state, and a signal in the child would wait for that waiter forever. */
void _ta_purge_fork_child(void)
{
    pthread_mutex_init(&purge_mutex, NULL);
    pthread_cond_init(&purge_cond, NULL);
    atomic_store(&purge_started, 0);
    atomic_store(&purge_failed_ms, 0);
    purge_pending = false;
}
