/* SPDX-License-Identifier: MIT */
/* Suite "threads": cross-thread frees with pattern checks, thread exit. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

/* Producers allocate patterned blocks into a shared ring; consumers check
 * and free them, so almost every free is a cross-thread free. */
enum { RING = 4096, PRODUCERS = 3, CONSUMERS = 3, PER_PRODUCER = 60000 };

typedef struct {
    _Atomic(unsigned char *) slot[RING];
    atomic_int done_producers;
    atomic_long freed;
} ring_t;

static ring_t ring;

static size_t pick_size(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    unsigned r = (unsigned)(*s >> 33);
    if (r % 100 < 90)
        return r % 512 + 1;
    if (r % 100 < 99)
        return r % 60000 + 1;
    return r % (3 * MiB) + 1; /* a few large blocks too */
}

static atomic_int bad_pattern;

static void check_and_free(unsigned char *p)
{
    size_t n;
    memcpy(&n, p, sizeof n);
    if (!pattern_ok(p + sizeof n, (n - sizeof n) < 512 ? n - sizeof n : 512, n))
        atomic_store(&bad_pattern, 1);
    ta_free(p);
}

static unsigned char *make_block(uint64_t *seed)
{
    size_t n = pick_size(seed) + sizeof(size_t);
    unsigned char *p = ta_malloc(n);
    if (!p)
        abort();
    memcpy(p, &n, sizeof n);
    pattern_fill(p + sizeof n, (n - sizeof n) < 512 ? n - sizeof n : 512, n);
    return p;
}

static void *producer(void *arg)
{
    uint64_t seed = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < PER_PRODUCER; i++) {
        unsigned char *p = make_block(&seed);
        size_t k = (size_t)(seed >> 20) % RING;
        for (;;) {
            unsigned char *expected = NULL;
            if (atomic_compare_exchange_strong(&ring.slot[k], &expected, p))
                break;
            k = (k + 1) % RING;
        }
    }
    atomic_fetch_add(&ring.done_producers, 1);
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    size_t k = 0;
    for (;;) {
        unsigned char *p = atomic_exchange(&ring.slot[k], NULL);
        if (p) {
            check_and_free(p);
            atomic_fetch_add(&ring.freed, 1);
        } else if (atomic_load(&ring.done_producers) == PRODUCERS &&
                   atomic_load(&ring.freed) == (long)PRODUCERS * PER_PRODUCER) {
            return NULL;
        }
        k = (k + 1) % RING;
    }
}

Test(threads, cross_thread_frees_keep_blocks_intact, .timeout = 120)
{
    pthread_t t[PRODUCERS + CONSUMERS];
    for (int i = 0; i < PRODUCERS; i++)
        pthread_create(&t[i], NULL, producer, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < CONSUMERS; i++)
        pthread_create(&t[PRODUCERS + i], NULL, consumer, NULL);
    for (int i = 0; i < PRODUCERS + CONSUMERS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&ring.freed), (long)PRODUCERS * PER_PRODUCER);
    cr_assert_eq(atomic_load(&bad_pattern), 0, "a block's pattern was overwritten");
}

/* Each thread keeps its own live set, checks every block's pattern before
 * freeing, and hands a third of its blocks to a neighbour to free. */
enum { WORKERS = 4, LIVE = 2000, ROUNDS = 40000 };
static _Atomic(unsigned char *) mailbox[WORKERS][64];
static void *worker(void *arg)
{
    int me = (int)(uintptr_t)arg;
    uint64_t seed = (uint64_t)me * 977 + 5;
    static __thread unsigned char *live[LIVE];
    for (int r = 0; r < ROUNDS; r++) {
        int k = (int)((seed >> 24) % LIVE);
        if (live[k])
            check_and_free(live[k]);
        live[k] = make_block(&seed);
        if (r % 3 == 0) { /* give one away, take one in */
            int to = (me + 1) % WORKERS;
            unsigned char *gift = make_block(&seed);
            unsigned char *old = atomic_exchange(&mailbox[to][r % 64], gift);
            if (old)
                check_and_free(old);
            unsigned char *mine = atomic_exchange(&mailbox[me][(r + 7) % 64], NULL);
            if (mine)
                check_and_free(mine);
        }
    }
    for (int k = 0; k < LIVE; k++)
        if (live[k])
            check_and_free(live[k]);
    return NULL;
}

Test(threads, pattern_stress_with_handoffs, .timeout = 120)
{
    pthread_t t[WORKERS];
    size_t start = rss_bytes();
    for (int i = 0; i < WORKERS; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(t[i], NULL);
    for (int w = 0; w < WORKERS; w++)
        for (int s = 0; s < 64; s++) {
            unsigned char *p = atomic_exchange(&mailbox[w][s], NULL);
            if (p)
                check_and_free(p);
        }
    cr_assert_eq(atomic_load(&bad_pattern), 0, "a block's pattern was overwritten");
    ta_trim(); /* exited threads' heaps are abandoned: trim reaches them */
    ta_stats_t st = stats_now();
    cr_assert_eq(st.large_live_count, 0);
    cr_assert_lt(st.small_live_bytes, 256 * KiB, "small live %llu after all frees",
                 (unsigned long long)st.small_live_bytes);
    if (!under_valgrind())
        cr_assert_lt(rss_bytes(), start + 16 * MiB);
}

static void *short_lived(void *arg)
{
    void **out = arg;
    *out = ta_malloc(100);
    void *tmp = ta_malloc(5000);
    ta_free(tmp);
    return NULL;
}

Test(threads, exited_threads_heaps_are_reused)
{
    void *blocks[200];
    for (int i = 0; i < 200; i++) {
        pthread_t t;
        pthread_create(&t, NULL, short_lived, &blocks[i]);
        pthread_join(t, NULL);
    }
    ta_stats_t st = stats_now();
    cr_assert_leq(st.heaps, 4, "heaps are adopted, not leaked: %llu", (unsigned long long)st.heaps);
    for (int i = 0; i < 200; i++)
        ta_free(blocks[i]); /* frees into abandoned heaps */
    ta_trim();
    cr_assert_lt(stats_now().small_live_bytes, 64 * KiB);
}

/* Threads that all make their first allocation at once all need a heap:
 * when the chunk of heaps runs out, several map a new chunk together. Each
 * used to install its own, losing the chunks it replaced (one mapping and
 * up to 15 heaps each). Once every thread has exited, the mappings left are
 * the heap chunks: at most one per 16 heaps. */
enum { RACERS = 256 };
static pthread_barrier_t racers_start, racers_done;

static void *first_allocation_at_once(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&racers_start);
    ta_free(ta_malloc(64));
    pthread_barrier_wait(&racers_done); /* all heaps live at once: none is adopted */
    return NULL;
}

Test(threads, racing_first_allocations_share_heap_chunks)
{
    pthread_t tid[RACERS];
    pthread_barrier_init(&racers_start, NULL, RACERS);
    pthread_barrier_init(&racers_done, NULL, RACERS);
    for (int i = 0; i < RACERS; i++)
        cr_assert_eq(pthread_create(&tid[i], NULL, first_allocation_at_once, NULL), 0);
    for (int i = 0; i < RACERS; i++)
        pthread_join(tid[i], NULL);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.heaps, RACERS);
    uint64_t chunks_at_most = (RACERS + 15) / 16;
    cr_assert_leq(st.mappings, chunks_at_most,
                  "%" PRIu64 " mappings left for %d heaps: chunks were lost", st.mappings, RACERS);
}
