/* SPDX-License-Identifier: MIT */
/*
 * The slabs' per-heap pages_lock across fork (lib/core/slab.c): the owner's
 * span paths take it, and the purge thread takes it to give back the free
 * pages of an owner gone idle. Each case runs in a fresh process of this
 * program with a deadline, so a hang is a failure with a name. The
 * windows are microseconds long; an madvise that sleeps for a chosen
 * thread (this program's own, which the library's calls reach first)
 * holds them open. TAP output.
 *
 *   1. fork while ta_trim tidies an abandoned heap (tidy_lock held across
 *      its madvise): neither may wait for the other;
 *   2. a fork child whose other thread held its heap's pages_lock at fork
 *      ends when its last thread does (the purge thread does not wait for
 *      that lock for ever);
 *   3. a _Fork child (no fork handlers) whose parent's purge thread held
 *      the child's own heap's pages_lock can still allocate;
 *   4. the same when the child's own purge thread reaches that heap first
 *      (it must leave the parent's mark for the owner to take over).
 */
#define _GNU_SOURCE
#include <tensoralloc.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static __thread int slow_here;  /* this thread's next madvise sleeps */
static atomic_int slow_not_tid; /* ... or any thread's but this one's (0: off) */
static atomic_int slept;
static int slow_ms;

int madvise(void *addr, size_t len, int advice)
{
    int not_tid = atomic_load(&slow_not_tid);
    bool slow = slow_here || (not_tid != 0 && (int)syscall(SYS_gettid) != not_tid);
    if (slow && !atomic_exchange(&slept, 1))
        usleep((useconds_t)slow_ms * 1000);
    return (int)syscall(SYS_madvise, addr, len, advice);
}

static void wait_for_sleep(void)
{
    for (int i = 0; i < 5000 && !atomic_load(&slept); i++)
        usleep(1000);
}

/* ---- 1 ---- */
static pthread_barrier_t ready, go;
static void *blocks[4];

static void *kept_block;

static void *holder_of_a_big_block(void *arg)
{
    (void)arg;
    blocks[0] = ta_malloc(200000); /* a slab span of several pages */
    kept_block = ta_malloc(64); /* its segment stays: the tidy purges, not unmaps */
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    return NULL;
}

static void *holder_of_small_blocks(void *arg)
{
    (void)arg;
    for (int i = 1; i < 4; i++)
        blocks[i] = ta_malloc(64);
    pthread_barrier_wait(&ready);
    return NULL;
}

static void *trimmer(void *arg)
{
    (void)arg;
    slow_here = 1; /* its madvise under tidy_lock is slow */
    ta_trim();
    return NULL;
}

static int fork_while_trim_tidies(void)
{
    slow_ms = 500;
    void *q = ta_malloc(16);
    ta_free(q);
    usleep(300000);
    pthread_t big, small, trim;
    pthread_barrier_init(&ready, NULL, 3);
    pthread_barrier_init(&go, NULL, 2);
    pthread_create(&big, NULL, holder_of_a_big_block, NULL);
    pthread_create(&small, NULL, holder_of_small_blocks, NULL);
    pthread_barrier_wait(&ready);
    pthread_join(small, NULL);
    pthread_barrier_wait(&go);
    pthread_join(big, NULL); /* both heaps abandoned, holding blocks */
    for (int i = 0; i < 4; i++)
        ta_free(blocks[i]); /* frees into abandoned heaps: the tidy releases their spans */
    pthread_create(&trim, NULL, trimmer, NULL);
    wait_for_sleep();
    if (!atomic_load(&slept)) {
        printf("# the trimmer never reached its madvise: the case did not happen\n");
        return 1;
    }
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    waitpid(pid, NULL, 0);
    pthread_join(trim, NULL);
    ta_free(kept_block);
    return 0;
}

/* ---- 2 ---- */
static void *owner_held_at_fork(void *arg)
{
    (void)arg;
    enum { BIG = 64 }; /* 14 MiB: past the 8 MiB of free pages a heap keeps */
    void *m[10], *big[BIG];
    for (int i = 0; i < 10; i++)
        m[i] = ta_malloc(24000);
    for (int i = 0; i < 5; i++)
        ta_free(m[i]); /* a span released: its pages wait */
    for (int i = 0; i < BIG; i++)
        big[i] = ta_malloc(200000);
    slow_here = 1;
    for (int i = 0; i < BIG; i++)
        ta_free(big[i]); /* past 8 MiB, a release purges: madvise under pages_lock */
    slow_here = 0;
    for (int i = 5; i < 10; i++)
        ta_free(m[i]);
    return NULL;
}

