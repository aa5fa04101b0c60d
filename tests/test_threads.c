/* SPDX-License-Identifier: MIT */
/* Suite "threads": cross-thread frees with pattern checks, thread exit. */
#define _GNU_SOURCE /* RUSAGE_THREAD */
#include "core/large.h"
#include "core/purge.h"
#include "core/slab.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

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

/* Runs the producers (seeded from seed) and consumers to the end and checks
 * that every block came back intact. */
static void run_ring(int seed)
{
    pthread_t t[PRODUCERS + CONSUMERS];
    for (int i = 0; i < PRODUCERS; i++)
        pthread_create(&t[i], NULL, producer, (void *)(uintptr_t)(i + seed));
    for (int i = 0; i < CONSUMERS; i++)
        pthread_create(&t[PRODUCERS + i], NULL, consumer, NULL);
    for (int i = 0; i < PRODUCERS + CONSUMERS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&ring.freed), (long)PRODUCERS * PER_PRODUCER);
    cr_assert_eq(atomic_load(&bad_pattern), 0, "a block's pattern was overwritten");
}

Test(threads, cross_thread_frees_keep_blocks_intact, .timeout = 120)
{
    run_ring(1);
}

/* The same while another thread trims all the time: trimmers take the
 * producers' remote lists and give pages back under their feet. */
static atomic_bool trimmer_stop;
static void *trimmer(void *arg)
{
    long *rounds = arg;
    while (!atomic_load(&trimmer_stop)) {
        ta_trim();
        (*rounds)++;
    }
    return NULL;
}

Test(threads, cross_thread_frees_race_a_trimmer, .timeout = 120)
{
    pthread_t trim;
    long trims = 0;
    pthread_create(&trim, NULL, trimmer, &trims);
    run_ring(11);
    atomic_store(&trimmer_stop, true);
    pthread_join(trim, NULL);
    cr_assert_gt(trims, 10, "the trimmer ran %ld times", trims);
    cr_log_info("%ld trims, %" PRIu64 " bytes given back from remote lists", trims,
                stats_now().small_remote_released_bytes);
    ta_trim();
    cr_assert_lt(stats_now().small_live_bytes, 512 * KiB, "blocks lost: %" PRIu64 " bytes live",
                 stats_now().small_live_bytes);
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
    if (rss_meaningful())
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
    ta_trim(); /* the exited heaps' segments wait RETAIN_MS otherwise: only chunks stay */
    ta_stats_t st = stats_now();
    cr_assert_eq(st.heaps, RACERS);
    uint64_t chunks_at_most = (RACERS + 15) / 16;
    cr_assert_leq(st.mappings, chunks_at_most,
                  "%" PRIu64 " mappings left for %d heaps: chunks were lost", st.mappings, RACERS);
}

/* ---- blocks freed into a live but idle owner's heap ------------------------ */

enum { IDLE_BLOCKS = 100000, IDLE_SIZE = 1000 }; /* ~100 MB */
static void *idle_blocks[IDLE_BLOCKS];
static pthread_mutex_t idle_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle_cv = PTHREAD_COND_INITIALIZER;
static int idle_phase; /* 1: blocks ready; 2: owner may go on; 3: owner done */

static void idle_set_phase(int p)
{
    pthread_mutex_lock(&idle_mu);
    idle_phase = p;
    pthread_cond_broadcast(&idle_cv);
    pthread_mutex_unlock(&idle_mu);
}

static void idle_wait_phase(int p)
{
    pthread_mutex_lock(&idle_mu);
    while (idle_phase < p)
        pthread_cond_wait(&idle_cv, &idle_mu);
    pthread_mutex_unlock(&idle_mu);
}

/* Allocates the blocks, hands them over, stays alive and idle (no
 * allocator call), then allocates and checks a second round. */
