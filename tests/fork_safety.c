/* SPDX-License-Identifier: MIT */
/*
 * Forked children must be able to use the allocator: the cases that
 * pre-forking servers, multiprocessing and DataLoader workers create.
 *
 * 1. Fork while the purge thread is idle (waiting for work), then wake it
 *    many times in the child. Before the fix, the child's second or third
 *    wake blocked forever in pthread_cond_signal (glibc kept the parent's
 *    waiter in the condition variable's state).
 * 2. Fork from a thread while other threads allocate and free large and
 *    small blocks, 300 rounds; each child allocates, frees and wakes the
 *    purge thread.
 * Every child has an alarm: a hang is a failure, not a stuck test. Output
 * is TAP. Run also under ThreadSanitizer by tools/run-tests.
 */
#include "tensoralloc.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Frees a large block into the pool (which wakes the purge thread), then
 * lets the purge thread empty the pool and go back to waiting. */
static int wake_purge_cycle(long pause_ms)
{
    char *p = ta_malloc(8 * MiB);
    if (p == NULL)
        return 1;
    memset(p, 1, 8 * MiB);
    ta_free(p);
    sleep_ms(pause_ms);
    return 0;
}

/* 0 if the child exited 0 within its alarm; prints why not otherwise. */
static int reap(pid_t pid, const char *what)
{
    int status;
    if (waitpid(pid, &status, 0) != pid)
        return 1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    if (WIFSIGNALED(status))
        printf("# %s: child killed by signal %d%s\n", what, WTERMSIG(status),
               WTERMSIG(status) == SIGALRM ? " (hung)" : "");
    else
        printf("# %s: child exited %d\n", what, WEXITSTATUS(status));
    return 1;
}

static int fork_after_idle(void)
{
    if (wake_purge_cycle(300) != 0) /* the purge thread runs, empties the pool, waits */
        return 1;
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        alarm(20);
        for (int i = 0; i < 40; i++)
            if (wake_purge_cycle(i % 4 == 0 ? 150 : 30) != 0)
                _exit(2);
        _exit(0);
    }
    return reap(pid, "fork after idle");
}

/* ---- fork under load -------------------------------------------------------- */

#define WORKERS 3
#define ROUNDS 300

static atomic_bool stop;

static void *churn(void *arg)
{
    unsigned seed = (unsigned)(size_t)arg;
    void *slots[64] = {0};
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        seed = seed * 1103515245u + 12345u;
        unsigned i = (seed >> 8) % 64;
        ta_free(slots[i]);
        size_t size = (seed >> 16) % 8 == 0 ? (size_t)(1 + (seed >> 20) % 6) * MiB
                                            : (size_t)(16 + (seed >> 12) % 4000);
        slots[i] = ta_malloc(size);
        if (slots[i])
            memset(slots[i], (int)i, size < 4096 ? size : 4096);
    }
    for (int i = 0; i < 64; i++)
        ta_free(slots[i]);
    return NULL;
}

static int child_work(void)
{
    void *small[256];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 256; i++)
            if ((small[i] = ta_malloc((size_t)(16 + i * 24))) == NULL)
                return 1;
        char *big = ta_malloc(3 * MiB);
        if (big == NULL)
            return 1;
        big[0] = big[3 * MiB - 1] = 1;
        ta_free(big); /* into the pool: wakes (or starts) the purge thread */
        for (int i = 0; i < 256; i++)
            ta_free(small[i]);
        ta_trim();
    }
    return 0;
}

static void *forker(void *arg)
{
    int *failures = arg;
    for (int r = 0; r < ROUNDS; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            (*failures)++;
            break;
        }
        if (pid == 0) {
            alarm(20);
            _exit(child_work());
        }
        if (reap(pid, "fork under load") != 0)
            (*failures)++;
    }
    return NULL;
}

static int fork_under_load(void)
{
    pthread_t workers[WORKERS], f;
    int failures = 0;
    for (size_t i = 0; i < WORKERS; i++)
        if (pthread_create(&workers[i], NULL, churn, (void *)(i + 1)) != 0)
            return 1;
    if (pthread_create(&f, NULL, forker, &failures) != 0)
        return 1;
    pthread_join(f, NULL);
    atomic_store(&stop, true);
    for (size_t i = 0; i < WORKERS; i++)
        pthread_join(workers[i], NULL);
    if (failures)
        printf("# %d of %d children failed\n", failures, ROUNDS);
    return failures != 0;
}

int main(void)
{
    /* Short ages, so that the purge thread sleeps and wakes many times. */
    ta_option_set(TA_OPT_RETAIN_MS, 20);
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("1..2\n");
    int bad1 = fork_after_idle();
    printf("%sok 1 - a child forked while the purge thread waited wakes it 40 times\n",
           bad1 ? "not " : "");
    int bad2 = fork_under_load();
    printf("%sok 2 - %d children forked while %d threads churn allocate and free\n",
           bad2 ? "not " : "", ROUNDS, WORKERS);
    return bad1 || bad2;
}
