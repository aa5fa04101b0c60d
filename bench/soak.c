/* SPDX-License-Identifier: MIT */
/*
 * soak: N threads doing random allocator work for a given time — malloc,
 * calloc, realloc, posix_memalign and free of 1 B to 64 MiB, a share of
 * blocks handed to other threads to free — checking a pattern in every
 * block before it is freed or resized. Reports operations, peak RSS and
 * the RSS once everything is freed. Exit status 1 on any corruption.
 *
 *   soak [threads] [seconds] [live blocks per thread] [trim every ms] [pressure]
 *
 * With the last argument (ta_* build only), one more thread calls ta_trim
 * at that period: trims race the workers (run so under TSan by CI); with
 * "pressure" after it, ta_pressure_signal instead (the memory-pressure
 * response: every heap's free pages at once, from another thread).
 */
#include "bench.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <unistd.h>

enum { HANDOFF = 256 };

static int nthreads = 4, live = 2000, trim_ms;
static bool trim_by_pressure;
static double seconds = 10;
static atomic_long total_ops, corruptions;
static _Atomic(unsigned char *) handoff[HANDOFF];

typedef struct {
    unsigned char *p;
    size_t n;
} block_t;

static unsigned char tag(size_t n, size_t i)
{
    return (unsigned char)(n * 7 + i * 13 + (i >> 10));
}

/* The size lives in the first bytes; a pattern in the first and last KiB. */
static void stamp(unsigned char *p, size_t n)
{
    if (n >= sizeof n)
        memcpy(p, &n, sizeof n);
    for (size_t i = sizeof n; i < n && i < 1024; i++)
        p[i] = tag(n, i);
    for (size_t i = n > 2048 ? n - 1024 : n; i < n; i++)
        p[i] = tag(n, i);
}

static int intact(const unsigned char *p, size_t n, size_t check)
{
    for (size_t i = sizeof n; i < check && i < 1024; i++)
        if (p[i] != tag(n, i))
            return 0;
    for (size_t i = n > 2048 ? n - 1024 : n; i < check; i++)
        if (p[i] != tag(n, i))
            return 0;
    return 1;
}

static size_t pick(uint64_t *s)
{
    uint64_t r = rng_next(s);
    unsigned k = (unsigned)(r % 1000);
    if (k < 900)
        return (size_t)(r >> 20) % 512 + 8;
    if (k < 990)
        return (size_t)(r >> 20) % 200000 + 8;
    if (k < 999)
        return (size_t)(r >> 20) % (8u << 20) + 8;
    return (size_t)(r >> 20) % (64u << 20) + 8;
}

static void release(unsigned char *p)
{
    size_t n;
    memcpy(&n, p, sizeof n);
    if (!intact(p, n, n))
        atomic_fetch_add(&corruptions, 1);
    b_free(p);
}

static unsigned char *make(uint64_t *s, size_t n)
{
    void *p = NULL;
    switch (rng_next(s) % 4) {
    case 0: p = b_malloc(n); break;
    case 1:
        p = b_calloc(1, n);
        if (p && ((unsigned char *)p)[n - 1] != 0)
            atomic_fetch_add(&corruptions, 1);
        break;
    case 2:
        if (b_posix_memalign(&p, (size_t)16 << (rng_next(s) % 9), n) != 0)
            p = NULL;
        break;
    default: p = b_realloc(NULL, n); break;
    }
    if (!p) {
        fprintf(stderr, "soak: allocation of %zu bytes failed\n", n);
        exit(2);
    }
    stamp(p, n);
    return p;
}