static void *idle_owner(void *arg)
{
    (void)arg;
    for (int i = 0; i < IDLE_BLOCKS; i++) {
        idle_blocks[i] = ta_malloc(IDLE_SIZE);
        memset(idle_blocks[i], i & 0xff, IDLE_SIZE);
    }
    idle_set_phase(1);
    idle_wait_phase(2);
    /* Awake again: the blocks given back come back to this heap. */
    void **again = ta_malloc(IDLE_BLOCKS * sizeof *again);
    for (int i = 0; i < IDLE_BLOCKS; i++) {
        again[i] = ta_malloc(IDLE_SIZE);
        memset(again[i], (i * 7) & 0xff, IDLE_SIZE);
    }
    intptr_t bad = 0;
    for (int i = 0; i < IDLE_BLOCKS; i++) {
        const unsigned char *b = again[i];
        bad += b[0] != (unsigned char)((i * 7) & 0xff) || b[IDLE_SIZE - 1] != b[0];
        ta_free(again[i]);
    }
    ta_free(again);
    ta_trim();
    return (void *)bad;
}

/* Frees every block of the idle owner from this thread; returns RSS. */
static size_t free_idle_blocks(pthread_t *owner)
{
    cr_assert_eq(pthread_create(owner, NULL, idle_owner, NULL), 0);
    idle_wait_phase(1);
    for (int i = 0; i < IDLE_BLOCKS; i++) {
        unsigned char *b = idle_blocks[i];
        cr_assert_eq(b[IDLE_SIZE - 1], (unsigned char)(i & 0xff));
        ta_free(b);
    }
    return rss_bytes();
}

static void finish_idle_owner(pthread_t owner)
{
    idle_set_phase(2);
    void *bad;
    pthread_join(owner, &bad);
    cr_assert_null(bad, "blocks handed out again were corrupted");
    ta_trim();
    ta_stats_t st = stats_now();
    cr_assert_lt(st.small_live_bytes, 1 * MiB, "%" PRIu64 " bytes still live: blocks lost",
                 st.small_live_bytes);
}

/* Nearly all of the ~100 MB went back, by the statistics and by RSS. */
static void assert_given_back(size_t rss_before, ta_stats_t st)
{
    size_t after = rss_bytes();
    cr_assert_geq(st.small_remote_released_bytes, 90 * MiB, "%" PRIu64 " bytes given back",
                  st.small_remote_released_bytes);
    if (rss_meaningful())
        cr_assert_lt(after + 80 * MiB, rss_before, "RSS %zu MiB before, %zu after",
                     rss_before >> 20, after >> 20);
}

Test(threads, trim_gives_back_blocks_freed_into_an_idle_heap, .timeout = 120)
{
    ta_option_set(TA_OPT_RETAIN_MS, 3600 * 1000); /* only trim can do it here */
    pthread_t owner;
    size_t before = free_idle_blocks(&owner);
    ta_trim(); /* malloc_trim(0) from another thread than the owner */
    assert_given_back(before, stats_now());
    finish_idle_owner(owner);
}

Test(threads, purge_thread_gives_back_blocks_freed_into_an_idle_heap, .timeout = 120)
{
    ta_option_set(TA_OPT_RETAIN_MS, 100);
    pthread_t owner;
    size_t before = free_idle_blocks(&owner);
    ta_stats_t st;
    for (int i = 0; i < 100; i++) { /* no allocator call: up to 5 s */
        usleep(50000);
        st = stats_now();
        if (st.small_remote_released_bytes >= 90 * MiB)
            break;
    }
    assert_given_back(before, st);
    finish_idle_owner(owner);
}

/* ---- an owner's own free pages, left when it goes idle --------------------
 * A thread frees everything it allocated itself and then makes no more
 * allocator calls: the free pages its heap keeps for reuse (below
 * PURGE_LIMIT) would wait for its next span release for ever. The purge
 * thread gives them back once they have waited RETAIN_MS. */
enum { OWN_BLOCKS = 6000, OWN_SIZE = 700 }; /* ~4 MB of small spans */

