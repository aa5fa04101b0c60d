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
 *
 * The threaded shapes of issue 26, after the programs of mimalloc-bench
 * (each written here from its description, not its code):
 *
 *   small_bench server  [threads] [ops] [rounds]  Larson and Krishnan's server: each thread
 * replaces random blocks (8-1000 B) of an array of 5000; every round new threads take over the
 * arrays, shifted by one, so blocks are freed by threads other than (and often after the exit of)
 * the one that allocated them small_bench rptest  [threads] [ops]  rpmalloc's test: each loop
 * allocates 1000 blocks of 8 B-16000 B, hands them to the next thread through a mailbox and frees
 * what its own mailbox holds small_bench mstress [threads] [ops] [rounds]  mimalloc's stress test:
 * each thread allocates, frees and swaps blocks with a shared transfer array (mostly 8-256 B, 1 in
 * 64 up to 32 KiB); half of what a round's thread holds is left to the next round's thread with its
 * index small_bench xmalloc [ops]               prodcons with every block 64 B (xmalloc-test)
 *   small_bench scratch [threads] [ops]     cache-scratch (passive false sharing): the main
 *                                         thread allocates one 8 B object per thread, each
 *                                         thread frees it, then allocates 8 B, writes it 100
 *                                         times and frees it, again; an allocator that hands
 *                                         the freed neighbour back shares cache lines
 *   small_bench mixed   [ops]               one thread, mimalloc-bench's alloc-test: sizes of
 *                                         8 B-16 KiB (1 in 16 up to 64 KiB) in 8192 slots, a
 *                                         fifth of them grown with realloc
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

static size_t prodcons_size; /* 0: small_size's mix */

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
            items[i] = b_malloc(prodcons_size ? prodcons_size : small_size(&s, 512));
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

/* ---- server: Larson's rounds of threads taking over each other's blocks -- */

enum { SERVER_BLOCKS = 5000 };
static void **server_blocks; /* nthreads arrays of SERVER_BLOCKS */
static long server_ops;      /* per thread per round */

typedef struct {
    void **blocks;
    uint64_t seed;
} server_arg_t;

static void *server_round(void *arg)
{
    server_arg_t *a = arg;
    for (long i = 0; i < server_ops; i++) {
        size_t k = (size_t)(rng_next(&a->seed) % SERVER_BLOCKS);
        b_free(a->blocks[k]);
        size_t n = 8 + (size_t)(rng_next(&a->seed) % 993);
        a->blocks[k] = b_malloc(n);
        *(volatile char *)a->blocks[k] = (char)n;
    }
    atomic_fetch_add(&total_ops, 2 * server_ops);
    return NULL;
}

static void run_server(long rounds)
{
    size_t all = (size_t)SERVER_BLOCKS * (size_t)nthreads;
    server_blocks = calloc(all, sizeof *server_blocks);
    uint64_t s = 11;
    for (size_t k = 0; k < all; k++) /* the main thread allocates: the first frees are foreign */
        server_blocks[k] = b_malloc(8 + (size_t)(rng_next(&s) % 993));
    server_ops = total_ops_target / 2 / nthreads / rounds;
    server_arg_t args[64];
    pthread_t t[64];
    for (long r = 0; r < rounds; r++) {
        for (int i = 0; i < nthreads; i++) {
            size_t slice = (size_t)((i + r) % nthreads);
            args[i] = (server_arg_t){server_blocks + slice * SERVER_BLOCKS,
                                     (uint64_t)(r * nthreads + i) * 7919 + 5};
            pthread_create(&t[i], NULL, server_round, &args[i]);
        }
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
    }
    for (size_t k = 0; k < all; k++)
        b_free(server_blocks[k]);
    free(server_blocks);
}

/* ---- rptest: batches handed to the next thread through mailboxes -------- */

enum { RP_BATCH = 1000 };
static _Atomic(void **) *mailbox; /* one per thread: a batch for it, or NULL */
static long rp_loops;

static void free_batch(void **b)
{
    for (int i = 0; i < RP_BATCH; i++)
        b_free(b[i]);
    b_free(b);
}

