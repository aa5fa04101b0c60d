/* SPDX-License-Identifier: MIT */
/*
 * small-threads: objects of 8 B-4 KiB allocated in one thread and freed in
 * another. Threads form a ring: each allocates batches, passes them to the
 * next thread through a single-producer single-consumer queue, and frees
 * what the previous thread sent it. Reports operations (malloc + free) per
 * second and peak RSS.
 */
#include "bench.h"

#include <pthread.h>
#include <stdatomic.h>

#define BATCH 256
#define QUEUE 64 /* batches in flight per link */

typedef struct {
    void *items[QUEUE][BATCH];
    atomic_size_t head, tail;
} queue_t;

static int nthreads = 2;
static long rounds = 20000;
static queue_t *queues;
static atomic_long total_ops;

static void *worker(void *arg)
{
    int me = (int)(intptr_t)arg;
    queue_t *out = &queues[me];
    queue_t *in = &queues[(me + nthreads - 1) % nthreads];
    uint64_t s = (uint64_t)me + 1;
    long sent = 0, received = 0, ops = 0;
    while (sent < rounds || received < rounds) {
        size_t tail = atomic_load_explicit(&out->tail, memory_order_relaxed);
        if (sent < rounds &&
            tail - atomic_load_explicit(&out->head, memory_order_acquire) < QUEUE) {
            void **b = out->items[tail % QUEUE];
            for (int i = 0; i < BATCH; i++) {
                uint64_t r = rng_next(&s);
                size_t n = (r & 3) ? 8 + (r >> 8) % 248 : 8 + (r >> 8) % 4088;
                b[i] = b_malloc(n);
                *(volatile char *)b[i] = 1;
            }
            atomic_store_explicit(&out->tail, tail + 1, memory_order_release);
            sent++;
            ops += BATCH;
        }
        size_t head = atomic_load_explicit(&in->head, memory_order_relaxed);
        if (received < rounds && head != atomic_load_explicit(&in->tail, memory_order_acquire)) {
            void **b = in->items[head % QUEUE];
            for (int i = 0; i < BATCH; i++)
                b_free(b[i]);
            atomic_store_explicit(&in->head, head + 1, memory_order_release);
            received++;
            ops += BATCH;
        }
    }
    atomic_fetch_add(&total_ops, ops);
    return NULL;
}

int main(int argc, char **argv)
{
    nthreads = argc > 1 ? atoi(argv[1]) : 2;
    rounds = argc > 2 ? atol(argv[2]) : 20000;
    if (nthreads < 2 || nthreads > 64 || rounds < 1) {
        fprintf(stderr, "usage: small_threads [threads >= 2] [batches per thread]\n");
        return 2;
    }
    queues = calloc((size_t)nthreads, sizeof *queues);
    pthread_t t[64];
    double t0 = now_s();
    for (int i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    double wall = now_s() - t0;
    report_str("workload", "small-threads");
    report_str("api", BENCH_API);
    report_num("wall_s", wall);
    report_num("mops_per_s", (double)atomic_load(&total_ops) / wall / 1e6);
    report_num("peak_rss_mib", (double)status_bytes("VmHWM") / MiB);
    return 0;
}