static void *own_free_then_idle(void *arg)
{
    (void)arg;
    static void *blocks[OWN_BLOCKS];
    for (int i = 0; i < OWN_BLOCKS; i++) {
        blocks[i] = ta_malloc(OWN_SIZE);
        memset(blocks[i], 3, OWN_SIZE);
    }
    for (int i = 0; i < OWN_BLOCKS; i++)
        ta_free(blocks[i]);
    idle_set_phase(1);
    idle_wait_phase(2);                    /* alive and idle: no allocator call */
    for (int i = 0; i < OWN_BLOCKS; i++) { /* and its heap works afterwards */
        blocks[i] = ta_malloc(OWN_SIZE);
        memset(blocks[i], 4, OWN_SIZE);
    }
    intptr_t bad = 0;
    for (int i = 0; i < OWN_BLOCKS; i++) {
        bad += ((unsigned char *)blocks[i])[OWN_SIZE - 1] != 4;
        ta_free(blocks[i]);
    }
    return (void *)bad;
}

/* Starts an owner that frees what it allocated and goes idle (phase 1),
 * with RETAIN_MS 100; join_idle_owner lets it go on and checks its blocks. */
static pthread_t start_idle_owner(void *(*body)(void *))
{
    ta_option_set(TA_OPT_RETAIN_MS, 100);
    idle_phase = 0;
    pthread_t owner;
    cr_assert_eq(pthread_create(&owner, NULL, body, NULL), 0);
    idle_wait_phase(1);
    return owner;
}

static void join_idle_owner(pthread_t owner, const char *corrupted)
{
    idle_set_phase(2);
    void *bad;
    pthread_join(owner, &bad);
    cr_assert_null(bad, "%s", corrupted);
}

Test(threads, purge_thread_gives_back_an_idle_owners_free_pages, .timeout = 60)
{
    pthread_t owner = start_idle_owner(own_free_then_idle);
    uint64_t left = stats_now().small_dirty_bytes, now = left;
    for (int i = 0; i < 60 && now > 64 * 1024; i++) { /* no allocator call here: up to 3 s */
        usleep(50000);
        now = stats_now().small_dirty_bytes;
    }
    cr_log_info("free slab pages: %llu KiB when the owner went idle, %llu KiB later",
                (unsigned long long)left / 1024, (unsigned long long)now / 1024);
    cr_assert_gt(left, 1024 * 1024, "the owner left free pages (%llu bytes)",
                 (unsigned long long)left);
    cr_assert_leq(now, 64 * 1024, "an idle owner's %llu bytes of free pages stayed",
                  (unsigned long long)now);
    join_idle_owner(owner, "the owner's blocks were corrupted after the purge");
}

/* ---- an owner's emptied big span, left when it goes idle -------------------
 * A thread frees its last block of a big class (16 KiB and up) and makes no
 * more allocator calls. The span it came from was its class's current one:
 * it is parked, and the purge thread takes it once it has stayed parked
 * RETAIN_MS (before parking, it stayed current and committed for good). */
enum { PARK_SIZE = 40000 }; /* class of 40 KiB blocks: 128 KiB spans */

static void *free_big_then_idle(void *arg)
{
    (void)arg;
    unsigned char *p = ta_malloc(PARK_SIZE);
    memset(p, 5, PARK_SIZE);
    ta_free(p);
    idle_set_phase(1);
    idle_wait_phase(2); /* alive and idle */
    intptr_t bad = 0;
    for (int round = 0; round < 3; round++) { /* the class works afterwards */
        p = ta_malloc(PARK_SIZE);
        pattern_fill(p, PARK_SIZE, (uint64_t)round);
        bad += !pattern_ok(p, PARK_SIZE, (uint64_t)round);
        ta_free(p);
    }
    return (void *)bad;
}