static int fork_child_ends(void)
{
    slow_ms = 1500;
    pthread_t t;
    pthread_create(&t, NULL, owner_held_at_fork, NULL);
    wait_for_sleep();
    if (!atomic_load(&slept)) {
        printf("# the owner never reached its madvise: the case did not happen\n");
        return 1;
    }
    usleep(50000);
    pid_t pid = fork();
    if (pid == 0) {
        void *q = ta_malloc(16); /* starts the child's purge thread */
        ta_free(q);
        usleep(300000);
        pthread_exit(NULL); /* the process ends once the purge thread is alone */
    }
    pthread_join(t, NULL);
    for (int i = 0; i < 100; i++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return 0;
        usleep(100000);
    }
    printf("# the child did not end within 10 s of its last thread's exit\n");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 1;
}

/* ---- 3 ---- */
static void *idle_thread(void *arg)
{
    (void)arg;
    pause();
    return NULL;
}

static int underscore_fork_child_allocates(void)
{
    slow_ms = 1000;
    pthread_t t;
    pthread_create(&t, NULL, idle_thread, NULL);
    void *m[10];
    for (int i = 0; i < 10; i++)
        m[i] = ta_malloc(24000);
    atomic_store(&slow_not_tid, (int)syscall(SYS_gettid)); /* the purge thread's madvise */
    for (int i = 0; i < 5; i++)
        ta_free(m[i]); /* a span released: its pages wait for the purge thread */
    wait_for_sleep();
    if (!atomic_load(&slept)) {
        printf("# the purge thread never gave this heap's pages back\n");
        return 1;
    }
    pid_t pid = _Fork();
    if (pid == 0) {
        alarm(5);
        void *n[20];
        for (int i = 0; i < 20; i++)
            n[i] = ta_malloc(24000); /* new spans: pages_lock */
        for (int i = 0; i < 20; i++)
            ta_free(n[i]);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) {
        printf("# the _Fork child %s\n", WTERMSIG(status) == SIGALRM
                                             ? "hung (killed by its 5 s alarm)"
                                             : "was killed");
        return 1;
    }
    return WEXITSTATUS(status);
}

/* ---- 4 ---- */
static void *leaver_block;

static void *leaver(void *arg)
{
    (void)arg;
    leaver_block = ta_malloc(64); /* its heap is abandoned holding this */
    return NULL;
}

static int underscore_fork_child_purge_thread_first(void)
{
    slow_ms = 3000;
    pthread_t t, x;
    void *keep = ta_malloc(2000); /* a current span with room for the child's first malloc */
    pthread_create(&t, NULL, idle_thread, NULL);
    pthread_create(&x, NULL, leaver, NULL);
    pthread_join(x, NULL);
    void *m[10];
    for (int i = 0; i < 10; i++)
        m[i] = ta_malloc(24000);
    usleep(200000);
    atomic_store(&slow_not_tid, (int)syscall(SYS_gettid));
    for (int i = 0; i < 5; i++)
        ta_free(m[i]);
    wait_for_sleep();
    if (!atomic_load(&slept)) {
        printf("# the purge thread never gave this heap's pages back\n");
        return 1;
    }
    pid_t pid = _Fork();
    if (pid == 0) {
        alarm(5);
        ta_free(leaver_block);      /* into the abandoned heap: wakes purge work */
        void *q = ta_malloc(2000);  /* no new span: starts the child's purge thread */
        usleep(600000);             /* which looks at this heap first */
        void *n[20];
        for (int i = 0; i < 20; i++)
            n[i] = ta_malloc(24000); /* new spans: pages_lock */
        for (int i = 0; i < 20; i++)
            ta_free(n[i]);
        ta_free(q);
        _exit(0);
    }
    ta_free(keep);
    int status;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) {
        printf("# the _Fork child %s\n", WTERMSIG(status) == SIGALRM
                                             ? "hung (killed by its 5 s alarm)"
                                             : "was killed");
        return 1;
    }
    return WEXITSTATUS(status);
}

static const struct {
    const char *name;
    int (*run)(void);
} cases[] = {
    {"fork while ta_trim tidies an abandoned heap: no deadlock", fork_while_trim_tidies},
    {"a fork child whose other thread held a pages_lock ends", fork_child_ends},
    {"a _Fork child whose heap's pages_lock the purge thread held allocates",
     underscore_fork_child_allocates},
    {"... also when the child's purge thread reaches that heap first",
     underscore_fork_child_purge_thread_first},
};

int main(int argc, char **argv)
{
    int n = (int)(sizeof cases / sizeof cases[0]);
    if (argc == 2) {
        alarm(30);
        return cases[atoi(argv[1])].run();
    }
    printf("1..%d\n", n);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        char arg[16];
        snprintf(arg, sizeof arg, "%d", i);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            execl("/proc/self/exe", argv[0], arg, (char *)NULL);
            _exit(127);
        }
        int status;
        waitpid(pid, &status, 0);
        bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok && WIFSIGNALED(status))
            printf("# killed by signal %d%s\n", WTERMSIG(status),
                   WTERMSIG(status) == SIGALRM ? " (its 30 s alarm: a hang)" : "");
        printf("%s %d - %s\n", ok ? "ok" : "not ok", i + 1, cases[i].name);
        failed += !ok;
    }
    return failed != 0;
}