static void *rptest_worker(void *arg)
{
    int me = (int)(uintptr_t)arg;
    uint64_t s = (uint64_t)me * 104729 + 17;
    long ops = 0;
    for (long l = 0; l < rp_loops; l++) {
        void **b = b_malloc(RP_BATCH * sizeof *b);
        for (int i = 0; i < RP_BATCH; i++) {
            uint64_t r = rng_next(&s); /* most small, a tail up to 16000 B */
            size_t n = (r & 3) ? 8 + (r >> 8) % 248 : rng_log_uniform(&s, 8, 16000);
            b[i] = b_malloc(n);
            *(volatile char *)b[i] = 1;
        }
        /* a batch the next thread has not taken yet is freed here instead */
        void **unread = atomic_exchange(&mailbox[(me + 1) % nthreads], b);
        if (unread)
            free_batch(unread);
        void **mine = atomic_exchange(&mailbox[me], NULL);
        if (mine)
            free_batch(mine);
        ops += 2 * (RP_BATCH + 1);
    }
    atomic_fetch_add(&total_ops, ops);
    return NULL;
}

/* ---- mstress: blocks swapped through a shared transfer array ------------ */

enum { MS_TRANSFER = 1000, MS_KEEP = 1024 };
static _Atomic(void *) ms_transfer[MS_TRANSFER];
static void **ms_left[64]; /* what each index's thread left for the next round */
static long ms_ops;
static long ms_round; /* written between rounds, before the threads start */

static void *ms_alloc(uint64_t *s)
{
    uint64_t r = rng_next(s);
    size_t n = (r & 63) == 0 ? rng_log_uniform(s, 256, 32768) : 8 + (r >> 8) % 249;
    char *p = b_malloc(n);
    p[0] = p[n - 1] = (char)n;
    return p;
}

static void *mstress_worker(void *arg)
{
    int me = (int)(uintptr_t)arg;
    uint64_t s = (uint64_t)me * 1299709 + (uint64_t)ms_round * 7919;
    void **keep = ms_left[me] ? ms_left[me] : calloc(MS_KEEP, sizeof *keep);
    long ops = 0;
    for (long i = 0; i < ms_ops; i++) {
        uint64_t r = rng_next(&s);
        size_t k = (size_t)(r >> 16) % MS_KEEP;
        switch (r & 3) {
        case 0: /* free one */
            b_free(keep[k]), ops++;
            keep[k] = NULL;
            break;
        case 1: /* swap one with the other threads */
            if (!keep[k])
                keep[k] = ms_alloc(&s), ops++;
            keep[k] = atomic_exchange(&ms_transfer[(r >> 40) % MS_TRANSFER], keep[k]);
            break;
        default: /* replace one */ b_free(keep[k]); keep[k] = ms_alloc(&s), ops += 2;
        }
    }
    for (size_t k = 0; k < MS_KEEP; k += 2) /* half stays for the next round */
        b_free(keep[k]), keep[k] = NULL, ops++;
    ms_left[me] = keep;
    atomic_fetch_add(&total_ops, ops);
    return NULL;
}

static void run_mstress(long rounds)
{
    ms_ops = total_ops_target / 2 / nthreads / rounds;
    pthread_t t[64];
    for (long r = 0; r < rounds; r++) {
        ms_round = r;
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, mstress_worker, (void *)(uintptr_t)i);
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
    }
    for (int i = 0; i < nthreads; i++) {
        for (size_t k = 0; ms_left[i] && k < MS_KEEP; k++)
            b_free(ms_left[i][k]);
        free(ms_left[i]);
    }
    for (size_t k = 0; k < MS_TRANSFER; k++)
        b_free(atomic_load(&ms_transfer[k]));
}

/* ---- scratch: passive false sharing ------------------------------------- */

static void *scratch_worker(void *arg)
{
    b_free(arg); /* the main thread's object, next to the other threads' */
    long rounds = total_ops_target / 2 / nthreads;
    for (long i = 0; i < rounds; i++) {
        volatile char *p = b_malloc(8);
        for (int w = 0; w < 100; w++)
            p[w & 7] = (char)(p[w & 7] + 1);
        b_free((void *)p);
    }
    atomic_fetch_add(&total_ops, 2 * rounds);
    return NULL;
}

