/* SPDX-License-Identifier: MIT */
/*
 * A program with known allocator calls, for the tracer's tests. The main
 * thread marks itself with malloc(777); worker A makes blocks and hands one
 * to worker B, which frees it (a cross-thread free). With "fork", the
 * process also forks a child that calls malloc(4242).
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void *volatile handed;
static sem_t ready;

static void *worker_a(void *arg)
{
    (void)arg;
    char *p1 = malloc(100);
    char *p2 = calloc(10, 20);
    char *p3 = realloc(p1, 5000);
    void *p4 = NULL;
    if (posix_memalign(&p4, 64, 300000) != 0)
        abort();
    memset(p3, 1, 5000);
    handed = p2;
    sem_post(&ready);
    free(p3);
    free(p4);
    return NULL;
}

static void *worker_b(void *arg)
{
    (void)arg;
    sem_wait(&ready);
    free(handed);
    void *p5 = aligned_alloc(4096, 8192);
    free(p5);
    return NULL;
}

int main(int argc, char **argv)
{
    void *marker = malloc(777);
    free(marker);
    sem_init(&ready, 0, 0);
    pthread_t a, b;
    pthread_create(&a, NULL, worker_a, NULL);
    pthread_join(a, NULL); /* A's calls all come first: a stable order */
    pthread_create(&b, NULL, worker_b, NULL);
    pthread_join(b, NULL);
    if (argc > 1 && strcmp(argv[1], "fork") == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            void *c = malloc(4242);
            free(c);
            exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 1;
        void *after = malloc(4343);
        free(after);
    }
    puts("done");
    return 0;
}
