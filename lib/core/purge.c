/* SPDX-License-Identifier: MIT */
/*
 * The purge thread: gives memory back on time even when the program stops
 * calling the allocator. It unmaps pool entries past RETAIN_MS, drains the
 * heaps of exited threads that other threads keep freeing into, and gives
 * back blocks freed into live heaps whose owners stay idle.
 *
 * Its life follows three rules (docs/reliability.md, "What may happen
 * under malloc and free"):
 * - free never starts it: glibc calls free holding locks pthread_create
 *   takes (its stack-cache lock, when a thread exits). It is started on an
 *   allocation path, outside every lock of ours, and then stays, asleep on
 *   a condition variable while nothing has a deadline, so that a later
 *   free only has to wake it.
 * - It is never what makes a process multi-threaded (option PURGE_THREAD,
 *   auto): glibc serves fork from a signal handler, and skips its own fork
 *   locking, only in a process that never had a second thread, and Python
 *   warns on fork in a threaded one. A single-threaded process ages its
 *   pool on allocator calls only.
 * - It never keeps a process alive: glibc ends a process when its last
 *   thread ends, and this one counts. The exit of a thread that had a heap
 *   (its key destructor) makes it look, a few times over the next seconds,
 *   whether it is the only thread left, and while idle it looks every 1 to
 *   8 s (a thread that never allocated leaves no sign); alone, it lets the
 *   signals it blocked through and ends, and the process with it.
 *
 * It also watches the kernel's memory-pressure signals (option PRESSURE,
 * lib/os/os_pressure.c): then it sleeps in poll on their file descriptors
 * and on an eventfd that wakes it, instead of on the condition variable,
 * and responds to an event (pressure.c) at most every RESPOND_SPACING_MS.
 */
#define _GNU_SOURCE
#include "purge.h"
#include "large.h"
#include "pressure.h"
#include "slab.h"

#include <pthread.h>
#include <time.h>
#if defined(__has_include)
#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>
#define HAVE_SINGLE_THREADED 1
#endif
#endif

/* After a thread's exit, when to look whether the purge thread is the
 * only one left (ms after the previous look): the exiting thread needs a
 * moment to be gone. */
static const int exit_check_ms[] = {0, 10, 50, 200, 1000, 3000};
#define EXIT_CHECKS ((int)(sizeof exit_check_ms / sizeof exit_check_ms[0]))
/* While idle, the same look every 1 s, then less often, to 8 s at most:
 * the bound on how long a process whose last own thread never allocated
 * outlives it. */
#define IDLE_LOOK_MIN_MS 1000
#define IDLE_LOOK_MAX_MS 8000
/* At vm.max_map_count the thread's stack cannot be mapped: then the pool
 * ages on allocator calls only, and creation is tried again a second
 * later, not on every allocation. */
#define PURGE_RETRY_CREATE_MS 1000
/* Events closer together than this are one response: cgroup v1 reports a
 * level for every reclaim batch. */
#define RESPOND_SPACING_MS 100

static pthread_mutex_t purge_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t purge_cond = PTHREAD_COND_INITIALIZER;
/* Held over each pass: fork takes it, so a child never inherits a pass
 * cut in half (a heap's trim flag set, a taken list, victims in flight). */
static pthread_mutex_t pass_mutex = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool purge_running; /* written under purge_mutex: the thread exists */
static bool purge_pending; /* guarded by purge_mutex: a wake since the last pass */
static int exit_checks;    /* guarded by purge_mutex: looks left after a thread's exit */
static int purge_pid;    /* guarded by purge_mutex: the process the state belongs to */
static _Atomic uint64_t purge_failed_ms; /* when pthread_create last failed */
/* Written under purge_mutex by the thread: it sleeps in poll (the
 * watcher's eventfd wakes it), not on purge_cond. */
static atomic_bool poll_waits;
static unsigned pressure_fired; /* guarded by purge_mutex: sources not yet responded to */
static uint64_t last_response_ms; /* the thread's own */

/* Process set-up, before any allocation can wake the thread. */
void _ta_purge_init(void)
{
    __atomic_store_n(&purge_pid, _ta_os_pid(), __ATOMIC_RELAXED);
    _ta_small_set_purge_hooks(_ta_purge_wake, _ta_purge_thread_exiting,
                              _ta_purge_thread_running);
}

bool _ta_process_has_threads(void)
{
#ifdef HAVE_SINGLE_THREADED
    return __libc_single_threaded == 0;
#else
    return true;
#endif
}