Test(threads, purge_thread_takes_an_idle_owners_emptied_big_span, .timeout = 60)
{
    pthread_t owner = start_idle_owner(free_big_then_idle);
    uint64_t left = stats_now().small_committed_bytes, now = left;
    for (int i = 0; i < 60 && now + 128 * 1024 > left; i++) { /* up to 3 s */
        usleep(50000);
        now = stats_now().small_committed_bytes;
    }
    cr_log_info("committed slab spans: %llu KiB when the owner went idle, %llu KiB later",
                (unsigned long long)left / 1024, (unsigned long long)now / 1024);
    cr_assert_leq(now + 128 * 1024, left, "an idle owner's emptied 128 KiB span stayed committed");
    join_idle_owner(owner, "a block of the class was corrupted after the purge took its span");
}

/* Owners that free their last big block and allocate the next while the
 * purge thread takes parked spans (RETAIN_MS 0: every pass that finds a
 * heap unchanged since its last look takes them): a block handed out from
 * a span the purge thread is giving back would lose its contents. Also
 * checks that the purge thread did take spans, in pauses of every thread. */
static atomic_int parked_taken;
static pthread_barrier_t park_pause;

static void *park_churn(void *arg)
{
    bool leader = (uintptr_t)arg == 1;
    uint64_t s = (uint64_t)(uintptr_t)arg * 2654435761u + 1;
    for (int i = 0; i < 1500; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t n = ((size_t)16 << 10) + (size_t)(s >> 33) % (200 << 10);
        unsigned char *p = ta_malloc(n);
        pattern_fill(p, n, (uint64_t)i);
        if (i % 3 == 0)
            usleep((useconds_t)((s >> 20) % 4000));
        if (!pattern_ok(p, n, (uint64_t)i))
            atomic_store(&bad_pattern, 1);
        ta_free(p);
        if (i % 50 == 49) { /* a pause of every thread: only the purge thread acts */
            pthread_barrier_wait(&park_pause);
            if (leader) {
                uint64_t before = stats_now().small_committed_bytes;
                usleep(40000);
                if (stats_now().small_committed_bytes < before)
                    atomic_fetch_add(&parked_taken, 1);
            }
            pthread_barrier_wait(&park_pause);
        } else if (i % 4 == 0) {
            usleep((useconds_t)((s >> 24) % 8000));
        }
    }
    return NULL;
}

Test(threads, big_blocks_stay_intact_while_the_purge_thread_takes_parked_spans, .timeout = 240)
{
    ta_option_set(TA_OPT_RETAIN_MS, 0);
    atomic_store(&bad_pattern, 0);
    atomic_store(&parked_taken, 0);
    cr_assert_eq(pthread_barrier_init(&park_pause, NULL, 3), 0);
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, park_churn, (void *)(uintptr_t)(i + 1)), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&park_pause);
    ta_option_set(TA_OPT_RETAIN_MS, 500);
    cr_log_info("pauses in which the purge thread took a parked span: %d of 30",
                atomic_load(&parked_taken));
    cr_assert_eq(atomic_load(&bad_pattern), 0, "a big block changed under its owner");
    cr_assert_gt(atomic_load(&parked_taken), 0, "the purge thread took no parked span");
}

/* ---- the per-span lists across thread exit --------------------------------
 * An owner hands its blocks to freeing threads and exits at once, so that
 * their frees (onto the spans' thread_free lists, notifying the spans) race
 * its heap's abandonment; the next owner adopts the heap with whatever is
 * pending. No block may be lost, handed out twice or changed. */
enum { RACE_BLOCKS = 3000, RACE_FREERS = 3 };

typedef struct {
    unsigned char *blocks[RACE_BLOCKS];
    size_t sizes[RACE_BLOCKS];
    atomic_int next; /* the freers' cursor */
    atomic_bool published;
} race_t;

