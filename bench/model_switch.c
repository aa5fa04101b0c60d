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
    const char *shape;
} cfg = {0, 24, 2, (size_t)2048 << 20, 0, 1, "mix"};

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
    return n; /* bytes before --scale */
}

/* ---- model shapes ----------------------------------------------------------
 * Each shape is a list of public model configurations; a model's tensors are
 * the ones its checkpoint holds (fp16/bf16, 2 bytes an element), in file
 * order, and --scale multiplies every tensor's bytes. */

typedef struct {
    size_t *sizes;
    size_t count, cap;
} tensor_list_t;

static void add_tensor(tensor_list_t *l, double elements)
{
    if (l->count == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->sizes = realloc(l->sizes, l->cap * sizeof(size_t));
    }
    size_t n = (size_t)(elements * 2.0 * cfg.scale);
    n = n < 256 ? 256 : n;
    l->sizes[l->count++] = n & ~(size_t)3;
}

/* Llama-style decoders: hidden, intermediate (MLP), layers, vocabulary, key/
 * value width (grouped-query attention), tied embeddings. From each model's
 * config.json on the Hugging Face hub. */
typedef struct {
    const char *name;
    double hidden, inter, layers, vocab, kv;
    int tied;
} llm_config_t;

static const llm_config_t llm_configs[] = {
    {"TinyLlama-1.1B", 2048, 5632, 22, 32000, 256, 0},
    {"Llama-3.2-1B", 2048, 8192, 16, 128256, 512, 1},
    {"Qwen2-0.5B", 896, 4864, 24, 151936, 128, 1},
    {"SmolLM-360M", 960, 2560, 32, 49152, 320, 1},
    {"phi-1.5", 2048, 8192, 24, 51200, 2048, 0},
};

static void llm_tensors(const llm_config_t *c, tensor_list_t *l)
{
    add_tensor(l, c->vocab * c->hidden); /* embed_tokens */
    for (int i = 0; i < (int)c->layers; i++) {
        add_tensor(l, c->hidden);             /* input_layernorm */
        add_tensor(l, c->hidden * c->hidden); /* q_proj */
        add_tensor(l, c->hidden * c->kv);     /* k_proj */
        add_tensor(l, c->hidden * c->kv);     /* v_proj */
        add_tensor(l, c->hidden * c->hidden); /* o_proj */
        add_tensor(l, c->hidden);             /* post_attention_layernorm */
        add_tensor(l, c->hidden * c->inter);  /* gate_proj */
        add_tensor(l, c->hidden * c->inter);  /* up_proj */
        add_tensor(l, c->hidden * c->inter);  /* down_proj */
    }
    add_tensor(l, c->hidden); /* norm */
    if (!c->tied)
        add_tensor(l, c->vocab * c->hidden); /* lm_head */
}

/* Mixture-of-experts decoders: per layer an attention block, a router and
 * `experts` routed experts (gate, up and down of hidden x expert_inter),
 * plus `shared` shared experts of the same shape (DeepSeek, Qwen-MoE).
 * Layers: as configured, `layers` of them MoE. */
typedef struct {
    const char *name;
    double hidden, expert_inter, layers, experts, shared, vocab, kv;
} moe_config_t;

static const moe_config_t moe_configs[] = {
    {"OLMoE-1B-7B", 2048, 1024, 16, 64, 0, 50304, 2048},
    {"Qwen1.5-MoE-A2.7B", 2048, 1408, 24, 60, 4, 151936, 2048},
    {"DeepSeek-V2-Lite", 2048, 1408, 26, 64, 2, 102400, 2048},
    {"Qwen3-30B-A3B (first 16 of 48 layers)", 2048, 768, 16, 128, 0, 151936, 512},
};

static void moe_tensors(const moe_config_t *c, tensor_list_t *l)
{
    add_tensor(l, c->vocab * c->hidden);
    for (int i = 0; i < (int)c->layers; i++) {
        add_tensor(l, c->hidden);
        add_tensor(l, c->hidden * c->hidden);
        add_tensor(l, c->hidden * c->kv);
        add_tensor(l, c->hidden * c->kv);
        add_tensor(l, c->hidden * c->hidden);
        add_tensor(l, c->hidden);
        add_tensor(l, c->hidden * c->experts); /* router */
        for (int e = 0; e < (int)(c->experts + c->shared); e++)
            for (int k = 0; k < 3; k++)
                add_tensor(l, c->hidden * c->expert_inter);
    }
    add_tensor(l, c->hidden);
    add_tensor(l, c->vocab * c->hidden);
}

/* UNets of latent diffusion (diffusers' UNet2DConditionModel configs):
 * block_out_channels per stage, transformer blocks per attention stage,
 * cross-attention width. Each stage: 2 resnets down, 3 up, each with two
 * 3x3 convolutions, its norms and the time projection; attention stages add
 * per resnet a transformer (self and cross attention, GEGLU feed-forward). */
