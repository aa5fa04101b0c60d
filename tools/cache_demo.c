/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc-cache-demo: a model cache switching between safetensors
 * files, done two ways so they can be compared under any allocator:
 *
 *   tensoralloc-cache-demo make DIR [--models N] [--scale F] [--shape mix|transformer]
 *                          [--chunk-mib N]
 *       writes N synthetic models: mix, hundreds of tensors of 256 B to tens
 *       of MiB; transformer, TinyLlama-1.1B's tensors (hidden 2048, MLP
 *       5632, 4 KV heads of 64, vocabulary 32000, bf16) with 22 x F layers;
 *       each tensor in one write as safetensors writes them, or with
 *       --chunk-mib N in writes of N MiB (a downloader's buffer)
 *   tensoralloc-cache-demo load FILE... [--mode cache|plain] [--rounds N]
 *                          [--threads N] [--chunk-mib N]
 *                          [--page-cache keep|drop|bypass|map] [--cold] [--to-device]
 *                          [--verbose]
 *       loads each file and drops it, N rounds: the load throughput alone
 *       (cache: the model cache's loader; plain: malloc + pread, 64 MiB
 *       per call); --cold drops the page cache before every load (root);
 *       --to-device loads straight to GPU 0 (no host copy; the staging
 *       chunk is 4 x --chunk-mib)
 *   tensoralloc-cache-demo run DIR [--mode cache|plain] [--budget-mib N]
 *                          [--switches N] [--page-cache keep|drop|bypass|map] [--verbose]
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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)

/* The message of this thread's last failed cache call. */
static const char *cache_error(void)
{
    const char *message;
    ta_cache_last_error(&message);
    return message;
}

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

/* Adds a tensor of dims (a x b; b 0 for one dimension) at *off. */
static void add_tensor(cJSON *hdr, const char *name, const char *dtype, uint64_t a, uint64_t b,
                       size_t elem, uint64_t *off)
{
    cJSON *t = cJSON_AddObjectToObject(hdr, name);
    cJSON_AddStringToObject(t, "dtype", dtype);
    cJSON *shape = cJSON_AddArrayToObject(t, "shape");
    cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)a));
    if (b)
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)b));
    uint64_t bytes = a * (b ? b : 1) * elem;
    cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)*off));
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(*off + bytes)));
    *off += bytes;
}

/* Hundreds of tensors of 256 B to 52 MiB. */
static int mix_tensors(cJSON *hdr, uint64_t *s, double scale, uint64_t *off)
{
    int count = 200 + (int)(rng(s) % 500);
    for (int i = 0; i < count; i++) {
        unsigned r = (unsigned)(rng(s) % 100);
        double lo = r < 40 ? 256 : r < 70 ? 16384 : r < 96 ? 1048576 : 16777216;
        double hi = r < 40 ? 16384 : r < 70 ? 1048576 : r < 96 ? 16777216 : 54525952;
        double u = (double)rng(s) / 2147483648.0;
        uint64_t elems = (uint64_t)(lo * __builtin_pow(hi / lo, u) * scale / 4) + 1;
        char name[32];
        snprintf(name, sizeof name, "layer%d.weight", i);
        add_tensor(hdr, name, "F32", elems, 0, 4, off);
    }
    return count;
}

/* TinyLlama-1.1B's shapes (its config.json on the Hugging Face hub). */
static int transformer_tensors(cJSON *hdr, double scale, uint64_t *off)
{
    const uint64_t hidden = 2048, mlp = 5632, kv = 4 * 64, vocab = 32000;
    int layers = (int)(22 * scale + 0.5), count = 0;
    if (layers < 1)
        layers = 1;
    add_tensor(hdr, "model.embed_tokens.weight", "BF16", vocab, hidden, 2, off);
    for (int l = 0; l < layers; l++) {
        static const char *const names[] = {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
        const uint64_t rows[] = {hidden, kv, kv, hidden, mlp, mlp, hidden};
        const uint64_t cols[] = {hidden, hidden, hidden, hidden, hidden, hidden, mlp};
        char name[96];
        for (int k = 0; k < 7; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, names[k]);
            add_tensor(hdr, name, "BF16", rows[k], cols[k], 2, off);
        }
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        add_tensor(hdr, name, "BF16", hidden, 0, 2, off);
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        add_tensor(hdr, name, "BF16", hidden, 0, 2, off);
        count += 9;
    }
    add_tensor(hdr, "model.norm.weight", "BF16", hidden, 0, 2, off);
    add_tensor(hdr, "lm_head.weight", "BF16", vocab, hidden, 2, off);
    return count + 3;
}