static void *race_owner(void *arg)
{
    race_t *r = arg;
    uint64_t s = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < RACE_BLOCKS; i++) {
        s = s * 6364136223846793005ULL + 1;
        r->sizes[i] = 16 + (s >> 33) % 900;
        r->blocks[i] = ta_malloc(r->sizes[i]);
        pattern_fill(r->blocks[i], r->sizes[i], (uint64_t)i);
    }
    atomic_store(&r->published, true);
    return NULL; /* exits while the freers work */
}

static void *race_freer(void *arg)
{
    race_t *r = arg;
    while (!atomic_load(&r->published))
        ;
    for (int i; (i = atomic_fetch_add(&r->next, 1)) < RACE_BLOCKS;) {
        if (!pattern_ok(r->blocks[i], r->sizes[i], (uint64_t)i))
            atomic_store(&bad_pattern, 1);
        ta_free(r->blocks[i]);
    }
    return NULL;
}

Test(threads, cross_thread_frees_race_the_owners_exit, .timeout = 120)
{
    static race_t r;
    ta_trim();
    uint64_t live_before = stats_now().small_live_bytes;
    for (int round = 0; round < 40; round++) {
        memset(&r, 0, sizeof r);
        pthread_t owner, freers[RACE_FREERS];
        for (int i = 0; i < RACE_FREERS; i++)
            pthread_create(&freers[i], NULL, race_freer, &r);
        pthread_create(&owner, NULL, race_owner, &r);
        pthread_join(owner, NULL);
        for (int i = 0; i < RACE_FREERS; i++)
            pthread_join(freers[i], NULL);
        cr_assert_eq(atomic_load(&bad_pattern), 0, "round %d: a block changed before its free",
                     round);
    }
    ta_trim(); /* tidies the abandoned heaps: every pending free is taken */
    ta_stats_t st = stats_now();
    cr_assert_leq(st.heaps, 8, "heaps are adopted: %llu", (unsigned long long)st.heaps);
    cr_assert_lt(st.small_live_bytes, live_before + 64 * KiB,
                 "%" PRIu64 " bytes live after 40 rounds: frees were lost",
                 st.small_live_bytes - live_before);
}

/* A heap abandoned with blocks out, freed afterwards by another thread
 * (onto its span's thread_free, no owner to take them), is adopted by the
 * next thread, which gets every one of those blocks back from the same
 * span (after the blocks the span had never handed out), making no new
 * span. */
enum { ADOPT_BLOCKS = 500, ADOPT_SPAN = 65536 / 80 };
static void *adopt_freed[ADOPT_BLOCKS], *adopt_got[ADOPT_SPAN + 1];
static int adopt_reused, adopt_taken;

static void *allocate_and_exit(void *arg)
{
    (void)arg;
    for (int i = 0; i < ADOPT_BLOCKS; i++)
        adopt_freed[i] = ta_malloc(80);
    return NULL;
}

static int cmp_ptr(const void *a, const void *b)
{
    const char *x = *(void *const *)a, *y = *(void *const *)b;
    return x < y ? -1 : x > y;
}

static void *allocate_until_all_back(void *arg)
{
    (void)arg;
    while (adopt_reused < ADOPT_BLOCKS && adopt_taken <= ADOPT_SPAN) {
        void *p = ta_malloc(80);
        adopt_got[adopt_taken++] = p;
        adopt_reused += bsearch(&p, adopt_freed, ADOPT_BLOCKS, sizeof p, cmp_ptr) != NULL;
    }
    return NULL;
}

