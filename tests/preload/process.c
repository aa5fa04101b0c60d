/* SPDX-License-Identifier: MIT */
/*
 * Process life under the preload library: fork from a process whose other
 * threads keep allocating (the child must allocate and exit cleanly),
 * posix_spawn and exec, dlopen of a library that allocates in its
 * constructor, and threads that exit while holding cached blocks.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static atomic_int stop;

static void *churn(void *arg)
{
    unsigned s = (unsigned)(uintptr_t)arg;
    void *keep[64] = {0};
    while (!atomic_load(&stop)) {
        s = s * 1103515245 + 12345;
        int k = (int)(s >> 8) % 64;
        free(keep[k]);
        size_t n = (s >> 4) % 4 == 0 ? (size_t)(s % (3 << 20)) + 1 : (s >> 3) % 4000 + 1;
        keep[k] = malloc(n);
        memset(keep[k], 1, n < 64 ? n : 64);
    }
    for (int k = 0; k < 64; k++)
        free(keep[k]);
    return NULL;
}

static int forks_under_load(void)
{
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, churn, (void *)(uintptr_t)(i + 7));
    int ok = 0;
    for (int i = 0; i < 50; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            /* the child allocates on both paths, then exits normally */
            char *small = malloc(100), *big = malloc(5 << 20);
            memset(big, 2, 5 << 20);
            free(small);
            free(big);
            pthread_t ct;
            pthread_create(&ct, NULL, churn, (void *)(uintptr_t)99);
            atomic_store(&stop, 1);
            pthread_join(ct, NULL);
            exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    atomic_store(&stop, 0);
    return ok;
}

static int spawn_and_exec(void)
{
    pid_t pid;
    char *argv[] = {"/bin/sh", "-c", "echo spawned >/dev/null", NULL};
    if (posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ) != 0)
        return 0;
    int status, ok = 0;
    waitpid(pid, &status, 0);
    ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", "exit 0", (char *)NULL);
        _exit(127);
    }
    waitpid(pid, &status, 0);
    ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    return ok;
}

static int dlopen_allocating(const char *path)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        printf("dlopen failed: %s\n", dlerror());
        return 0;
    }
    char *(*make)(size_t);
    const char *(*hello)(void);
    *(void **)&make = dlsym(h, "dlalloc_make"); /* POSIX's blessed idiom */
    *(void **)&hello = dlsym(h, "dlalloc_hello");
    char *s = make(1 << 20);
    int ok = strlen(s) == (1 << 20) - 1 && strstr(hello(), "constructor") != NULL;
    free(s); /* freed here, allocated in the library */
    dlclose(h);
    return ok;
}

static void *exits_with_cache(void *arg)
{
    (void)arg;
    for (int i = 0; i < 1000; i++)
        free(malloc((size_t)i * 13 + 1));
    return malloc(1000); /* handed to the joiner */
}

int main(int argc, char **argv)
{
    int forks = forks_under_load();
    int spawns = spawn_and_exec();
    int dl = argc > 1 ? dlopen_allocating(argv[1]) : -1;
    int threads = 0;
    for (int i = 0; i < 100; i++) {
        pthread_t t;
        void *ret;
        pthread_create(&t, NULL, exits_with_cache, NULL);
        pthread_join(t, &ret);
        threads += ret != NULL;
        free(ret);
    }
    printf("process: forks %d/50 spawns %d/2 dlopen %d threads %d/100\n", forks, spawns, dl,
           threads);
    return !(forks == 50 && spawns == 2 && dl == 1 && threads == 100);
}