typedef struct {
    const char *name;
    double channels[4];
    int stages, depth[4];
    double cross;
} unet_config_t;

static const unet_config_t unet_configs[] = {
    {"SD-1.5 UNet", {320, 640, 1280, 1280}, 4, {1, 1, 1, 0}, 768},
    {"SD-2.1 UNet", {320, 640, 1280, 1280}, 4, {1, 1, 1, 0}, 1024},
    {"SDXL UNet", {320, 640, 1280, 0}, 3, {0, 2, 10, 0}, 2048},
};

static void unet_resnet(tensor_list_t *l, double c)
{
    add_tensor(l, c);
    add_tensor(l, c);
    add_tensor(l, c * c * 9);
    add_tensor(l, c);
    add_tensor(l, 1280 * c); /* time_emb_proj */
    add_tensor(l, c);
    add_tensor(l, c);
    add_tensor(l, c * c * 9);
    add_tensor(l, c);
}

static void unet_transformer(tensor_list_t *l, double c, double cross)
{
    add_tensor(l, c);
    add_tensor(l, c * c); /* proj_in */
    add_tensor(l, c);     /* norm1..3 */
    add_tensor(l, c);
    add_tensor(l, c);
    for (int a = 0; a < 2; a++) { /* self attention, then cross attention */
        double kv = a ? cross : c;
        add_tensor(l, c * c);
        add_tensor(l, kv * c);
        add_tensor(l, kv * c);
        add_tensor(l, c * c);
        add_tensor(l, c);
    }
    add_tensor(l, c * 8 * c); /* GEGLU proj */
    add_tensor(l, c * 8);
    add_tensor(l, 4 * c * c); /* ff out */
    add_tensor(l, c);
    add_tensor(l, c * c); /* proj_out */
    add_tensor(l, c);
}

static void unet_tensors(const unet_config_t *c, tensor_list_t *l)
{
    add_tensor(l, 320 * 4 * 9); /* conv_in */
    add_tensor(l, 320 * 1280);  /* time embedding */
    add_tensor(l, 1280 * 1280);
    for (int pass = 0; pass < 2; pass++) /* down blocks, then up blocks */
        for (int s = 0; s < c->stages; s++) {
            double ch = c->channels[pass ? c->stages - 1 - s : s];
            int depth = c->depth[pass ? c->stages - 1 - s : s];
            for (int r = 0; r < (pass ? 3 : 2); r++) {
                unet_resnet(l, ch);
                for (int t = 0; t < depth; t++)
                    unet_transformer(l, ch, c->cross);
            }
            add_tensor(l, ch * ch * 9); /* down- or upsampler */
        }
    double mid = c->channels[c->stages - 1];
    unet_resnet(l, mid);
    for (int t = 0; t < (c->depth[c->stages - 1] ? c->depth[c->stages - 1] : 1); t++)
        unet_transformer(l, mid, c->cross);
    unet_resnet(l, mid);
    add_tensor(l, 320 * 4 * 9); /* conv_out */
}

/* Vision transformers (timm's and open_clip's ViT configs): a patch
 * embedding, position embeddings, per block two layer norms (weight and
 * bias), a fused qkv projection and an MLP, each with its bias, and a
 * classifier head. The shape added after the allocator was tuned on the
 * others: thousands of bias and norm vectors of a few KiB beside fused
 * matrices whose sizes no other shape has. */
typedef struct {
    const char *name;
    double hidden, mlp, layers, patch;
} vit_config_t;

static const vit_config_t vit_configs[] = {
    {"ViT-B/16", 768, 3072, 12, 16},
    {"CLIP ViT-L/14", 1024, 4096, 24, 14},
    {"ViT-H/14", 1280, 5120, 32, 14},
    {"DINOv2 ViT-g/14", 1536, 6144, 40, 14},
};

static void vit_tensors(const vit_config_t *c, tensor_list_t *l)
{
    double h = c->hidden, grid = 224 / c->patch;
    add_tensor(l, h * 3 * c->patch * c->patch); /* patch embedding */
    add_tensor(l, h);
    add_tensor(l, h * (grid * grid + 1)); /* position embeddings */
    add_tensor(l, h);                     /* class token */
    for (int i = 0; i < (int)c->layers; i++) {
        add_tensor(l, h); /* norm1 weight and bias */
        add_tensor(l, h);
        add_tensor(l, 3 * h * h); /* fused qkv */
        add_tensor(l, 3 * h);
        add_tensor(l, h * h); /* attention out */
        add_tensor(l, h);
        add_tensor(l, h); /* norm2 */
        add_tensor(l, h);
        add_tensor(l, c->mlp * h); /* fc1 */
        add_tensor(l, c->mlp);
        add_tensor(l, h * c->mlp); /* fc2 */
        add_tensor(l, h);
    }
    add_tensor(l, h);
    add_tensor(l, h);
    add_tensor(l, 1000 * h); /* head */
    add_tensor(l, 1000);
}

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* The shapes: their configurations and default scale (bytes per model
 * between about 0.5 and 3 GB). */