Test(threads, adopted_heap_reuses_blocks_freed_into_it)
{
    pthread_t t;
    pthread_create(&t, NULL, allocate_and_exit, NULL);
    pthread_join(t, NULL);
    for (int i = 0; i < ADOPT_BLOCKS; i++)
        ta_free(adopt_freed[i]); /* into the abandoned heap: other threads' frees */
    qsort(adopt_freed, ADOPT_BLOCKS, sizeof *adopt_freed, cmp_ptr);
    ta_stats_t before = stats_now();
    pthread_create(&t, NULL, allocate_until_all_back, NULL);
    pthread_join(t, NULL);
    ta_stats_t after = stats_now();
    cr_assert_eq(after.heaps, before.heaps, "the new thread made a heap instead of adopting");
    cr_assert_eq(adopt_reused, ADOPT_BLOCKS,
                 "%d of the %d freed blocks came back in %d allocations", adopt_reused,
                 ADOPT_BLOCKS, adopt_taken);
    cr_assert_eq(after.small_spans, before.small_spans, "a new span although blocks were free");
    for (int i = 0; i < adopt_taken; i++)
        ta_free(adopt_got[i]);
}

/* ta_trim tidies every abandoned heap, also while the purge thread is
 * tidying some of them: afterwards no block freed before the trim counts
 * as live. Threads leave blocks behind and exit; the main thread frees them
 * (into the abandoned heaps: each first free wakes the purge thread, which
 * takes heaps off the abandoned list to tidy them) and trims at once. */
enum { TIDY_THREADS = 8, TIDY_BLOCKS = 3000 };
static void *tidy_blocks[TIDY_THREADS][TIDY_BLOCKS];

static void *leave_blocks(void *arg)
{
    void **out = arg;
    for (int i = 0; i < TIDY_BLOCKS; i++)
        out[i] = ta_malloc(48 + (size_t)(i % 5) * 16);
    return NULL;
}

Test(threads, trim_reaches_heaps_the_purge_thread_is_tidying, .timeout = 120)
{
    ta_option_set(TA_OPT_RETAIN_MS, 1); /* the purge thread passes every few ms */
    ta_trim();
    uint64_t base = stats_now().small_live_bytes;
    for (int round = 0; round < 60; round++) {
        pthread_t t[TIDY_THREADS];
        for (int i = 0; i < TIDY_THREADS; i++)
            pthread_create(&t[i], NULL, leave_blocks, tidy_blocks[i]);
        for (int i = 0; i < TIDY_THREADS; i++)
            pthread_join(t[i], NULL);
        for (int i = 0; i < TIDY_THREADS; i++)
            for (int j = 0; j < TIDY_BLOCKS; j++)
                ta_free(tidy_blocks[i][j]);
        ta_trim();
        uint64_t live = stats_now().small_live_bytes;
        cr_assert_lt(live, base + 16 * KiB, "round %d: %" PRIu64 " bytes still live after trim",
                     round, live - base);
    }
}

/* Another library's key destructor that allocates in every round glibc
 * runs, the last included (it sets its key again in the first three).
 * A heap adopted in the last round used to stay owned by a thread that
 * no longer exists: never given up, never adopted, one lost per thread. */
static pthread_key_t late_key;

static void late_destructor(void *arg)
{
    uintptr_t round = (uintptr_t)arg;
    void *p = ta_malloc(96);
    cr_assert_not_null(p);
    memset(p, 1, 96);
    ta_free(p);
    ta_free(ta_malloc(200)); /* a block left in the heap's current span */
    if (round < PTHREAD_DESTRUCTOR_ITERATIONS)
        pthread_setspecific(late_key, (void *)(round + 1));
}

static void *thread_with_late_destructor(void *arg)
{
    ta_free(ta_malloc(64));
    pthread_setspecific(late_key, (void *)1);
    return arg;
}

Test(threads, allocations_in_the_last_destructor_round_lose_no_heap)
{
    ta_free(ta_malloc(64)); /* the allocator's own key first */
    cr_assert_eq(pthread_key_create(&late_key, late_destructor), 0);
    uint64_t before = stats_now().heaps;
    for (int i = 0; i < 40; i++) {
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, thread_with_late_destructor, NULL), 0);
        cr_assert_eq(pthread_join(t, NULL), 0);
    }
    uint64_t after = stats_now().heaps;
    cr_assert_leq(after, before + 2, "%" PRIu64 " heaps after 40 threads (%" PRIu64 " before)",
                  after, before);
}

