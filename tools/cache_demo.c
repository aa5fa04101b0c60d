/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc-cache-demo: a model cache switching between safetensors
 * files, done two ways so they can be compared under any allocator:
 *
 *   tensoralloc-cache-demo make DIR [--models N] [--scale F]
 *       writes N synthetic models (hundreds of tensors, 256 B to tens of MiB)
 *   tensoralloc-cache-demo run DIR [--mode cache|plain] [--budget-mib N]
 *                          [--switches N] [--verbose]
 *       cache: tensoralloc's model cache (budget, LRU, per-tensor mappings),
 *              printing its statistics and the snapshot diff of each load;
 *       plain: the same switching with malloc + read and a hand-written LRU,
 *              as a program without tensoralloc's cache would do it.
 *
 * Both print key=value lines (time, peak RSS, RSS after clearing and one
 * second later) for bench/run.
 */
#define _GNU_SOURCE
#include "tensoralloc_cache.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static size_t status_bytes(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kib = 0, len = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, len) == 0 && line[len] == ':')
            kib = strtoull(line + len + 1, NULL, 10);
    if (f)
        fclose(f);
    return kib * 1024;
}

static uint64_t rng(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

/* ---- make: synthetic safetensors models ----------------------------------- */

static int make_models(const char *dir, int models, double scale)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        perror(dir);
        return 1;
    }
    uint64_t s = 7;
    for (int m = 0; m < models; m++) {
        int count = 200 + (int)(rng(&s) % 500);
        cJSON *hdr = cJSON_CreateObject();
        uint64_t off = 0;
        for (int i = 0; i < count; i++) {
            unsigned r = (unsigned)(rng(&s) % 100);
            double lo = r < 40 ? 256 : r < 70 ? 16384 : r < 96 ? 1048576 : 16777216;
            double hi = r < 40 ? 16384 : r < 70 ? 1048576 : r < 96 ? 16777216 : 54525952;
            double u = (double)rng(&s) / 2147483648.0;
            uint64_t elems = (uint64_t)(lo * __builtin_pow(hi / lo, u) * scale / 4) + 1;
            char name[32];
            snprintf(name, sizeof name, "layer%d.weight", i);
            cJSON *t = cJSON_AddObjectToObject(hdr, name);
            cJSON_AddStringToObject(t, "dtype", "F32");
            cJSON *shape = cJSON_AddArrayToObject(t, "shape");
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)elems));
            cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + elems * 4)));
            off += elems * 4;
        }
        char *text = cJSON_PrintUnformatted(hdr);
        char path[4096];
        snprintf(path, sizeof path, "%s/model%d.safetensors", dir, m);
        FILE *f = fopen(path, "wb");
        if (!f) {
            perror(path);
            return 1;
        }
        uint64_t n = strlen(text);
        unsigned char len8[8];
        for (int i = 0; i < 8; i++)
            len8[i] = (unsigned char)(n >> (8 * i));
        fwrite(len8, 1, 8, f);
        fwrite(text, 1, n, f);
        static unsigned char block[1 << 20];
        for (size_t i = 0; i < sizeof block; i++)
            block[i] = (unsigned char)(i * 31 + (size_t)m);
        for (uint64_t left = off; left;) {
            size_t k = left < sizeof block ? (size_t)left : sizeof block;
            fwrite(block, 1, k, f);
            left -= k;
        }
        fclose(f);
        printf("%s: %d tensors, %.1f MiB\n", path, count, (double)off / MiB);
        cJSON_free(text);
        cJSON_Delete(hdr);
    }
    return 0;
}

/* ---- plain: malloc + read, a hand-written LRU --------------------------------- */

typedef struct {
    void **tensors;
    size_t count, bytes;
    uint64_t used;
    int loaded;
} plain_model_t;

static int plain_load(const char *path, plain_model_t *m)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    unsigned char len8[8];
    if (read(fd, len8, 8) != 8) {
        close(fd);
        return -1;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | len8[i];
    char *text = malloc(n + 1);
    if (pread(fd, text, n, 8) != (ssize_t)n) {
        free(text);
        close(fd);
        return -1;
    }
    text[n] = 0;
    cJSON *hdr = cJSON_Parse(text);
    free(text);
    m->count = (size_t)cJSON_GetArraySize(hdr);
    m->tensors = calloc(m->count, sizeof(void *));
    m->bytes = 0;
    size_t i = 0;
    for (cJSON *t = hdr ? hdr->child : NULL; t; t = t->next, i++) {
        cJSON *offs = cJSON_GetObjectItem(t, "data_offsets");
        uint64_t b = (uint64_t)offs->child->valuedouble,
                 e = (uint64_t)offs->child->next->valuedouble;
        size_t len = (size_t)(e - b);
        void *p = malloc(len ? len : 1); /* what a loader without tensoralloc does */
        for (size_t done = 0; done < len;) {
            ssize_t got = pread(fd, (char *)p + done, len - done, (off_t)(8 + n + b + done));
            if (got <= 0)
                break;
            done += (size_t)got;
        }
        m->tensors[i] = p;
        m->bytes += len;
    }
    cJSON_Delete(hdr);
    close(fd);
    m->loaded = 1;
    return 0;
}

static void plain_free(plain_model_t *m)
{
    for (size_t i = 0; i < m->count; i++)
        free(m->tensors[i]);
    free(m->tensors);
    m->tensors = NULL;
    m->count = 0;
    m->bytes = 0;
    m->loaded = 0;
}

/* ---- run ------------------------------------------------------------------------ */

