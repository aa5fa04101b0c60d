/* SPDX-License-Identifier: MIT */
/*
 * The file guard. An entry loaded with TA_PAGE_CACHE_MAP is a private
 * mapping of its file: no second copy, no zeroing, but the file must hold
 * still. A write to the file shows in every page the entry has not written
 * itself, and a truncate makes the pages past the new end raise SIGBUS on
 * access, written ones included (the kernel unmaps private copies too, as
 * POSIX asks). So every mapped entry holds a read lease on its file
 * (fcntl(2) F_SETLEASE): before another open for writing or a truncate
 * goes on, the kernel holds it back (up to /proc/sys/fs/lease-break-time,
 * 45 s by default) and signals the lease's owner. The owner is this
 * module's thread, one per process, started with the first mapped entry:
 * it copies each mapping whose lease is breaking into fresh anonymous
 * memory, moves the copy over it (mremap: the tensors' addresses stay),
 * then gives the lease up and the writer goes on. The entry keeps the
 * contents it loaded, now at the cost of its own memory.
 *
 * The copy reads through process_vm_readv, which fails where a plain read
 * would raise SIGBUS: a lease the kernel already took back (the copy came
 * too late) marks the entry broken instead of killing the process. No
 * lock is held across a copy or the report, so a large copy holds up
 * nobody but a stop of that entry, and the report may run any code that
 * does not stop it.
 *
 * A file replaced by rename does not break the lease and needs nothing:
 * the mapping holds the old file. Leases are Linux's (samba and NFS
 * servers use them the same way, to learn of a conflicting open in time).
 */
#include "file_guard.h"
#include "os/os.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t started = PTHREAD_COND_INITIALIZER;
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER; /* a copy ended */
static _ta_file_guard_t *guarded;                      /* every guard started and not stopped */
static int guard_tid;                                  /* the guard thread's id; 0 until it runs */
static int guard_pid; /* the process it runs in (a forked child has none) */
static bool fork_handler;

/* The mapping's contents into anonymous memory at the same address. The
 * writer is held back meanwhile, so the file still holds them, unless the
 * kernel took the lease back first: then the copy comes up short. */
static int copy_out(_ta_file_guard_t *g)
{
    void *copy;
    size_t got = 0;
    int rc = _ta_os_map(g->len, _ta_os_page_size(), &copy);
    if (rc)
        return rc;
    if ((rc = _ta_os_copy_checked(copy, g->map, g->len, &got)) == 0 && got < g->len)
        rc = EFAULT;
    if (rc == 0 && (rc = _ta_os_move(copy, g->len, g->map)) == TA_OS_DEST_LOST)
        g->lost = true;
    if (rc)
        _ta_os_unmap(copy, g->len);
    return rc;
}

/* A guard whose lease is breaking and not yet handled, or NULL. */
static _ta_file_guard_t *next_breaking(void)
{
    for (_ta_file_guard_t *g = guarded; g; g = g->next)
        if (g->fd >= 0 && !_ta_os_lease_held(g->fd))
            return g;
    return NULL;
}

static void *guard_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    guard_tid = _ta_os_thread_tid();
    pthread_cond_broadcast(&started);
    pthread_mutex_unlock(&mu);
    for (;;) {
        /* SIGURG is not queued: breaks that come together are one signal,
         * so every lease is asked whether it is breaking. */
        _ta_os_wait_signal(_ta_os_lease_signal());
        pthread_mutex_lock(&mu);
        _ta_file_guard_t *g;
        while ((g = next_breaking()) != NULL) {
            g->busy = true; /* stop waits: g stays */
            pthread_mutex_unlock(&mu);
            int rc = copy_out(g);
            if (rc)
                atomic_store(&g->broken, true);
            _ta_os_lease_release(g->fd);
            _ta_os_close(g->fd);
            g->fd = -1;
            g->copied(g->arg, g, rc);
            pthread_mutex_lock(&mu);
            g->busy = false;
            pthread_cond_broadcast(&idle);
        }
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

/* The child of a fork has no guard thread (its next mapped entry starts
 * one), and its lock may have been taken by a thread it does not have. The
 * entries it inherited are not its to guard: their leases are on file
 * descriptions it shares with the parent, whose thread the kernel signals,
 * and giving one up would give up the parent's. */
static void fork_child(void)
{
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&started, NULL);
    pthread_cond_init(&idle, NULL);
    guard_tid = 0;
    guarded = NULL;
}

static const char *lease_refused(int rc)
{
    switch (rc) {
    case EAGAIN: return "it is open for writing";
    case EACCES: return "another user's file (leases need its owner or CAP_LEASE)";
    case EINVAL:
        return "its filesystem has no leases, or they are off (/proc/sys/fs/leases-enable)";
    default: return strerror(rc);
    }
}

int _ta_file_guard_start(_ta_file_guard_t *g, char *why, size_t whylen)
{
    int rc = 0;
    pthread_mutex_lock(&mu);
    if (!fork_handler && _ta_os_at_fork(NULL, NULL, fork_child) == 0)
        fork_handler = true;
    if (!fork_handler) {
        rc = ENOMEM;
        snprintf(why, whylen, "no fork handler for the file guard");
    } else if (guard_pid != _ta_os_pid() || guard_tid == 0) {
        guard_tid = 0;
        /* the default stack: the report runs the caller's log function */
        if ((rc = _ta_os_background_thread(guard_main, 0)) != 0)
            snprintf(why, whylen, "no guard thread: %s", strerror(rc));
        while (rc == 0 && guard_tid == 0)
            pthread_cond_wait(&started, &mu);
        guard_pid = rc ? 0 : _ta_os_pid();
    }
    if (rc == 0 && (rc = _ta_os_lease(g->fd, _ta_os_lease_signal(), guard_tid)) != 0)
        snprintf(why, whylen, "no read lease on the file: %s", lease_refused(rc));
    if (rc == 0) {
        g->pid = guard_pid;
        g->busy = false;
        atomic_store(&g->broken, false);
        g->prev = NULL;
        g->next = guarded;
        if (guarded)
            guarded->prev = g;
        guarded = g;
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

void _ta_file_guard_stop(_ta_file_guard_t *g)
{
    if (g->pid != _ta_os_pid()) { /* inherited across fork: the parent's lease */
        if (g->fd >= 0)
            _ta_os_close(g->fd);
        g->fd = -1;
        return;
    }
    pthread_mutex_lock(&mu);
    while (g->busy)
        pthread_cond_wait(&idle, &mu);
    if (g->prev)
        g->prev->next = g->next;
    else
        guarded = g->next;
    if (g->next)
        g->next->prev = g->prev;
    g->prev = g->next = NULL;
    pthread_mutex_unlock(&mu);
    if (g->fd >= 0) {
        _ta_os_lease_release(g->fd);
        _ta_os_close(g->fd);
        g->fd = -1;
    }
}
