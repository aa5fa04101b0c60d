/* SPDX-License-Identifier: MIT */
/*
 * small-bench: the general small-object programs every preloaded process
 * also runs, in four modes (issue 12). Reports time, operations (mallocs
 * plus frees) per second and peak RSS.
 *
 *   small_bench simple  [ops]             one thread; random 16 B-1 KiB sizes; a working set
 *                                         of 2048 slots, each op frees a random slot and
 *                                         refills it (glibc's bench-malloc-simple)
 *   small_bench thread  [threads] [ops]   the same in every thread, each on its own
 *                                         objects (glibc's bench-malloc-thread)
 *   small_bench prodcons [ops]            one thread allocates 16 B-512 B objects, another
 *                                         frees them (xmalloc-style producer/consumer)
 *   small_bench larson  [threads] [ops]   server churn (after Larson and Krishnan): each
 *                                         thread replaces random objects of a shared array
 *                                         of 8192 slots per thread, so most objects are
 *                                         freed by another thread than their allocator
 *   small_bench pingpong [size] [ops] [n] one thread allocates a block of size bytes, writes
 *                                         a byte in each 4 KiB, frees it, and again (a
 *                                         scratch buffer; the block is its class's only one);
 *                                         with n, two such threads, each pausing 20 ms every n
 *                                         rounds and checking each block (bursts: the purge
 *                                         thread, which starts in a threaded process, takes
 *                                         the parked span in the pauses; the ThreadSanitizer
 *                                         step)
 */
#include "bench.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

static long total_ops_target = 20000000;
static int nthreads = 2;
static atomic_long total_ops;

static size_t small_size(uint64_t *s, size_t max)
{
    /* Mostly tiny, some bigger: a roughly geometric mix as real programs show. */
    uint64_t r = rng_next(s);
    size_t cap = (r & 7) == 0 ? max : (r & 1) ? 64 : 256;
    return 16 + (size_t)(r >> 16) % (cap - 15);
}

/* ---- simple and thread --------------------------------------------------- */

enum { SLOTS = 2048 };

static void *own_objects(void *arg)
{
    uint64_t s = (uint64_t)(uintptr_t)arg * 7919 + 1;
    long ops = total_ops_target / nthreads;
    void **slot = calloc(SLOTS, sizeof *slot);
    for (long i = 0; i < ops; i++) {
        size_t k = (size_t)(rng_next(&s) % SLOTS);
        b_free(slot[k]);
        size_t n = small_size(&s, 1024);
        slot[k] = b_malloc(n);
        *(volatile char *)slot[k] = (char)n;
    }
    for (int k = 0; k < SLOTS; k++)
        b_free(slot[k]);
    free(slot);
    atomic_fetch_add(&total_ops, 2 * ops);
    return NULL;
}

/* ---- prodcons: a single-producer, single-consumer ring of batches ------- */

enum { BATCH = 64, RING = 256 };

static void *ring[RING][BATCH];
static atomic_size_t ring_head, ring_tail;

static void *producer(void *arg)
{
    (void)arg;
    uint64_t s = 42;
    long batches = total_ops_target / 2 / BATCH;
    for (long b = 0; b < batches; b++) {
        size_t tail = atomic_load_explicit(&ring_tail, memory_order_relaxed);
        while (tail - atomic_load_explicit(&ring_head, memory_order_acquire) >= RING)
            ;
        void **items = ring[tail % RING];
        for (int i = 0; i < BATCH; i++) {
            items[i] = b_malloc(small_size(&s, 512));
            *(volatile char *)items[i] = 1;
        }
        atomic_store_explicit(&ring_tail, tail + 1, memory_order_release);
    }
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    long batches = total_ops_target / 2 / BATCH;
    for (long b = 0; b < batches; b++) {
        size_t head = atomic_load_explicit(&ring_head, memory_order_relaxed);
        while (head == atomic_load_explicit(&ring_tail, memory_order_acquire))
            ;
        void **items = ring[head % RING];
        for (int i = 0; i < BATCH; i++)
            b_free(items[i]);
        atomic_store_explicit(&ring_head, head + 1, memory_order_release);
    }
    atomic_fetch_add(&total_ops, 2 * batches * BATCH);
    return NULL;
}

/* ---- larson: objects handed around through a shared array --------------- */

enum { LARSON_SLOTS = 8192 };
static _Atomic(void *) *shared;

