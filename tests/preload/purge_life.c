/* SPDX-License-Identifier: MIT */
/*
 * The purge thread's life under the preload library, where glibc itself
 * calls malloc and free (docs/reliability.md, "What may happen under
 * malloc and free"). Each case runs in a fresh child with a deadline, so
 * a hang fails that case by name. This process never starts a thread:
 * its children start single-threaded. Output is TAP.
 *
 * 1. Threads that exit while others start: glibc frees the exited
 *    threads' TLS vectors holding its stack-cache lock, and the first
 *    such free that needs the purge thread used to create it there (a
 *    deadlock on that lock).
 * 2. A free that needs the purge thread starts no thread; the next
 *    allocation of a threaded process does (and a single-threaded one
 *    never gets one).
 * 3. fork from a signal handler while the main loop forks and allocates,
 *    in a single-threaded program (glibc serves it only there): no hang,
 *    and the program is still single-threaded at the end.
 * 4. main ends with pthread_exit while the purge thread runs: the process
 *    ends (glibc ends it when its last thread ends).
 * 5. A child forked by a non-main thread after the purge thread ran
 *    starts and joins a thread, then its thread returns: it ends.
 * 6. _Fork (no fork handlers) in a process whose purge thread waits: the
 *    child allocates, frees and wakes without hanging.
 * 7. main ends with pthread_exit and the last thread left never allocated
 *    (no key destructor of ours runs when it ends): the process ends.
 */
#define _GNU_SOURCE
#include "tensoralloc.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)

/* Found in the preload library when it is loaded (main checks). */
#pragma weak ta_option_set
#pragma weak ta_version

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* The number of threads, counted without allocating (opendir would). */
static int task_count(void)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return -1;
    char buf[4096];
    int n = 0;
    for (long got; (got = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0;)
        for (long off = 0; off < got;) {
            const char *name = buf + off + 19; /* d_ino, d_off, d_reclen, d_type */
            unsigned short reclen;
            memcpy(&reclen, buf + off + 16, sizeof reclen);
            n += name[0] != '.';
            off += reclen;
        }
    close(fd);
    return n;
}

/* A large block freed into the pool: a deadline for the purge thread. */
static void pool_one(void)
{
    char *p = malloc(8 * MiB);
    if (p == NULL)
        _exit(3);
    memset(p, 1, 8 * MiB);
    free(p);
}

/* Runs fn in a child; ok if it exits 0 within seconds (killed otherwise). */
static bool in_child(int (*fn)(void), int seconds, const char *name)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return false;
    if (pid == 0)
        _exit(fn());
    int status = 0;
    for (int i = 0; i < seconds * 100; i++) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                return true;
            printf("# %s: child %s %d\n", name, WIFEXITED(status) ? "exited" : "killed by signal",
                   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            return false;
        }
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    printf("# %s: hung (no exit within %d s), killed\n", name, seconds);
    return false;
}

/* ---- 1 ----------------------------------------------------------------- */

static void *short_thread(void *arg)
{
    void *p = malloc(64 + (size_t)arg % 512);
    free(p);
    return NULL;
}

/* Detached threads with glibc's default 8 MiB stacks, 8 alive at a time:
 * past 40 MiB of cached stacks, each exit frees a vector under the lock. */
static int threads_exit_while_others_start(void)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < 400; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, short_thread, (void *)(size_t)i) != 0)
            return 2;
        if (i % 8 == 7)
            sleep_ms(1);
    }
    sleep_ms(50);
    return 0;
}

static bool thread_exit_rounds(void)
{
    for (int round = 0; round < 20; round++)
        if (!in_child(threads_exit_while_others_start, 20, "threads exiting while others start"))
            return false;
    return true;
}

/* ---- 2 ----------------------------------------------------------------- */

static void *idle_thread(void *arg)
{
    sleep_ms(1500);
    return arg;
}

static int free_starts_no_thread(void)
{
    /* The purge thread is held off while the process becomes threaded
     * (pthread_create's own allocations would start it). */
    if (ta_option_set(TA_OPT_PURGE_THREAD, 0) != 0)
        return 2;
    char *block = malloc(8 * MiB);
    if (block == NULL)
        return 2;
    memset(block, 1, 8 * MiB);
    pthread_t t;
    if (pthread_create(&t, NULL, idle_thread, NULL) != 0)
        return 2;
    ta_option_set(TA_OPT_PURGE_THREAD, 2); /* auto, in a threaded process: it may run */
    int before = task_count();
    free(block); /* the pool's deadline needs the purge thread */
    int after_free = task_count();
    free(malloc(300 << 10)); /* an allocation starts it */
    int after_alloc = task_count();
    pthread_join(t, NULL);
    if (after_free != before || after_alloc != before + 1) {
        printf("# threads: %d before, %d after the free, %d after the next allocation\n", before,
               after_free, after_alloc);
        return 1;
    }
    return 0;
}

/* ---- 3 ----------------------------------------------------------------- */

static volatile sig_atomic_t handler_forks;

static void fork_in_handler(int sig)
{
    (void)sig;
    int saved = errno;
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    if (pid > 0) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        handler_forks++;
    }
    errno = saved;
}

