/* SPDX-License-Identifier: MIT */
/*
 * A preload stress program: threads allocate blocks of every size from 1
 * byte to 64 MiB through every allocation function, hand a share to other
 * threads to free, grow and shrink realloc chains, and check a pattern in
 * every block before freeing it. Prints a summary that must be the same
 * under any correct allocator.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { THREADS = 4, ROUNDS = 6000, SLOTS = 256, SHARED = 64 };

static _Atomic(unsigned char *) shared[SHARED];
static atomic_long failures;

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void fill(unsigned char *p, size_t n)
{
    memcpy(p, &n, sizeof n < n ? sizeof n : n);
    for (size_t i = sizeof n; i < n && i < 4096; i++)
        p[i] = (unsigned char)(n + i);
    if (n > 4096)
        p[n - 1] = (unsigned char)(n * 3);
}

static void check_free(unsigned char *p)
{
    size_t n;
    memcpy(&n, p, sizeof n);
    for (size_t i = sizeof n; i < n && i < 4096; i++)
        if (p[i] != (unsigned char)(n + i)) {
            atomic_fetch_add(&failures, 1);
            break;
        }
    if (n > 4096 && p[n - 1] != (unsigned char)(n * 3))
        atomic_fetch_add(&failures, 1);
    int saved = errno = 4242;
    free(p);
    if (errno != saved)
        atomic_fetch_add(&failures, 1000000);
}

static size_t pick_size(uint64_t *s)
{
    uint64_t r = next(s);
    switch (r % 16) {
    case 0: return (size_t)(r >> 8) % (64 << 20) + 8; /* up to 64 MiB */
    case 1:
    case 2: return (size_t)(r >> 8) % (4 << 20) + 8;
    case 3:
    case 4:
    case 5: return (size_t)(r >> 8) % 300000 + 8;
    default: return (size_t)(r >> 8) % 2048 + 8;
    }
}

static unsigned char *alloc_any(uint64_t *s, size_t n)
{
    void *p = NULL;
    size_t a = (size_t)8 << (next(s) % 10);
    switch (next(s) % 8) {
    case 0: p = malloc(n); break;
    case 1:
        p = calloc(1, n);
        if (p && ((unsigned char *)p)[n - 1] != 0)
            atomic_fetch_add(&failures, 1);
        break;
    case 2:
        if (posix_memalign(&p, a, n) != 0)
            p = NULL;
        break;
    case 3: p = aligned_alloc(a, n); break;
    case 4: p = memalign(a, n); break;
    case 5:
        p = valloc(n);
        a = 4096;
        break;
    case 6: p = realloc(NULL, n); break;
    default: p = reallocarray(NULL, n, 1); break;
    }
    if (p == NULL) {
        fprintf(stderr, "allocation of %zu failed\n", n);
        exit(2);
    }
    if (malloc_usable_size(p) < n)
        atomic_fetch_add(&failures, 1);
    fill(p, n);
    return p;
}

static void *worker(void *arg)
{
    uint64_t s = (uint64_t)(uintptr_t)arg * 0x9E3779B97F4A7C15ULL + 1;
    unsigned char *slot[SLOTS] = {0};
    for (int r = 0; r < ROUNDS; r++) {
        int k = (int)(next(&s) % SLOTS);
        if (slot[k])
            check_free(slot[k]);
        size_t n = pick_size(&s);
        slot[k] = alloc_any(&s, n);
        if (r % 5 == 0) { /* a realloc chain step */
            size_t m = pick_size(&s);
            size_t old;
            memcpy(&old, slot[k], sizeof old);
            unsigned char *q = realloc(slot[k], m);
            if (!q)
                exit(3);
            size_t keep = old < m ? old : m;
            for (size_t i = sizeof old; i < keep && i < 4096; i++)
                if (q[i] != (unsigned char)(old + i)) {
                    atomic_fetch_add(&failures, 1);
                    break;
                }
            fill(q, m);
            slot[k] = q;
        }
        if (r % 3 == 0) { /* cross-thread: another thread frees it */
            unsigned char *gift = alloc_any(&s, pick_size(&s) % 5000 + 8);
            unsigned char *old = atomic_exchange(&shared[next(&s) % SHARED], gift);
            if (old)
                check_free(old);
        }
    }
    for (int k = 0; k < SLOTS; k++)
        if (slot[k])
            check_free(slot[k]);
    return NULL;
}

int main(void)
{
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < SHARED; i++) {
        unsigned char *p = atomic_exchange(&shared[i], NULL);
        if (p)
            check_free(p);
    }
    /* every size from 1 byte up to 64 MiB in powers of two and neighbours */
    for (size_t n = 1; n <= ((size_t)64 << 20); n *= 2) {
        for (int d = -1; d <= 1; d++) {
            size_t m = n + (size_t)d;
            if (m == 0)
                continue;
            unsigned char *p = malloc(m);
            if (m < sizeof(size_t)) { /* too small to carry its size */
                memset(p, 0x11, m);
                free(p);
                continue;
            }
            fill(p, m);
            check_free(p);
        }
    }
    malloc_trim(0);
    printf("stress: %d threads x %d rounds, failures %ld\n", THREADS, ROUNDS,
           atomic_load(&failures));
    return atomic_load(&failures) != 0;
}
