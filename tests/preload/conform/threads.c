/* SPDX-License-Identifier: MIT */
/*
 * Conformance, threads and fork. What glibc promises (malloc/arena.c's
 * fork handlers; malloc/tst-mallocfork2.c, tst-malloc-fork-deadlock.c,
 * tst-malloc-thread-exit.c): a child forked while other threads allocate
 * can allocate and free at once, in every size, and start threads of its
 * own; blocks outlive the thread that allocated them and any thread may
 * free them; threads that come and go by the hundred leave nothing that
 * breaks the next ones.
 */
#include "conform.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

#define WORKERS 3
#define FORKS 40
#define ROUNDS 40
#define PER_THREAD 8
#define BLOCKS 200

static atomic_bool stop;

static const size_t sizes[] = {8, 24, 100, 1000, 5000, 70 * KiB, 300 * KiB, 3 * MiB};
#define NSIZES (sizeof sizes / sizeof *sizes)

/* The bytes of a block that carry a pattern: enough to see a block given
 * twice or moved, cheap enough for thousands of blocks. */
static size_t head(size_t n)
{
    return n < 4096 ? n : 4096;
}

static void *churn(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *held[16] = {0};
    while (!atomic_load(&stop)) {
        seed = seed * 1103515245 + 12345;
        unsigned slot = (seed >> 8) % 16;
        free(held[slot]);
        held[slot] = malloc(sizes[(seed >> 16) % NSIZES]);
    }
    for (int i = 0; i < 16; i++)
        free(held[i]);
    return NULL;
}

static void *child_thread(void *arg)
{
    (void)arg;
    for (int i = 0; i < 100; i++)
        free(malloc(sizes[i % NSIZES]));
    return (void *)1;
}

/* In the child of a fork: every size, calloc zeroed, a thread; exit 0 if
 * all went well. An alarm ends a child that deadlocks. */
static void child(void)
{
    alarm(20);
    int bad = 0;
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *p = malloc(sizes[i]);
        if (p == NULL) {
            bad++;
            continue;
        }
        fill(p, head(sizes[i]), (unsigned)i);
        unsigned char *z = calloc(1, sizes[i]);
        for (size_t j = 0; z && j < sizes[i]; j += 97)
            bad += z[j] != 0;
        bad += z == NULL || !intact(p, head(sizes[i]), (unsigned)i);
        p = realloc(p, sizes[i] * 2);
        bad += p == NULL;
        free(p);
        free(z);
    }
    pthread_t t;
    void *ret = NULL;
    if (pthread_create(&t, NULL, child_thread, NULL) != 0 || pthread_join(t, &ret) != 0 ||
        ret != (void *)1)
        bad++;
    _exit(bad ? 1 : 0);
}

static void test_fork(void)
{
    pthread_t workers[WORKERS];
    for (uintptr_t i = 0; i < WORKERS; i++)
        pthread_create(&workers[i], NULL, churn, (void *)(i + 1));
    int exited0 = 0, other = 0;
    for (int i = 0; i < FORKS; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0)
            child();
        int status;
        waitpid(pid, &status, 0);
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            exited0++;
        else
            other++;
        free(malloc(sizes[i % NSIZES])); /* the parent goes on too */
    }
    atomic_store(&stop, true);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(workers[i], NULL);
    printf("fork while %d threads allocate: %d children allocated, freed and exited 0, %d "
           "did not\n",
           WORKERS, exited0, other);
}

typedef struct {
    unsigned seed;
    unsigned char *kept[BLOCKS]; /* handed to main */
} work_t;

static void *allocate_and_exit(void *arg)
{
    work_t *w = arg;
    for (int i = 0; i < BLOCKS; i++) {
        size_t n = sizes[(w->seed + (unsigned)i) % NSIZES];
        unsigned char *p = malloc(n);
        if (p)
            fill(p, head(n), w->seed + (unsigned)i);
        if (i % 2)
            free(p); /* freed by its own thread */
        else
            w->kept[i] = p; /* freed by main after this thread is gone */
    }
    return NULL;
}

static void test_thread_exit(void)
{
    static work_t work[PER_THREAD];
    int lost = 0, freed = 0;
    for (int round = 0; round < ROUNDS; round++) {
        pthread_t t[PER_THREAD];
        for (int i = 0; i < PER_THREAD; i++) {
            memset(&work[i], 0, sizeof work[i]);
            work[i].seed = (unsigned)(round * PER_THREAD + i);
            pthread_create(&t[i], NULL, allocate_and_exit, &work[i]);
        }
        for (int i = 0; i < PER_THREAD; i++)
            pthread_join(t[i], NULL);
        for (int i = 0; i < PER_THREAD; i++)
            for (int b = 0; b < BLOCKS; b += 2) {
                size_t n = sizes[(work[i].seed + (unsigned)b) % NSIZES];
                unsigned char *p = work[i].kept[b];
                if (p == NULL || !intact(p, head(n), work[i].seed + (unsigned)b))
                    lost++;
                free(p);
                freed++;
            }
    }
    printf("%d threads in %d rounds: %d blocks freed after their thread exited, %d lost or "
           "changed\n",
           ROUNDS * PER_THREAD, ROUNDS, freed, lost);
}

int main(void)
{
    test_thread_exit();
    test_fork();
    test_thread_exit(); /* and threads still come and go after the forks */
    return 0;
}
