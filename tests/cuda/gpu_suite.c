/* SPDX-License-Identifier: MIT */
/*
 * The staging suite for a real GPU (tools/gpu-check), as a TAP program:
 * initialisation, the pinned pool, pin in place and free, staged and direct
 * round trips from 1 byte to 256 MiB with checksums, and four threads
 * copying through one pool. The test suite dry-runs it against the CUDA
 * test double; on a GPU machine it runs against libcudart.
 */
#include "tensoralloc_cuda.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_test, n_fail;

static void check(int ok, const char *what)
{
    n_test++;
    n_fail += !ok;
    printf("%s %d - %s\n", ok ? "ok" : "not ok", n_test, what);
}

static uint64_t checksum(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static ta_pinned_pool_t *pool;

static int round_trip(size_t n, unsigned seed, int pinned)
{
    unsigned char *src = ta_malloc(n), *back = ta_malloc(n);
    void *dev = NULL;
    int ok = src && back && ta_cuda_device_alloc(n, &dev) == 0;
    if (ok) {
        for (size_t i = 0; i < n; i++)
            src[i] = (unsigned char)(((uint64_t)i * 2654435761u >> 13) ^ seed);
        memset(back, 0, n);
        if (pinned)
            ok &= ta_cuda_pin(src) == 0 && ta_cuda_pin(back) == 0;
        ok &= ta_cuda_copy_to_device(pinned ? NULL : pool, dev, src, n) == 0;
        ok &= ta_cuda_copy_to_host(pinned ? NULL : pool, back, dev, n) == 0;
        ok &= checksum(back, n) == checksum(src, n);
    }
    if (dev)
        ta_cuda_device_free(dev);
    ta_free(src); /* a pinned block is unpinned by free */
    ta_free(back);
    return ok;
}

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    int ok = 1;
    for (int i = 0; i < 4; i++)
        ok &= round_trip((size_t)(24 << 20) + seed * 4099u + (size_t)i, seed * 7 + (unsigned)i, 0);
    return (void *)(uintptr_t)ok;
}

int main(void)
{
    int rc = ta_cuda_init(0);
    if (rc != 0) {
        printf("1..0 # SKIP %s\n", ta_strerror(rc));
        return 77;
    }
    printf("1..8\n");
    ta_cuda_set_staging_size((size_t)8 << 20);
    check(ta_pinned_pool_create((size_t)64 << 20, &pool) == 0, "pool created");
    void *a = NULL, *b = NULL;
    check(ta_pinned_acquire(pool, 5 << 20, &a) == 0 && ta_pinned_release(pool, a) == 0 &&
              ta_pinned_acquire(pool, 4 << 20, &b) == 0 && a == b &&
              ta_pinned_release(pool, b) == 0,
          "pinned buffers are reused");
    ta_cuda_stats_t cs = {.size = sizeof cs};
    ta_cuda_stats_get(&cs);
    uint64_t registered_before = cs.registered_bytes;
    unsigned char *blk = ta_malloc(32 << 20);
    check(ta_cuda_pin(blk) == 0 && ta_cuda_pin(blk) == TA_EPINNED && ta_cuda_unpin(blk) == 0,
          "pin, pin again, unpin");
    check(ta_cuda_pin(blk) == 0, "pin before free");
    ta_free(blk);
    ta_cuda_stats_get(&cs);
    check(cs.registered_bytes == registered_before, "free of a pinned block unregisters it");
    size_t sizes[] = {1, 4095, 65537, (size_t)3 << 20, (size_t)65 << 20, (size_t)256 << 20};
    int ok = 1;
    for (int i = 0; i < 6; i++)
        ok &= round_trip(sizes[i], (unsigned)i, 0);
    check(ok, "staged round trips, 1 B to 256 MiB, checksums match");
    ok = 1;
    for (int i = 0; i < 6; i++)
        ok &=
            round_trip(sizes[i] < (1 << 20) ? (1 << 20) + sizes[i] : sizes[i], (unsigned)i + 50, 1);
    check(ok, "pinned-in-place round trips (large blocks only), checksums match");
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    ok = 1;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        ok &= r != NULL;
    }
    check(ok, "four threads copying through one pool");
    ta_pinned_pool_destroy(pool);
    return n_fail != 0;
}