static void *worker(void *arg)
{
    uint64_t s = (uint64_t)(uintptr_t)arg * 0x9E3779B97F4A7C15ULL;
    block_t *slot = calloc((size_t)live, sizeof *slot);
    long ops = 0;
    double end = now_s() + seconds;
    while (now_s() < end) {
        for (int burst = 0; burst < 256; burst++, ops++) {
            int k = (int)(rng_next(&s) % (uint64_t)live);
            unsigned op = (unsigned)(rng_next(&s) % 10);
            if (slot[k].p && op < 2) { /* grow or shrink, contents kept */
                size_t m = pick(&s);
                unsigned char *q = b_realloc(slot[k].p, m);
                if (!q)
                    exit(2);
                if (!intact(q, slot[k].n, m < slot[k].n ? m : slot[k].n))
                    atomic_fetch_add(&corruptions, 1);
                stamp(q, m);
                slot[k] = (block_t){q, m};
            } else if (slot[k].p && op == 2) { /* hand to another thread */
                unsigned char *old = atomic_exchange(&handoff[rng_next(&s) % HANDOFF], slot[k].p);
                if (old)
                    release(old);
                slot[k].p = NULL;
            } else {
                if (slot[k].p)
                    release(slot[k].p);
                size_t n = pick(&s);
                slot[k] = (block_t){make(&s, n), n};
            }
        }
    }
    for (int k = 0; k < live; k++)
        if (slot[k].p)
            release(slot[k].p);
    free(slot);
    atomic_fetch_add(&total_ops, ops);
    return NULL;
}

#ifdef BENCH_TA
static atomic_bool stop_trimming;

static void *trimmer(void *arg)
{
    long *trims = arg;
    while (!atomic_load(&stop_trimming)) {
        if (trim_by_pressure)
            ta_pressure_signal();
        else
            ta_trim();
        (*trims)++;
        usleep((useconds_t)trim_ms * 1000);
    }
    return NULL;
}
#endif

int main(int argc, char **argv)
{
    nthreads = argc > 1 ? atoi(argv[1]) : 4;
    seconds = argc > 2 ? atof(argv[2]) : 10;
    live = argc > 3 ? atoi(argv[3]) : 2000;
    trim_ms = argc > 4 ? atoi(argv[4]) : 0;
    trim_by_pressure = argc > 5 && strcmp(argv[5], "pressure") == 0;
    if (nthreads < 1 || nthreads > 256 || seconds <= 0 || live < 1 || trim_ms < 0 ||
        (argc > 5 && !trim_by_pressure)) {
        fprintf(stderr, "usage: soak [threads] [seconds] [live blocks per thread] [trim every ms] "
                        "[pressure]\n");
        return 2;
    }
    size_t rss_start = status_bytes("VmRSS");
    pthread_t t[256];
    double t0 = now_s();
    for (int i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
#ifdef BENCH_TA
    pthread_t trim_thread;
    long trims = 0;
    if (trim_ms > 0)
        pthread_create(&trim_thread, NULL, trimmer, &trims);
#endif
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
#ifdef BENCH_TA
    if (trim_ms > 0) {
        atomic_store(&stop_trimming, true);
        pthread_join(trim_thread, NULL);
        report_num("trims", (double)trims);
    }
#endif
    for (int i = 0; i < HANDOFF; i++) {
        unsigned char *p = atomic_exchange(&handoff[i], NULL);
        if (p)
            release(p);
    }
    double wall = now_s() - t0;
#ifdef BENCH_TA
    ta_trim();
#endif
    sleep(1);
    report_str("workload", "soak");
    report_str("api", BENCH_API);
    report_num("threads", nthreads);
    report_num("wall_s", wall);
    report_num("ops", (double)atomic_load(&total_ops));
    report_num("mops_per_s", (double)atomic_load(&total_ops) / wall / 1e6);
    report_num("peak_rss_mib", (double)status_bytes("VmHWM") / MiB);
    report_num("rss_start_mib", (double)rss_start / MiB);
    report_num("rss_end_mib", (double)status_bytes("VmRSS") / MiB);
    report_num("corruptions", (double)atomic_load(&corruptions));
    return atomic_load(&corruptions) ? 1 : 0;
}
