/* SPDX-License-Identifier: MIT */
/*
 * model-switch: the access pattern of a model cache. Several "models" of
 * hundreds to a thousand tensors (256 B to tens of MiB, a realistic mix)
 * are loaded by loader threads (each tensor allocated and filled, as a
 * read from disk would), kept in an LRU cache with a byte budget, switched
 * between, and evicted. Small long-lived objects (registries, names,
 * Python-ish bookkeeping) are allocated between tensors and outlive the
 * models, which is what pins glibc's arenas. Everything is freed at the end.
 *
 * Reports: wall time, peak RSS, peak live bytes, RSS at start, right
 * after the final free and one second later, and minor page faults.
 */
#include "bench.h"

#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

typedef struct {
    size_t count;
    size_t *sizes;  /* per tensor */
    void **tensors; /* NULL when not loaded */
    void **meta;    /* a small object per tensor, freed with the model */
    size_t bytes;   /* sum of sizes */
    atomic_size_t meta_bytes;
    uint64_t last_used; /* LRU clock */
    int loaded;
} model_t;

static struct {
    int models, switches, threads;
    size_t budget;
    double scale;
    uint64_t seed;
} cfg = {8, 24, 2, (size_t)2048 << 20, 0.35, 1};

static model_t *models;
static atomic_llong live_bytes, peak_live;
static void **longlived;
static atomic_size_t longlived_count;
static size_t longlived_cap;

static void live_add(long long n)
{
    long long now = atomic_fetch_add(&live_bytes, n) + n;
    long long peak = atomic_load(&peak_live);
    while (now > peak && !atomic_compare_exchange_weak(&peak_live, &peak, now))
        ;
}

static void *xmalloc(size_t n)
{
    void *p = b_malloc(n);
    if (!p) {
        fprintf(stderr, "model-switch: allocation of %zu bytes failed\n", n);
        exit(1);
    }
    return p;
}

/* A realistic mix of tensor sizes: many small (norms, biases), medium
 * projections, big matrices and a few huge embeddings. */
static size_t tensor_size(uint64_t *s)
{
    unsigned r = (unsigned)(rng_next(s) % 100);
    size_t n;
    if (r < 40)
        n = rng_log_uniform(s, 256, 16 << 10);
    else if (r < 70)
        n = rng_log_uniform(s, 16 << 10, 1 << 20);
    else if (r < 96)
        n = rng_log_uniform(s, 1 << 20, 16 << 20);
    else
        n = rng_log_uniform(s, 16 << 20, 52 << 20);
    n = (size_t)((double)n * cfg.scale);
    n = n < 256 ? 256 : n;
    return n & ~(size_t)3; /* fp32 elements */
}

static void models_init(void)
{
    models = calloc((size_t)cfg.models, sizeof *models);
    uint64_t s = cfg.seed * 7919;
    for (int m = 0; m < cfg.models; m++) {
        model_t *md = &models[m];
        md->count = 300 + rng_next(&s) % 901;
        md->sizes = calloc(md->count, sizeof(size_t));
        md->tensors = calloc(md->count, sizeof(void *));
        md->meta = calloc(md->count, sizeof(void *));
        for (size_t i = 0; i < md->count; i++) {
            md->sizes[i] = tensor_size(&s);
            md->bytes += md->sizes[i];
        }
    }
    longlived_cap = 64;
    for (int m = 0; m < cfg.models; m++)
        longlived_cap += models[m].count * (size_t)cfg.switches / 4 + 64;
    longlived = calloc(longlived_cap, sizeof(void *));
}

typedef struct {
    model_t *md;
    atomic_size_t next;
} load_job_t;

/* Loader thread: takes tensors off a shared counter; each tensor is
 * allocated the way PyTorch does (posix_memalign 64) and filled. */
static void *loader(void *arg)
{
    load_job_t *job = arg;
    model_t *md = job->md;
    uint64_t s = (uint64_t)(uintptr_t)&s ^ cfg.seed;
    size_t i;
    while ((i = atomic_fetch_add(&job->next, 1)) < md->count) {
        size_t n = md->sizes[i];
        void *t;
        if (b_posix_memalign(&t, 64, n) != 0) {
            fprintf(stderr, "model-switch: posix_memalign(%zu) failed\n", n);
            exit(1);
        }
        memset(t, (int)(i & 0xff), n);
        md->tensors[i] = t;
        size_t mn = 64 + (size_t)(rng_next(&s) % 448);
        md->meta[i] = xmalloc(mn);
        memset(md->meta[i], 1, mn);
        atomic_fetch_add(&md->meta_bytes, mn);
        live_add((long long)(n + mn));
        if (rng_next(&s) % 4 == 0) { /* bookkeeping that outlives the model */
            size_t k = atomic_fetch_add(&longlived_count, 1);
            if (k < longlived_cap) {
                size_t ln = 32 + (size_t)(rng_next(&s) % 224);
                longlived[k] = xmalloc(ln);
                memset(longlived[k], 2, ln);
                live_add((long long)ln);
            }
        }
    }
    return NULL;
}

