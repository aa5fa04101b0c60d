/* SPDX-License-Identifier: MIT */
/*
 * Threads that make a process's first allocations all at once must all see
 * the options read from the environment. Each round forks a child that has
 * never called the library (so its set-up has not run), starts threads
 * that wait on a barrier and then allocate together, and checks that a
 * block under TENSORALLOC_THRESHOLD went to the small path in every
 * thread. Before the fix, a thread that lost the race to initialise went
 * on with options still zero (threshold 0: everything large). Run also
 * under ThreadSanitizer by tools/run-tests. Output is TAP.
 */
#include "tensoralloc.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 8
#define ROUNDS 200
#define BLOCK ((size_t)512 << 10) /* under the 1 MiB threshold set below */

static pthread_barrier_t start;
static void *blocks[THREADS];

static void *first_allocation(void *arg)
{
    size_t i = (size_t)arg;
    pthread_barrier_wait(&start);
    blocks[i] = ta_malloc(BLOCK);
    return NULL;
}

/* In the child: 0 when every block is small and usable, 1 otherwise. */
static int one_round(void)
{
    pthread_t tid[THREADS];
    pthread_barrier_init(&start, NULL, THREADS);
    for (size_t i = 0; i < THREADS; i++)
        if (pthread_create(&tid[i], NULL, first_allocation, (void *)i) != 0)
            return 1;
    for (size_t i = 0; i < THREADS; i++)
        pthread_join(tid[i], NULL);
    ta_stats_t st = {.size = sizeof st};
    if (ta_stats_get(&st) != 0)
        return 1;
    int bad = st.large_live_count != 0;
    for (size_t i = 0; i < THREADS; i++) {
        if (blocks[i] == NULL || ta_usable_size(blocks[i]) < BLOCK)
            bad = 1;
        ta_free(blocks[i]);
    }
    if (bad)
        fprintf(stderr, "# %llu of %d first blocks went to the large path\n",
                (unsigned long long)st.large_live_count, THREADS);
    return bad;
}

int main(void)
{
    /* Set before any allocation: the library reads the environment once. */
    setenv("TENSORALLOC_THRESHOLD", "1M", 1);
    int failed_rounds = 0;
    for (int r = 0; r < ROUNDS; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0)
            _exit(one_round());
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed_rounds++;
    }
    printf("1..1\n%s 1 - %d rounds of %d threads allocating first: options seen by all "
           "(%d rounds failed)\n",
           failed_rounds ? "not ok" : "ok", ROUNDS, THREADS, failed_rounds);
    return failed_rounds != 0;
}