static int write_all(int fd, const unsigned char *p, size_t n, const char *path)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            perror(path);
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Where tensor t's bytes lie in the data (its data_offsets). */
static void tensor_range(const cJSON *t, uint64_t *at, uint64_t *to)
{
    const cJSON *offs = cJSON_GetObjectItem(t, "data_offsets");
    *at = (uint64_t)cJSON_GetArrayItem(offs, 0)->valuedouble;
    *to = (uint64_t)cJSON_GetArrayItem(offs, 1)->valuedouble;
}

/* Each tensor's bytes go out in one write, as safetensors' own writer
 * (serialize_to_file: a BufWriter and write_all per tensor) does; with
 * chunk set, in writes of chunk bytes instead, as a downloader with a
 * small buffer does. The page cache keeps a file in folios of the sizes
 * it was written in (Linux 6.16+ on ext4), which decides how fast a
 * mapping of it fills (docs/benchmarks.md "Mapped loads"). Byte x of the
 * data is (x mod 1 MiB) x 31 + the model's number either way. */
static int write_model(const char *path, const char *text, cJSON *hdr, uint64_t total, int m,
                       size_t chunk)
{
    const size_t period = (size_t)1 << 20;
    size_t largest = 0;
    for (cJSON *t = hdr->child; t; t = t->next) {
        uint64_t at, to;
        tensor_range(t, &at, &to);
        largest = to - at > largest ? (size_t)(to - at) : largest;
    }
    size_t piece = chunk ? chunk : largest;
    unsigned char *pattern = malloc(piece + period);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (!pattern || fd < 0) {
        perror(path);
        free(pattern);
        if (fd >= 0)
            close(fd);
        return 1;
    }
    for (size_t i = 0; i < piece + period; i++)
        pattern[i] = (unsigned char)((i % period) * 31 + (size_t)m);
    uint64_t n = strlen(text);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(n >> (8 * i));
    int rc = write_all(fd, len8, 8, path) || write_all(fd, (const unsigned char *)text, n, path);
    /* tensors lie in order, back to back (add_tensor) */
    for (cJSON *t = hdr->child; t && rc == 0 && !chunk; t = t->next) {
        uint64_t at, to;
        tensor_range(t, &at, &to);
        rc = write_all(fd, pattern + at % period, (size_t)(to - at), path);
    }
    for (uint64_t at = 0; at < total && rc == 0 && chunk; at += chunk) {
        size_t k = total - at < chunk ? (size_t)(total - at) : chunk;
        rc = write_all(fd, pattern + at % period, k, path);
    }
    if (close(fd) != 0 && rc == 0) {
        perror(path);
        rc = -1;
    }
    free(pattern);
    return rc ? 1 : 0;
}