static void pressure_respond(unsigned fired)
{
    uint64_t now = _ta_os_now_ms();
    if (last_response_ms && now - last_response_ms < RESPOND_SPACING_MS)
        _ta_os_sleep_ms((long)(RESPOND_SPACING_MS - (now - last_response_ms)));
    _ta_pressure_respond(fired);
    last_response_ms = _ta_os_now_ms();
}

/* Sleeps ms, or less when pressure comes; returns its sources. */
static unsigned sleep_watching(long ms)
{
    if (!atomic_load_explicit(&poll_waits, memory_order_relaxed)) {
        _ta_os_sleep_ms(ms);
        return 0;
    }
    uint64_t until = _ta_os_now_ms() + (uint64_t)ms, now;
    unsigned fired = 0;
    while (!fired && (now = _ta_os_now_ms()) < until)
        fired = _ta_os_pressure_wait((long)(until - now)) & ~(unsigned)TA_OS_PRESSURE_WAKE;
    return fired;
}

/* Passes until nothing with a deadline is left. */
static void purge_work(void)
{
    for (;;) {
        long long ms = _ta_opt(TA_OPT_RETAIN_MS) / 4;
        ms = ms < 5 ? 5 : ms > 250 ? 250 : ms;
        unsigned fired = sleep_watching((long)ms);
        pthread_mutex_lock(&pass_mutex);
        bool more = _ta_small_purge_pass();
        more |= _ta_large_expire();
        pthread_mutex_unlock(&pass_mutex);
        if (fired)
            pressure_respond(fired);
        if (!more)
            return;
    }
}

static void wait_ms(int ms)
{
    if (atomic_load_explicit(&poll_waits, memory_order_relaxed)) {
        uint64_t until = _ta_os_now_ms() + (uint64_t)ms, now;
        while (!purge_pending && !pressure_fired && (now = _ta_os_now_ms()) < until) {
            pthread_mutex_unlock(&purge_mutex);
            unsigned fired = _ta_os_pressure_wait((long)(until - now));
            pthread_mutex_lock(&purge_mutex);
            pressure_fired |= fired & ~(unsigned)TA_OS_PRESSURE_WAKE;
        }
        return;
    }
    struct timespec until;
    /* The condition variable's clock (realtime): a jump only moves one look. */
    _ta_os_deadline(false, (uint64_t)ms, &until);
    while (!purge_pending && pthread_cond_timedwait(&purge_cond, &purge_mutex, &until) == 0)
        ;
}

/* Wakes the thread's sleep (purge_mutex held). */
static void wake_locked(void)
{
    if (atomic_load_explicit(&poll_waits, memory_order_relaxed))
        _ta_os_pressure_wake();
    else
        pthread_cond_signal(&purge_cond);
}

/* Alone: signals the process got while only this thread (which blocks
 * them all) was left are delivered as they would have been to the last
 * thread, then the thread ends, and glibc ends the process. */
static void *purge_end(void)
{
    atomic_store(&poll_waits, false);
    _ta_os_pressure_close();
    _ta_pressure_watching(0);
    atomic_store(&purge_running, false);
    pthread_mutex_unlock(&purge_mutex);
    _ta_os_unblock_signals();
    return NULL;
}

/* Whether this is the only thread left (looked at without purge_mutex). */
static bool alone_now(void)
{
    pthread_mutex_unlock(&purge_mutex);
    bool alone = _ta_os_only_thread_left();
    pthread_mutex_lock(&purge_mutex);
    return alone && !purge_pending;
}

static void *purge_main(void *arg)
{
    (void)arg;
    int idle_ms = IDLE_LOOK_MIN_MS;
    /* The watcher first: its files are read outside purge_mutex, which
     * frees take to wake the thread. */
    unsigned sources = _ta_os_pressure_open(_ta_opt(TA_OPT_PRESSURE) != 0);
    pthread_mutex_lock(&purge_mutex);
    atomic_store(&poll_waits, _ta_os_pressure_wakeable());
    _ta_pressure_watching(sources);
    for (;;) {
        if (pressure_fired) {
            unsigned fired = pressure_fired;
            pressure_fired = 0;
            pthread_mutex_unlock(&purge_mutex);
            pressure_respond(fired);
            pthread_mutex_lock(&purge_mutex);
        } else if (purge_pending) {
            purge_pending = false;
            pthread_mutex_unlock(&purge_mutex);
            purge_work();
            pthread_mutex_lock(&purge_mutex);
            idle_ms = IDLE_LOOK_MIN_MS;
        } else if (exit_checks > 0) {
            int delay = exit_check_ms[EXIT_CHECKS - exit_checks--];
            if (delay > 0)
                wait_ms(delay);
            if (!purge_pending && alone_now())
                return purge_end();
            idle_ms = IDLE_LOOK_MIN_MS;
        } else {
            /* A thread that never allocated ends without a key destructor
             * to tell: look now and then while idle as well. */
            wait_ms(idle_ms);
            if (!purge_pending && exit_checks == 0) {
                if (alone_now())
                    return purge_end();
                idle_ms = idle_ms * 2 > IDLE_LOOK_MAX_MS ? IDLE_LOOK_MAX_MS : idle_ms * 2;
            }
        }
    }
}

