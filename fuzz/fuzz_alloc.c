/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: the input is a program of allocator calls. Each op is
 * 4 bytes: kind, slot, and a 16-bit size (scaled to reach the large path).
 * Kinds: malloc, calloc, realloc, aligned_alloc, posix_memalign, free,
 * free from another thread, usable-size check, trim, malloc in another
 * thread (that thread then owns the block: the frees of it here go onto
 * its spans' lists, which a trim here takes over while it idles). After every op, every
 * live block's pattern and size are checked; at the end everything is freed
 * and the statistics must come back to zero.
 */
#include "tensoralloc.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 32

typedef struct {
    unsigned char *p;
    size_t n;
    unsigned char seed;
} block_t;

static block_t slot[SLOTS];

/* A second thread that frees what it is handed (cross-thread frees) or
 * allocates what it is asked for (blocks of its heap). */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static void *to_free; /* a block for the helper to free */
static size_t wanted; /* a request for wanted - 1 bytes */
static void *got;     /* its answer, when got_ready */
static int got_ready;
static int helper_started;

static void *helper(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!to_free && !wanted)
            pthread_cond_wait(&cv, &mu);
        if (to_free) {
            ta_free(to_free);
            to_free = NULL;
        } else {
            got = ta_malloc(wanted - 1);
            got_ready = 1;
            wanted = 0;
        }
        pthread_cond_broadcast(&cv);
    }
    return NULL;
}

static void helper_start(void)
{
    if (!helper_started) {
        pthread_t t;
        pthread_create(&t, NULL, helper, NULL);
        helper_started = 1;
    }
}

static void free_elsewhere(void *p)
{
    helper_start();
    pthread_mutex_lock(&mu);
    to_free = p;
    pthread_cond_broadcast(&cv);
    while (to_free)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void *malloc_elsewhere(size_t n)
{
    helper_start();
    pthread_mutex_lock(&mu);
    wanted = n + 1;
    pthread_cond_broadcast(&cv);
    while (!got_ready)
        pthread_cond_wait(&cv, &mu);
    void *p = got;
    got_ready = 0;
    pthread_mutex_unlock(&mu);
    return p;
}

/* A head pattern, then a tail pattern over it where they meet. */
static void fill(block_t *b)
{
    size_t k = b->n < 64 ? b->n : 64;
    for (size_t i = 0; i < k; i++)
        b->p[i] = (unsigned char)(b->seed + i);
    for (size_t i = 0; i < k; i++)
        b->p[b->n - 1 - i] = (unsigned char)(b->seed ^ i);
}

/* The byte fill() wrote at i, or -1 where it wrote nothing. */
static int expected(const block_t *b, size_t i)
{
    size_t k = b->n < 64 ? b->n : 64;
    if (i >= b->n - k)
        return (unsigned char)(b->seed ^ (b->n - 1 - i)); /* the tail is written last */
    if (i < k)
        return (unsigned char)(b->seed + i);
    return -1;
}

static void check(const block_t *b)
{
    for (size_t i = 0; i < b->n && i < 64; i++)
        if (b->p[i] != expected(b, i) || b->p[b->n - 1 - i] != expected(b, b->n - 1 - i))
            abort();
    if (ta_usable_size(b->p) < b->n)
        abort();
}

static size_t scale(uint16_t v)
{
    switch (v >> 14) {
    case 0: return v & 0xff;                    /* tiny, zero included */
    case 1: return (size_t)(v & 0x3fff) * 4;    /* up to 64 KiB */
    case 2: return (size_t)(v & 0x3fff) * 64;   /* up to 1 MiB */
    default: return (size_t)(v & 0x3fff) * 512; /* up to 8 MiB */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    for (size_t at = 0; at + 4 <= len; at += 4) {
        unsigned kind = data[at] % 10;
        block_t *b = &slot[data[at + 1] % SLOTS];
        size_t n = scale((uint16_t)(data[at + 2] | data[at + 3] << 8));
        size_t align = (size_t)16 << (data[at + 1] % 12);
        void *p = NULL;
        switch (kind) {
        case 0: p = ta_malloc(n); break;
        case 1: p = ta_calloc(1, n); break;
        case 2:
            if (b->p) {
                p = ta_realloc(b->p, n);
                if (n == 0) { /* freed, as glibc */
                    b->p = NULL;
                    continue;
                }
                if (!p)
                    abort();
                size_t keep = b->n < n ? b->n : n;
                for (size_t i = 0; i < keep && i < 64; i++) /* contents kept */
                    if (expected(b, i) >= 0 && ((unsigned char *)p)[i] != expected(b, i))
                        abort();
                b->p = p;
                b->n = n;
                b->seed = data[at + 2];
                fill(b);
                continue;
            }
            p = ta_realloc(NULL, n);
            break;
        case 3: p = ta_aligned_alloc(align, n); break;
        case 4:
            if (ta_posix_memalign(&p, align, n) != 0)
                p = NULL;
            break;
        case 5:
            if (b->p)
                check(b);
            ta_free(b->p);
            b->p = NULL;
            continue;
        case 6:
            if (b->p) {
                check(b);
                free_elsewhere(b->p);
                b->p = NULL;
            }
            continue;
        case 7:
            if (b->p)
                check(b);
            continue;
        case 8: ta_trim(); continue;
        default: p = malloc_elsewhere(n); break;
        }
        if (!p)
            abort(); /* nothing here is too big */
        if ((kind == 3 || kind == 4) && (uintptr_t)p % align)
            abort();
        if (kind == 1)
            for (size_t i = 0; i < n; i += 4093)
                if (((unsigned char *)p)[i])
                    abort();
        if (b->p) {
            check(b);
            ta_free(b->p);
        }
        b->p = p;
        b->n = n;
        b->seed = data[at + 3];
        fill(b);
    }
    for (int i = 0; i < SLOTS; i++) {
        if (slot[i].p)
            check(&slot[i]);
        ta_free(slot[i].p);
        slot[i].p = NULL;
    }
    ta_trim();
    ta_stats_t st = {.size = sizeof st};
    ta_stats_get(&st);
    if (st.large_live_count != 0 || st.large_live_bytes != 0 || st.pool_bytes != 0)
        abort();
    return 0;
}