/* Frees from another thread that race their owner's exit: a free that
 * read the heap as still owned woke no one, and the owner gave the heap up
 * after its last tidy; the blocks waited for an unrelated wake. They are
 * drained without any further allocator call. */
enum { OWNER_RACE_BLOCKS = 512 };
static void *exit_race_blocks[OWNER_RACE_BLOCKS];
static atomic_int race_go;

static void *owner_then_exit(void *arg)
{
    for (int i = 0; i < OWNER_RACE_BLOCKS; i++)
        exit_race_blocks[i] = ta_malloc(48 + (size_t)(i % 8) * 16);
    atomic_store(&race_go, 1);
    return arg; /* exits while the other thread frees */
}

static void *free_them(void *arg)
{
    while (!atomic_load(&race_go))
        ;
    for (int i = 0; i < OWNER_RACE_BLOCKS; i++)
        ta_free(exit_race_blocks[i]);
    return arg;
}

Test(threads, frees_racing_their_owners_exit_are_drained, .timeout = 120)
{
    ta_option_set(TA_OPT_RETAIN_MS, 50);
    for (int round = 0; round < 300; round++) {
        atomic_store(&race_go, 0);
        pthread_t a, b;
        cr_assert_eq(pthread_create(&b, NULL, free_them, NULL), 0);
        cr_assert_eq(pthread_create(&a, NULL, owner_then_exit, NULL), 0);
        pthread_join(a, NULL);
        pthread_join(b, NULL);
    }
    uint64_t live = 0;
    for (int i = 0; i < 60; i++) { /* no allocator call: up to 3 s */
        usleep(50000);
        if ((live = stats_now().small_live_bytes) < 64 * KiB)
            break;
    }
    cr_assert_lt(live, 64 * KiB, "%" PRIu64 " bytes freed into ended threads' heaps wait", live);
}

/* The same race made certain with the slab's abandon hook: the other
 * thread frees the owner's block after the owner's last tidy, while the
 * heap still reads as owned; then, between marking the heap abandoned and
 * putting it on the abandoned list, the owner stops for 600 ms, long
 * enough for the purge thread to finish its passes (it skips abandoned
 * heaps and has not seen this one listed). Before: the block waited for an
 * unrelated wake; now the owner looks again once the heap is listed. */
static void *_Atomic abandon_block;
static atomic_int freer_go, freer_done;
static _Atomic(void *) abandon_owner_id;

static void abandon_hook(int stage)
{
    if (atomic_load(&abandon_owner_id) != (void *)pthread_self())
        return;
    if (stage == 0) {
        atomic_store(&freer_go, 1);
        while (!atomic_load(&freer_done))
            usleep(1000);
    } else {
        usleep(600000);
    }
}

static void *owner_allocates_then_exits(void *arg)
{
    atomic_store(&abandon_owner_id, (void *)pthread_self());
    atomic_store(&abandon_block, ta_malloc(100 * KiB / 2));
    return arg;
}

static void *freer_waits_then_frees(void *arg)
{
    while (!atomic_load(&freer_go))
        usleep(1000);
    ta_free(atomic_load(&abandon_block));
    atomic_store(&freer_done, 1);
    return arg;
}

Test(threads, a_free_between_the_owners_last_tidy_and_its_abandon_is_drained, .timeout = 60)
{
    ta_option_set(TA_OPT_RETAIN_MS, 100);
    ta_free(ta_malloc(64));
    uint64_t live_before = stats_now().small_live_bytes;
    atomic_store(&_ta_small_abandon_hook, abandon_hook);
    pthread_t owner, freer;
    cr_assert_eq(pthread_create(&freer, NULL, freer_waits_then_frees, NULL), 0);
    cr_assert_eq(pthread_create(&owner, NULL, owner_allocates_then_exits, NULL), 0);
    pthread_join(owner, NULL);
    pthread_join(freer, NULL);
    atomic_store(&_ta_small_abandon_hook, NULL);
    uint64_t live = 0;
    for (int i = 0; i < 60; i++) { /* no allocator call: up to 3 s */
        usleep(50000);
        if ((live = stats_now().small_live_bytes) <= live_before)
            break;
    }
    cr_assert_leq(live, live_before, "%" PRIu64 " bytes live, %" PRIu64 " before: the block waits",
                  live, live_before);
}