static const struct {
    const char *name;
    size_t configs;
    double scale;
} shapes[] = {
    {"mix", 8, 0.35},
    {"llm", COUNT(llm_configs), 0.7},
    {"moe", COUNT(moe_configs), 0.1},
    {"diffusion", COUNT(unet_configs), 0.5},
    {"vit", COUNT(vit_configs), 0.8},
};

static void model_tensors(int shape, int m, uint64_t *s, tensor_list_t *l)
{
    size_t k = (size_t)m % shapes[shape].configs;
    if (shape == 0) {
        size_t count = 300 + rng_next(s) % 901;
        for (size_t i = 0; i < count; i++)
            add_tensor(l, (double)tensor_size(s) / 2.0); /* fp32 elements */
    } else if (shape == 1) {
        llm_tensors(&llm_configs[k], l);
    } else if (shape == 2) {
        moe_tensors(&moe_configs[k], l);
    } else if (shape == 3) {
        unet_tensors(&unet_configs[k], l);
    } else {
        vit_tensors(&vit_configs[k], l);
    }
}

static int shape_index(const char *name)
{
    for (size_t i = 0; i < COUNT(shapes); i++)
        if (strcmp(shapes[i].name, name) == 0)
            return (int)i;
    return -1;
}

static void models_init(int shape)
{
    models = calloc((size_t)cfg.models, sizeof *models);
    uint64_t s = cfg.seed * 7919;
    for (int m = 0; m < cfg.models; m++) {
        model_t *md = &models[m];
        tensor_list_t l = {0};
        model_tensors(shape, m, &s, &l);
        md->count = l.count;
        md->sizes = l.sizes;
        md->tensors = calloc(md->count, sizeof(void *));
        md->meta = calloc(md->count, sizeof(void *));
        for (size_t i = 0; i < md->count; i++)
            md->bytes += md->sizes[i];
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

static size_t cached_bytes_all(void)
{
    size_t total = 0;
    for (int m = 0; m < cfg.models; m++)
        total += models[m].bytes;
    return total;
}

static void usage(void)
{
    fprintf(stderr, "usage: model_switch [--shape mix|llm|moe|diffusion|vit] [--models N] "
                    "[--switches N] [--budget-mib N] [--threads N] [--scale F] [--seed N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"models", 1, 0, 'm'},     {"switches", 1, 0, 's'},
                                         {"budget-mib", 1, 0, 'b'}, {"threads", 1, 0, 't'},
                                         {"scale", 1, 0, 'c'},      {"seed", 1, 0, 'r'},
                                         {"shape", 1, 0, 'p'},      {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': cfg.models = atoi(optarg); break;
        case 's': cfg.switches = atoi(optarg); break;
        case 'b': cfg.budget = (size_t)atoll(optarg) << 20; break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'c': cfg.scale = atof(optarg); break;
        case 'r': cfg.seed = (uint64_t)atoll(optarg); break;
        case 'p': cfg.shape = optarg; break;
        default: usage();
        }
    }
    int shape = shape_index(cfg.shape);
    if (shape < 0) {
        fprintf(stderr, "model_switch: unknown shape %s\n", cfg.shape);
        usage();
    }
    if (cfg.models == 0)
        cfg.models = (int)shapes[shape].configs;
    if (cfg.scale == 0)
        cfg.scale = shapes[shape].scale;
    if (cfg.models < 1 || cfg.switches < 1 || cfg.threads < 1 || cfg.scale <= 0)
        usage();

    size_t rss_start = status_bytes("VmRSS");
    long faults0 = minor_faults();
    double t0 = now_s();
    models_init(shape);
    double loaded_bytes = 0;
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
        loaded_bytes += (double)md->bytes;
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
    report_str("shape", cfg.shape);
    report_str("api", BENCH_API);
    report_num("wall_s", wall);
    report_num("peak_rss_mib", (double)hwm / MiB);
    report_num("peak_live_mib", (double)atomic_load(&peak_live) / MiB);
    report_num("rss_start_mib", (double)rss_start / MiB);
    report_num("rss_end_mib", (double)rss_end / MiB);
    report_num("rss_1s_mib", (double)rss_1s / MiB);
    report_num("rss_1s_above_start_mib", ((double)rss_1s - (double)rss_start) / MiB);
    report_num("minor_faults", (double)faults);
    report_num("loaded_gib", loaded_bytes / (double)(1 << 30));
    report_num("faults_per_gib", (double)faults / (loaded_bytes / (double)(1 << 30)));
    size_t tensors = 0;
    for (int m = 0; m < cfg.models; m++)
        tensors += models[m].count;
    report_num("tensors_per_model", (double)tensors / cfg.models);
    report_num("model_mib", (double)cached_bytes_all() / cfg.models / MiB);
    report_num("loads", loads);
    report_num("hits", hits);
    report_num("evictions", evictions);
    return 0;
}