static int make_models(const char *dir, int models, double scale, bool transformer, size_t chunk)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        perror(dir);
        return 1;
    }
    uint64_t s = 7;
    for (int m = 0; m < models; m++) {
        cJSON *hdr = cJSON_CreateObject();
        uint64_t off = 0;
        int count =
            transformer ? transformer_tensors(hdr, scale, &off) : mix_tensors(hdr, &s, scale, &off);
        char *text = cJSON_PrintUnformatted(hdr);
        char path[4096];
        snprintf(path, sizeof path, "%s/model%d.safetensors", dir, m);
        int rc = write_model(path, text, hdr, off, m, chunk);
        if (rc == 0)
            printf("%s: %d tensors, %.1f MiB\n", path, count, (double)off / MiB);
        cJSON_free(text);
        cJSON_Delete(hdr);
        if (rc)
            return rc;
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

/* ta_cache_create refused its configuration: say why. */
static int create_failed(void)
{
    const char *why = NULL;
    ta_cache_last_error(&why);
    fprintf(stderr, "tensoralloc-cache-demo: cannot create the cache: %s\n", why ? why : "?");
    return 1;
}

static int run(const char *dir, const char *mode, size_t budget, int switches, int verbose,
               ta_page_cache_t page_cache)
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
                                 .log_level = verbose ? TA_LOG_DEBUG : TA_LOG_ERROR,
                                 .page_cache = page_cache};
        ta_cache_t *c;
        if (ta_cache_create(&cfg, &c) != 0)
            return create_failed();
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
                fprintf(stderr, "%s: %s (%s)\n", key, ta_strerror(rc), cache_error());
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

/* ---- load: the load throughput alone ------------------------------------------ */

typedef struct {
    bool cache, cold, verbose, to_device;
    int rounds, threads;
    size_t chunk;
    ta_page_cache_t page_cache;
} load_args_t;

/* Drops the clean page cache (root only); false with a message if refused. */
static bool drop_page_cache(void)
{
    sync();
    FILE *f = fopen("/proc/sys/vm/drop_caches", "w");
    bool ok = f && fputs("1\n", f) >= 0;
    if (f && fclose(f) != 0)
        ok = false;
    if (!ok)
        fprintf(stderr,
                "SKIP: cannot drop the page cache (/proc/sys/vm/drop_caches: %s); "
                "cold loads need root\n",
                strerror(errno));
    return ok;
}

static int load_files(char **files, int nfiles, const load_args_t *a)
{
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = SIZE_MAX / 2,
                             .log = a->verbose ? demo_log : NULL,
                             .log_level = TA_LOG_INFO,
                             .load_threads = a->threads,
                             .load_chunk = a->chunk,
                             .page_cache = a->page_cache,
                             .vram_budget = a->to_device ? SIZE_MAX / 2 : 0,
                             .keep_ram_copy = !a->to_device};
    ta_cache_t *c = NULL;
    if (a->cache && ta_cache_create(&cfg, &c) != 0)
        return create_failed();
    double seconds = 0, warm_seconds = 0;
    uint64_t bytes = 0, warm_bytes = 0;
    for (int r = 0; r < a->rounds; r++)
        for (int i = 0; i < nfiles; i++) {
            if (a->cold && !drop_page_cache())
                return 77;
            double t0 = now_s();
            uint64_t n = 0;
            if (a->cache) {
                ta_entry_t *e;
                int rc = a->to_device
                             ? ta_cache_load_safetensors_to_device(c, files[i], files[i], &e)
                             : ta_cache_load_safetensors(c, files[i], files[i], &e);
                if (rc) {
                    fprintf(stderr, "%s: %s\n", ta_strerror(rc), cache_error());
                    return 1;
                }
                n = ta_entry_ram_bytes(e) + ta_entry_vram_bytes(e);
                seconds += now_s() - t0;
                ta_entry_unlock(e);
                ta_cache_remove(c, files[i]);
            } else {
                plain_model_t m = {0};
                if (plain_load(files[i], &m) != 0) {
                    fprintf(stderr, "%s: cannot load\n", files[i]);
                    return 1;
                }
                n = m.bytes;
                seconds += now_s() - t0;
                plain_free(&m);
            }
            double dt = now_s() - t0;
            bytes += n;
            if (r > 0 || a->rounds == 1) {
                warm_bytes += n;
                warm_seconds += dt;
            }
        }
    ta_cache_destroy(c);
    printf("workload=load\nmode=%s%s\nbytes=%llu\nseconds=%.4f\ngbps=%.3f\n",
           a->cache ? "cache" : "plain", a->to_device ? "-to-device" : "",
           (unsigned long long)bytes, seconds, seconds > 0 ? (double)bytes / seconds / 1e9 : 0);
    printf("steady_gbps=%.3f\n", warm_seconds > 0 ? (double)warm_bytes / warm_seconds / 1e9 : 0);
    return 0;
}