static void model_load(model_t *md)
{
    load_job_t job = {.md = md};
    atomic_init(&job.next, 0);
    pthread_t t[64];
    int n = cfg.threads < 64 ? cfg.threads : 64;
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, loader, &job);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    md->loaded = 1;
}

static void model_evict(model_t *md)
{
    for (size_t i = 0; i < md->count; i++) {
        b_free(md->tensors[i]);
        b_free(md->meta[i]);
        md->tensors[i] = md->meta[i] = NULL;
    }
    live_add(-(long long)(md->bytes + atomic_exchange(&md->meta_bytes, 0)));
    md->loaded = 0;
}

static size_t cached_bytes(void)
{
    size_t total = 0;
    for (int m = 0; m < cfg.models; m++)
        if (models[m].loaded)
            total += models[m].bytes;
    return total;
}

static void usage(void)
{
    fprintf(stderr, "usage: model_switch [--models N] [--switches N] [--budget-mib N] "
                    "[--threads N] [--scale F] [--seed N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"models", 1, 0, 'm'},
                                         {"switches", 1, 0, 's'},
                                         {"budget-mib", 1, 0, 'b'},
                                         {"threads", 1, 0, 't'},
                                         {"scale", 1, 0, 'c'},
                                         {"seed", 1, 0, 'r'},
                                         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': cfg.models = atoi(optarg); break;
        case 's': cfg.switches = atoi(optarg); break;
        case 'b': cfg.budget = (size_t)atoll(optarg) << 20; break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'c': cfg.scale = atof(optarg); break;
        case 'r': cfg.seed = (uint64_t)atoll(optarg); break;
        default: usage();
        }
    }
    if (cfg.models < 1 || cfg.switches < 1 || cfg.threads < 1 || cfg.scale <= 0)
        usage();

    size_t rss_start = status_bytes("VmRSS");
    long faults0 = minor_faults();
    double t0 = now_s();
    models_init();
    uint64_t s = cfg.seed;
    uint64_t clock = 0;
    int hits = 0, loads = 0, evictions = 0;
    for (int k = 0; k < cfg.switches; k++) {
        model_t *md = &models[rng_next(&s) % (uint64_t)cfg.models];
        md->last_used = ++clock;
        if (md->loaded) {
            hits++;
            volatile unsigned char sink = 0;
            for (size_t i = 0; i < md->count; i += 7)
                sink ^= ((unsigned char *)md->tensors[i])[md->sizes[i] / 2];
            (void)sink;
            continue;
        }
        while (cached_bytes() + md->bytes > cfg.budget) {
            model_t *lru = NULL;
            for (int m = 0; m < cfg.models; m++)
                if (models[m].loaded && (!lru || models[m].last_used < lru->last_used))
                    lru = &models[m];
            if (!lru)
                break;
            model_evict(lru);
            evictions++;
        }
        model_load(md);
        loads++;
    }
    for (int m = 0; m < cfg.models; m++)
        if (models[m].loaded)
            model_evict(&models[m]);
    size_t n_long = atomic_load(&longlived_count);
    for (size_t i = 0; i < n_long && i < longlived_cap; i++)
        b_free(longlived[i]);
    double wall = now_s() - t0;
    size_t rss_end = status_bytes("VmRSS");
    long faults = minor_faults() - faults0;
    size_t hwm = status_bytes("VmHWM");
    sleep(1);
    size_t rss_1s = status_bytes("VmRSS");

    report_str("workload", "model-switch");
    report_str("api", BENCH_API);
    report_num("wall_s", wall);
    report_num("peak_rss_mib", (double)hwm / MiB);
    report_num("peak_live_mib", (double)atomic_load(&peak_live) / MiB);
    report_num("rss_start_mib", (double)rss_start / MiB);
    report_num("rss_end_mib", (double)rss_end / MiB);
    report_num("rss_1s_mib", (double)rss_1s / MiB);
    report_num("rss_1s_above_start_mib", ((double)rss_1s - (double)rss_start) / MiB);
    report_num("minor_faults", (double)faults);
    report_num("loads", loads);
    report_num("hits", hits);
    report_num("evictions", evictions);
    return 0;
}
