/* SPDX-License-Identifier: MIT */
/*
 * idle-owner: a thread allocates many small objects, hands them all to
 * another thread and stays alive but idle (a worker between requests, a
 * loader waiting for the next model). The other thread frees them all and
 * calls malloc_trim(0). Reports RSS above the start after the frees,
 * after the trim, and one second later, while the owner still idles.
 * Allocators that return frees to the owner's heap keep the memory until
 * the owner wakes up (issue 11, item 5).
 *
 *   idle_owner [MiB of objects] [smallest] [largest object bytes]   (default 400 64 2000)
 */
#include "bench.h"

#include <malloc.h>
#include <pthread.h>
#include <unistd.h>

static void **objects;
static size_t count;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int phase; /* 1 objects ready, 2 owner may exit */
static size_t smallest = 64, largest = 2000;

static void set_phase(int p)
{
    pthread_mutex_lock(&mu);
    phase = p;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void wait_phase(int p)
{
    pthread_mutex_lock(&mu);
    while (phase < p)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void *owner(void *arg)
{
    size_t total = *(size_t *)arg, bytes = 0;
    uint64_t seed = 12345;
    for (count = 0; bytes < total; count++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t n = smallest + (size_t)(seed >> 33) % (largest - smallest + 1);
        objects[count] = b_malloc(n);
        memset(objects[count], 1, n);
        bytes += n;
    }
    set_phase(1);
    wait_phase(2); /* idle: no allocator call until told */
    return NULL;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 400;
    smallest = argc > 2 ? strtoull(argv[2], NULL, 10) : smallest;
    largest = argc > 3 ? strtoull(argv[3], NULL, 10) : largest;
    if (mib == 0 || mib > 65536 || smallest < 16 || largest < smallest || largest > (1 << 20)) {
        fprintf(stderr, "usage: idle_owner [MiB of objects] [smallest] [largest object bytes]\n");
        return 2;
    }
    size_t total = mib * MiB;
    objects = b_malloc(total / smallest * sizeof *objects); /* room for the smallest objects */
    size_t start = status_bytes("VmRSS");
    pthread_t t;
    pthread_create(&t, NULL, owner, &total);
    wait_phase(1);
    size_t full = status_bytes("VmRSS");
    double t0 = now_s();
    for (size_t i = 0; i < count; i++)
        b_free(objects[i]);
    size_t freed = status_bytes("VmRSS");
#ifdef BENCH_TA
    ta_trim();
#else
    malloc_trim(0);
#endif
    double trim_s = now_s() - t0;
    size_t trimmed = status_bytes("VmRSS");
    sleep(1);
    size_t later = status_bytes("VmRSS");
    set_phase(2);
    pthread_join(t, NULL);
    report_str("workload", "idle-owner");
    report_str("api", BENCH_API);
    report_num("objects", (double)count);
    report_num("rss_full_above_start_mib", (double)(full - start) / MiB);
    report_num("rss_freed_above_start_mib",
               (double)((freed > start ? freed : start) - start) / MiB);
    report_num("rss_trimmed_above_start_mib",
               (double)((trimmed > start ? trimmed : start) - start) / MiB);
    report_num("rss_1s_above_start_mib", (double)((later > start ? later : start) - start) / MiB);
    report_num("free_and_trim_s", trim_s);
    b_free(objects);
    return 0;
}