static __attribute__((noreturn)) void usage(void)
{
    fprintf(stderr, "usage: tensoralloc-cache-demo make DIR [--models N] [--scale F] [--shape "
                    "mix|transformer] [--chunk-mib N]\n"
                    "       tensoralloc-cache-demo run DIR [--mode cache|plain] [--budget-mib N]\n"
                    "                                  [--switches N] [--page-cache "
                    "keep|drop|bypass|map] [--verbose]\n"
                    "       tensoralloc-cache-demo load FILE... [--mode cache|plain] [--rounds N]\n"
                    "                                  [--threads N] [--chunk-mib N]\n"
                    "                                  [--page-cache keep|drop|bypass|map] "
                    "[--cold] [--to-device]\n"
                    "                                  [--verbose]\n");
    exit(2);
}

static int page_cache_mode(const char *s)
{
    static const char *const names[] = {"keep", "drop", "bypass", "map"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    usage();
}

/* A whole number from lo to hi, or the usage (atoi took "-1" and "2x"). */
static long long number_arg(const char *s, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "tensoralloc-cache-demo: '%s' is not a number from %lld to %lld\n", s, lo,
                hi);
        usage();
    }
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *cmd = argv[1], *dir = argv[2];
    static const struct option opts[] = {
        {"models", 1, 0, 'm'},     {"scale", 1, 0, 's'},      {"mode", 1, 0, 'o'},
        {"budget-mib", 1, 0, 'b'}, {"switches", 1, 0, 'w'},   {"verbose", 0, 0, 'v'},
        {"shape", 1, 0, 'S'},      {"rounds", 1, 0, 'r'},     {"threads", 1, 0, 't'},
        {"chunk-mib", 1, 0, 'c'},  {"page-cache", 1, 0, 'p'}, {"cold", 0, 0, 'C'},
        {"to-device", 0, 0, 'D'},  {"help", 0, 0, 'h'},       {0, 0, 0, 0}};
    int models = 6, switches = 20, verbose = 0, c;
    double scale = 0.3;
    size_t budget = (size_t)1536 << 20;
    const char *mode = "cache", *shape = "mix";
    load_args_t la = {.rounds = 3};
    optind = 2;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': models = (int)number_arg(optarg, 1, 1000); break;
        case 's': scale = atof(optarg); break;
        case 'o': mode = optarg; break;
        case 'b': budget = (size_t)number_arg(optarg, 1, 1 << 30) << 20; break;
        case 'w': switches = (int)number_arg(optarg, 1, 1 << 30); break;
        case 'v': verbose = 1; break;
        case 'S': shape = optarg; break;
        case 'r': la.rounds = (int)number_arg(optarg, 1, 1 << 30); break;
        case 't': la.threads = (int)number_arg(optarg, 0, 1024); break;
        case 'c': la.chunk = (size_t)number_arg(optarg, 0, TA_CACHE_MAX_LOAD_CHUNK >> 20) << 20; break;
        case 'p': la.page_cache = (ta_page_cache_t)page_cache_mode(optarg); break;
        case 'C': la.cold = true; break;
        case 'D': la.to_device = true; break;
        default: usage();
        }
    }
    bool known_mode = !strcmp(mode, "cache") || !strcmp(mode, "plain");
    bool transformer = strcmp(shape, "transformer") == 0;
    if (strcmp(cmd, "make") == 0 && models > 0 && scale > 0 &&
        (transformer || !strcmp(shape, "mix")))
        return make_models(dir, models, scale, transformer, la.chunk);
    if (strcmp(cmd, "run") == 0 && switches > 0 && budget > 0 && known_mode)
        return run(dir, mode, budget, switches, verbose, la.page_cache);
    if (strcmp(cmd, "load") == 0 && la.rounds > 0 && la.threads >= 0 && known_mode &&
        optind < argc) {
        la.cache = strcmp(mode, "cache") == 0;
        la.verbose = verbose;
        return load_files(argv + optind, argc - optind, &la);
    }
    usage();
}