/* A child made by _Fork (no fork handlers) of a process whose purge thread
 * ran: that thread is not in the child, and glibc's condition variable
 * still counts it as a waiter. Called with nothing held. */
static void purge_forget_parent(void)
{
    int owner = __atomic_load_n(&purge_pid, __ATOMIC_RELAXED);
    int self = _ta_os_pid();
    if (owner == self || owner == 0) /* 0: set-up has not finished */
        return;
    /* The parent's watcher descriptors are forgotten, not closed: this
     * child may have closed them and reused their numbers since. */
    _ta_os_pressure_forget();
    _ta_purge_fork_child();
    __atomic_store_n(&purge_pid, self, __ATOMIC_RELAXED);
}

void _ta_purge_wake(void)
{
    purge_forget_parent();
    pthread_mutex_lock(&purge_mutex);
    bool was = purge_pending;
    purge_pending = true;
    if (!was) /* else a wake is on its way */
        wake_locked();
    pthread_mutex_unlock(&purge_mutex);
}

void _ta_purge_thread_exiting(void)
{
    if (!atomic_load_explicit(&purge_running, memory_order_relaxed))
        return;
    purge_forget_parent();
    pthread_mutex_lock(&purge_mutex);
    exit_checks = EXIT_CHECKS;
    wake_locked();
    pthread_mutex_unlock(&purge_mutex);
}

bool _ta_purge_may_start(void)
{
    long long mode = _ta_opt(TA_OPT_PURGE_THREAD);
    if (mode == 0 || (mode == 2 && !_ta_process_has_threads()))
        return false;
    uint64_t failed = atomic_load_explicit(&purge_failed_ms, memory_order_relaxed);
    return failed == 0 || _ta_os_now_ms() - failed >= PURGE_RETRY_CREATE_MS;
}

void _ta_purge_start(void)
{
    purge_forget_parent();
    pthread_mutex_lock(&purge_mutex);
    bool start = !atomic_load(&purge_running);
    if (start) {
        atomic_store(&purge_running, true);
        /* Its first act is a pass: the slabs may have left it work (free
         * pages, remote lists) while no purge thread ran to be woken. */
        purge_pending = true;
    }
    exit_checks = 0;
    pthread_mutex_unlock(&purge_mutex);
    if (!start)
        return;

    /* A normal thread's stack: pressure listeners run on it (a cache's
     * callbacks, Python's among them); it is address space, not memory. */
    if (_ta_os_background_thread(purge_main, (size_t)8 << 20) != 0) {
        uint64_t now = _ta_os_now_ms();
        atomic_store(&purge_failed_ms, now ? now : 1);
        atomic_store(&purge_running, false);
        _ta_log(false, "tensoralloc: no purge thread; the pool ages on allocator calls only\n");
    }
}

bool _ta_purge_thread_running(void)
{
    return atomic_load(&purge_running);
}

/* Fork holds the pass lock (a pass finishes first) and the wake lock. */
void _ta_purge_fork_prepare(void)
{
    pthread_mutex_lock(&pass_mutex);
    pthread_mutex_lock(&purge_mutex);
}

void _ta_purge_fork_parent(void)
{
    pthread_mutex_unlock(&purge_mutex);
    pthread_mutex_unlock(&pass_mutex);
}

/* The child has no purge thread; the next need starts one. The locks and
 * the condition variable are made anew rather than unlocked: glibc's
 * condition variable keeps the parent's waiter (the purge thread) in its
 * state, and a signal in the child would wait for that waiter forever. */
void _ta_purge_fork_child(void)
{
    pthread_mutex_init(&pass_mutex, NULL);
    pthread_mutex_init(&purge_mutex, NULL);
    pthread_cond_init(&purge_cond, NULL);
    /* The watcher's descriptors are the parent's (a trigger lives while
     * one of them is open): the child's thread opens its own. */
    atomic_store(&poll_waits, false);
    _ta_os_pressure_close();
    pressure_fired = 0;
    last_response_ms = 0;
    _ta_pressure_fork_child();
    atomic_store(&purge_running, false);
    purge_pending = false;
    exit_checks = 0;
    __atomic_store_n(&purge_pid, _ta_os_pid(), __ATOMIC_RELAXED);
    atomic_store(&purge_failed_ms, 0);
}