/* ---- free pages across thread exit ----------------------------------------
 * A thread pool's threads come and go (mstress starts new ones every
 * round): an exiting thread's free slab pages wait RETAIN_MS in its
 * abandoned heap, so that the next thread adopts them without faults, and
 * then the purge thread gives them back. */
enum { EXIT_BLOCKS = 10000, EXIT_SIZE = 200 }; /* ~2 MiB: one segment, the spare */
static void *exit_blocks[EXIT_BLOCKS];
static long exit_faults;

static long thread_minor_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_minflt;
}

static void *allocate_free_and_exit(void *arg)
{
    for (int i = 0; i < EXIT_BLOCKS; i++) {
        exit_blocks[i] = ta_malloc(EXIT_SIZE);
        memset(exit_blocks[i], 3, EXIT_SIZE);
    }
    for (int i = 0; i < EXIT_BLOCKS; i++)
        ta_free(exit_blocks[i]);
    return arg;
}

static void *allocate_counting_faults(void *arg)
{
    long f0 = thread_minor_faults();
    for (int i = 0; i < EXIT_BLOCKS; i++) {
        exit_blocks[i] = ta_malloc(EXIT_SIZE);
        memset(exit_blocks[i], 4, EXIT_SIZE);
    }
    exit_faults = thread_minor_faults() - f0;
    for (int i = 0; i < EXIT_BLOCKS; i++)
        ta_free(exit_blocks[i]);
    return arg;
}

Test(threads, an_exited_threads_free_pages_wait_for_the_next_thread, .timeout = 60)
{
    ta_option_set(TA_OPT_RETAIN_MS, 1000);
    ta_free(ta_malloc(64)); /* this thread's heap exists: the workers' heap is the one adopted */
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, allocate_free_and_exit, NULL), 0);
    pthread_join(t, NULL);
    size_t waiting = rss_bytes();
    cr_assert_eq(pthread_create(&t, NULL, allocate_counting_faults, NULL), 0);
    pthread_join(t, NULL);
    /* Purged at exit, the second thread faulted its ~1000 pages again. */
    cr_log_info("the next thread faulted %ld pages", exit_faults);
    cr_assert_lt(exit_faults, 100, "the next thread faulted %ld pages: the exit gave them back",
                 exit_faults);
    size_t left = rss_bytes();
    for (int i = 0; i < 60 && left + 2 * MiB > waiting; i++) { /* up to 3 s */
        usleep(50000);
        left = rss_bytes();
    }
    cr_assert_lt(left + 2 * MiB, waiting,
                 "RSS %zu MiB, %zu with the pages waiting: the purge thread kept them", left / MiB,
                 waiting / MiB);
}

/* Without a purge thread nothing would give those pages back later: an
 * exiting thread's heap is purged at once, as before. */
Test(threads, without_a_purge_thread_an_exiting_thread_gives_its_pages_back, .timeout = 60)
{
    ta_option_set(TA_OPT_PURGE_THREAD, 0);
    ta_option_set(TA_OPT_RETAIN_MS, 1000);
    ta_free(ta_malloc(64));
    cr_assert(!_ta_purge_thread_running(), "a purge thread runs although PURGE_THREAD is off");
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, allocate_free_and_exit, NULL), 0);
    pthread_join(t, NULL);
    uint64_t dirty = stats_now().small_dirty_bytes;
    cr_assert_lt(dirty, 256 * KiB, "%" PRIu64 " KiB of free pages wait with no one to purge them",
                 dirty / 1024);
}