static void *larson_worker(void *arg)
{
    uint64_t s = (uint64_t)(uintptr_t)arg * 104729 + 3;
    long ops = total_ops_target / 2 / nthreads;
    size_t n_slots = (size_t)LARSON_SLOTS * (size_t)nthreads;
    for (long i = 0; i < ops; i++) {
        size_t k = (size_t)(rng_next(&s) % n_slots);
        void *p = b_malloc(small_size(&s, 512));
        *(volatile char *)p = 1;
        b_free(atomic_exchange_explicit(&shared[k], p, memory_order_acq_rel));
    }
    atomic_fetch_add(&total_ops, 2 * ops);
    return NULL;
}

/* ---- pingpong: one block of a class at a time ----------------------------- */

static size_t pingpong_size = 32768;
static long pingpong_pause_every; /* 0: no pauses */

static void *pingpong(void *arg)
{
    (void)arg;
    long rounds = total_ops_target / 2 / nthreads;
    for (long i = 0; i < rounds; i++) {
        char *p = b_malloc(pingpong_size);
        for (size_t off = 0; off < pingpong_size; off += 4096)
            ((volatile char *)p)[off] = (char)i;
        if (pingpong_pause_every > 0)
            for (size_t off = 0; off < pingpong_size; off += 4096)
                if (((volatile char *)p)[off] != (char)i) {
                    fprintf(stderr, "small_bench pingpong: a block changed under its owner\n");
                    exit(1);
                }
        b_free(p);
        if (pingpong_pause_every > 0 && i % pingpong_pause_every == 0)
            nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    }
    atomic_fetch_add(&total_ops, 2 * rounds);
    return NULL;
}

static void usage(void)
{
    fprintf(stderr, "usage: small_bench simple [ops] | thread [threads] [ops] | prodcons [ops] |"
                    " larson [threads] [ops] | pingpong [size] [ops] [pause_every]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    bool threaded = strcmp(mode, "thread") == 0 || strcmp(mode, "larson") == 0;
    if (threaded) {
        nthreads = argc > 2 ? atoi(argv[2]) : 2;
        total_ops_target = argc > 3 ? atol(argv[3]) : total_ops_target;
    } else if (strcmp(mode, "pingpong") == 0) {
        nthreads = 1;
        long size = argc > 2 ? atol(argv[2]) : (long)pingpong_size;
        if (size < 1 || size > (1L << 30))
            usage();
        pingpong_size = (size_t)size;
        total_ops_target = argc > 3 ? atol(argv[3]) : total_ops_target;
        pingpong_pause_every = argc > 4 ? atol(argv[4]) : 0;
        if (pingpong_pause_every < 0)
            usage();
        nthreads = pingpong_pause_every > 0 ? 2 : 1;
    } else {
        nthreads = 1;
        total_ops_target = argc > 2 ? atol(argv[2]) : total_ops_target;
    }
    if (nthreads < 1 || nthreads > 64 || total_ops_target < 1000)
        usage();
    pthread_t t[64];
    double t0 = now_s();
    if (strcmp(mode, "simple") == 0) {
        own_objects((void *)1);
    } else if (strcmp(mode, "thread") == 0) {
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, own_objects, (void *)(uintptr_t)(i + 1));
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
    } else if (strcmp(mode, "prodcons") == 0) {
        pthread_create(&t[0], NULL, producer, NULL);
        pthread_create(&t[1], NULL, consumer, NULL);
        pthread_join(t[0], NULL);
        pthread_join(t[1], NULL);
    } else if (strcmp(mode, "larson") == 0) {
        shared = calloc((size_t)LARSON_SLOTS * (size_t)nthreads, sizeof *shared);
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, larson_worker, (void *)(uintptr_t)(i + 1));
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
        for (size_t k = 0; k < (size_t)LARSON_SLOTS * (size_t)nthreads; k++)
            b_free(atomic_load(&shared[k]));
        free(shared);
    } else if (strcmp(mode, "pingpong") == 0) {
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, pingpong, NULL);
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
    } else {
        usage();
    }
    double wall = now_s() - t0;
    char name[32];
    snprintf(name, sizeof name, "small-%s", mode);
    report_str("workload", name);
    report_str("api", BENCH_API);
    report_num("threads", nthreads);
    report_num("wall_s", wall);
    report_num("mops_per_s", (double)atomic_load(&total_ops) / wall / 1e6);
    report_num("peak_rss_mib", (double)status_bytes("VmHWM") / MiB);
    return 0;
}