static int fork_inside_fork(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fork_in_handler;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = {{0, 5000}, {0, 5000}};
    setitimer(ITIMER_REAL, &every, NULL);
    for (int i = 0; i < 200; i++) {
        free(malloc(16 + (size_t)i % 4000));
        pool_one();
        pid_t pid = fork();
        if (pid == 0) {
            free(malloc(100));
            _exit(0);
        }
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 2;
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    if (task_count() != 1) {
        printf("# a single-threaded program has %d threads\n", task_count());
        return 3;
    }
    printf("# %d forks from the signal handler\n", (int)handler_forks);
    return handler_forks > 0 ? 0 : 4;
}

/* ---- 4 ----------------------------------------------------------------- */

static void *nothing(void *arg)
{
    return arg;
}

/* Threaded, with the purge thread started and holding a deadline. */
static bool purge_thread_running(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, nothing, NULL) != 0 || pthread_join(t, NULL) != 0)
        return false;
    pool_one();
    free(malloc(300 << 10));
    /* The joined thread can stay in /proc/self/task a moment after the
     * join returns (the kernel clears its tid before it is reaped): on a
     * loaded machine a single look saw 3 tasks (case 6 failed once in a
     * parallel test run). */
    for (int i = 0; i < 100; i++) {
        if (task_count() == 2)
            return true;
        sleep_ms(10);
    }
    return false;
}

static int main_thread_exits(void)
{
    if (!purge_thread_running())
        return 2;
    pthread_exit(NULL); /* the process must end: exit status 0 */
}

/* ---- 5 ----------------------------------------------------------------- */

static void *fork_and_wait(void *arg)
{
    (void)arg;
    pid_t pid = fork();
    if (pid == 0) {
        /* The child's only thread: starts one, joins it, ends as a thread. */
        pthread_t t;
        pool_one();
        if (pthread_create(&t, NULL, nothing, NULL) == 0)
            pthread_join(t, NULL);
        free(malloc(300 << 10));
        return NULL;
    }
    for (int i = 0; i < 1000; i++) { /* 10 s */
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return (void *)(size_t)(WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1);
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    printf("# the child forked by a thread did not end after its last thread\n");
    return (void *)1;
}

static int fork_from_thread(void)
{
    if (!purge_thread_running())
        return 2;
    pthread_t t;
    void *rc = (void *)1;
    if (pthread_create(&t, NULL, fork_and_wait, NULL) != 0 || pthread_join(t, &rc) != 0)
        return 3;
    return rc == NULL ? 0 : 1;
}

/* ---- 7 ----------------------------------------------------------------- */

static void *sleeps_without_allocating(void *arg)
{
    sleep_ms(6000); /* past the looks that main's exit sets off (4.3 s) */
    return arg;
}

/* The last thread never allocated: no key destructor tells the purge
 * thread of its end. */
static int last_thread_never_allocated(void)
{
    pthread_t t;
    if (!purge_thread_running() ||
        pthread_create(&t, NULL, sleeps_without_allocating, NULL) != 0)
        return 2;
    pthread_exit(NULL);
}

/* ---- 6 ----------------------------------------------------------------- */

static int underscore_fork(void)
{
    if (!purge_thread_running())
        return 2;
    sleep_ms(1200); /* the pool empties; the purge thread lingers or exits */
    pool_one();     /* it waits on its condition variable again */
    sleep_ms(20);
    pid_t pid = _Fork();
    if (pid == 0) {
        for (int i = 0; i < 20; i++) {
            pool_one();
            free(malloc(300 << 10));
        }
        _exit(0);
    }
    for (int i = 0; i < 1000; i++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    printf("# the _Fork child hung\n");
    return 1;
}

int main(void)
{
    if (&ta_version == NULL) {
        printf("1..0 # SKIP not run under the preload library\n");
        return 0;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct {
        const char *name;
        bool ok;
    } r[7];
    int n = 0;
    printf("1..7\n");
#define CASE(label, expr)                                                                          \
    do {                                                                                           \
        r[n].name = label;                                                                         \
        r[n].ok = (expr);                                                                          \
        printf("%s %d - %s\n", r[n].ok ? "ok" : "not ok", n + 1, label);                          \
        n++;                                                                                       \
    } while (0)
    CASE("threads exiting while others start, 20 fresh processes", thread_exit_rounds());
    CASE("a free that needs the purge thread starts no thread",
         in_child(free_starts_no_thread, 20, "free starts no thread"));
    CASE("fork from a signal handler inside fork, single-threaded",
         in_child(fork_inside_fork, 60, "fork inside fork"));
    CASE("main's pthread_exit ends the process while the purge thread runs",
         in_child(main_thread_exits, 10, "pthread_exit from main"));
    CASE("a child forked by a thread ends with its last thread",
         in_child(fork_from_thread, 20, "fork from a thread"));
    CASE("_Fork child of a process whose purge thread waits",
         in_child(underscore_fork, 20, "_Fork"));
    CASE("the process ends when its last thread never allocated",
         in_child(last_thread_never_allocated, 20, "last thread never allocated"));
    int failed = 0;
    for (int i = 0; i < n; i++)
        failed += !r[i].ok;
    return failed != 0;
}