/* ---- mixed: one thread, sizes up to 64 KiB, some grown ------------------- */

enum { MIXED_SLOTS = 8192 };

static void run_mixed(void)
{
    uint64_t s = 23;
    void **slot = calloc(MIXED_SLOTS, sizeof *slot);
    size_t *len = calloc(MIXED_SLOTS, sizeof *len);
    long ops = total_ops_target / 2, done = 0;
    for (long i = 0; i < ops; i++) {
        size_t k = (size_t)(rng_next(&s) % MIXED_SLOTS);
        uint64_t r = rng_next(&s);
        if (slot[k] && r % 5 == 0) { /* grow it */
            size_t n = len[k] + len[k] / 2 + 8;
            char *p = b_realloc(slot[k], n);
            p[n - 1] = 1;
            slot[k] = p, len[k] = n;
            done++; /* one call */
            continue;
        }
        b_free(slot[k]);
        size_t n = rng_log_uniform(&s, 8, (r & 15) == 0 ? 65536 : 16384);
        char *p = b_malloc(n);
        p[0] = p[n - 1] = 1;
        slot[k] = p, len[k] = n;
        done += 2;
    }
    for (int k = 0; k < MIXED_SLOTS; k++)
        b_free(slot[k]);
    free(slot);
    free(len);
    atomic_fetch_add(&total_ops, done);
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
                    " larson [threads] [ops] | pingpong [size] [ops] [pause_every] |"
                    " server [threads] [ops] [rounds] | rptest [threads] [ops] |"
                    " mstress [threads] [ops] [rounds] | xmalloc [ops] | scratch [threads] [ops] |"
                    " mixed [ops]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    bool threaded = strcmp(mode, "thread") == 0 || strcmp(mode, "larson") == 0 ||
                    strcmp(mode, "server") == 0 || strcmp(mode, "rptest") == 0 ||
                    strcmp(mode, "mstress") == 0 || strcmp(mode, "scratch") == 0;
    long rounds = 100;
    if (threaded) {
        nthreads = argc > 2 ? atoi(argv[2]) : 2;
        total_ops_target = argc > 3 ? atol(argv[3]) : total_ops_target;
        rounds = argc > 4 ? atol(argv[4]) : rounds;
        bool by_rounds = strcmp(mode, "server") == 0 || strcmp(mode, "mstress") == 0;
        long per_thread = total_ops_target / 2 / (nthreads > 0 ? nthreads : 1);
        if (by_rounds && (rounds < 1 || per_thread / rounds < 1))
            usage();
        if (strcmp(mode, "rptest") == 0 && per_thread / RP_BATCH < 1)
            usage(); /* not one loop of RP_BATCH blocks */
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
    } else if (strcmp(mode, "prodcons") == 0 || strcmp(mode, "xmalloc") == 0) {
        prodcons_size = strcmp(mode, "xmalloc") == 0 ? 64 : 0;
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
    } else if (strcmp(mode, "server") == 0) {
        run_server(rounds);
    } else if (strcmp(mode, "rptest") == 0) {
        mailbox = calloc((size_t)nthreads, sizeof *mailbox);
        rp_loops = total_ops_target / 2 / RP_BATCH / nthreads;
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, rptest_worker, (void *)(uintptr_t)i);
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
        for (int i = 0; i < nthreads; i++)
            if (mailbox[i])
                free_batch(mailbox[i]);
        free(mailbox);
    } else if (strcmp(mode, "mstress") == 0) {
        run_mstress(rounds);
    } else if (strcmp(mode, "scratch") == 0) {
        void *objs[64];
        for (int i = 0; i < nthreads; i++)
            objs[i] = b_malloc(8);
        for (int i = 0; i < nthreads; i++)
            pthread_create(&t[i], NULL, scratch_worker, objs[i]);
        for (int i = 0; i < nthreads; i++)
            pthread_join(t[i], NULL);
    } else if (strcmp(mode, "mixed") == 0) {
        run_mixed();
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