static void demo_log(void *arg, ta_log_level_t level, const char *msg)
{
    (void)arg;
    static const char *names[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    fprintf(stderr, "[%s] %s\n", names[level], msg);
}

static int count_models(const char *dir)
{
    int n = 0;
    char path[4096];
    for (;; n++) {
        snprintf(path, sizeof path, "%s/model%d.safetensors", dir, n);
        if (access(path, R_OK) != 0)
            return n;
    }
}

static int run(const char *dir, const char *mode, size_t budget, int switches, int verbose)
{
    int models = count_models(dir);
    if (models == 0) {
        fprintf(stderr, "no model*.safetensors in %s (make them with: make %s)\n", dir, dir);
        return 2;
    }
    bool use_cache = strcmp(mode, "cache") == 0;
    size_t rss_start = status_bytes("VmRSS");
    double t0 = now_s();
    uint64_t s = 99, clock = 0;
    int loads = 0, hits = 0;
    char path[4096], key[32];
    if (use_cache) {
        ta_cache_config_t cfg = {.size = sizeof cfg,
                                 .ram_budget = budget,
                                 .overflow = TA_OVERFLOW_REFUSE,
                                 .log = verbose ? demo_log : NULL,
                                 .log_level = verbose ? TA_LOG_DEBUG : TA_LOG_ERROR};
        ta_cache_t *c;
        if (ta_cache_create(&cfg, &c) != 0)
            return 1;
        for (int k = 0; k < switches; k++) {
            int m = (int)(rng(&s) % (uint64_t)models);
            snprintf(key, sizeof key, "model%d", m);
            snprintf(path, sizeof path, "%s/model%d.safetensors", dir, m);
            ta_entry_t *e;
            int rc = ta_cache_get(c, key, &e);
            if (rc == 0)
                hits++;
            else if ((rc = ta_cache_load_safetensors(c, key, path, &e)) == 0)
                loads++;
            if (rc) {
                fprintf(stderr, "%s: %s (%s)\n", key, ta_strerror(rc), ta_cache_last_error());
                return 1;
            }
            ta_tensor_t t;
            volatile unsigned char sink = 0;
            for (size_t i = 0; ta_entry_tensor_at(e, i, &t) == 0; i += 7)
                sink ^= ((unsigned char *)t.data)[t.nbytes / 2];
            (void)sink;
            ta_entry_unlock(e);
        }
        if (verbose) {
            fprintf(stderr, "cache statistics: ");
            ta_cache_stats_json(c, stderr);
        }
        ta_cache_destroy(c);
    } else {
        plain_model_t *pm = calloc((size_t)models, sizeof *pm);
        for (int k = 0; k < switches; k++) {
            int m = (int)(rng(&s) % (uint64_t)models);
            pm[m].used = ++clock;
            if (pm[m].loaded) {
                hits++;
                continue;
            }
            snprintf(path, sizeof path, "%s/model%d.safetensors", dir, m);
            struct stat st;
            size_t need = stat(path, &st) == 0 ? (size_t)st.st_size : 0;
            for (;;) { /* evict least recently used until the file fits */
                size_t used = 0;
                int lru = -1;
                for (int i = 0; i < models; i++)
                    if (pm[i].loaded) {
                        used += pm[i].bytes;
                        if (lru < 0 || pm[i].used < pm[lru].used)
                            lru = i;
                    }
                if (used + need <= budget || lru < 0)
                    break;
                plain_free(&pm[lru]);
            }
            if (plain_load(path, &pm[m]) != 0) {
                fprintf(stderr, "%s: cannot load\n", path);
                return 1;
            }
            loads++;
        }
        for (int i = 0; i < models; i++)
            plain_free(&pm[i]);
        free(pm);
    }
    double wall = now_s() - t0;
    size_t rss_clear = status_bytes("VmRSS");
    size_t hwm = status_bytes("VmHWM");
    sleep(1);
    size_t rss_1s = status_bytes("VmRSS");
    printf("workload=cache-switch\nmode=%s\nwall_s=%.4f\npeak_rss_mib=%.1f\n", mode, wall,
           (double)hwm / MiB);
    printf("rss_cleared_above_start_mib=%.1f\nrss_1s_above_start_mib=%.1f\nloads=%d\nhits=%d\n",
           ((double)rss_clear - (double)rss_start) / MiB,
           ((double)rss_1s - (double)rss_start) / MiB, loads, hits);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: tensoralloc-cache-demo make DIR [--models N] [--scale F]\n"
                    "       tensoralloc-cache-demo run DIR [--mode cache|plain] [--budget-mib N]\n"
                    "                                  [--switches N] [--verbose]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *cmd = argv[1], *dir = argv[2];
    static const struct option opts[] = {{"models", 1, 0, 'm'},   {"scale", 1, 0, 's'},
                                         {"mode", 1, 0, 'o'},     {"budget-mib", 1, 0, 'b'},
                                         {"switches", 1, 0, 'w'}, {"verbose", 0, 0, 'v'},
                                         {"help", 0, 0, 'h'},     {0, 0, 0, 0}};
    int models = 6, switches = 20, verbose = 0, c;
    double scale = 0.3;
    size_t budget = (size_t)1536 << 20;
    const char *mode = "cache";
    optind = 3;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': models = atoi(optarg); break;
        case 's': scale = atof(optarg); break;
        case 'o': mode = optarg; break;
        case 'b': budget = (size_t)atoll(optarg) << 20; break;
        case 'w': switches = atoi(optarg); break;
        case 'v': verbose = 1; break;
        default: usage();
        }
    }
    if (strcmp(cmd, "make") == 0 && models > 0 && scale > 0)
        return make_models(dir, models, scale);
    if (strcmp(cmd, "run") == 0 && switches > 0 && budget > 0 &&
        (!strcmp(mode, "cache") || !strcmp(mode, "plain")))
        return run(dir, mode, budget, switches, verbose);
    usage();
}
