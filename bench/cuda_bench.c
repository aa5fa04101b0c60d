/* SPDX-License-Identifier: MIT */
/*
 * cuda-bench: host<->device bandwidth on a GPU machine, side by side:
 * pageable cudaMemcpy, cudaMallocHost memory, tensoralloc's staged copies
 * (double-buffered through its pinned pool) and pinned-in-place copies;
 * plus the cost of cudaHostRegister per GiB, and a checksum of the data
 * after each round trip. Prints a Markdown table.
 *
 *   cuda_bench [MiB ...]          default: 64 1024 8192
 *
 * libcudart is loaded with dlopen (TENSORALLOC_CUDART, or libcudart.so.13,
 * .12, .so) for the baselines, exactly as the library loads it.
 */
#include "bench.h"
#include "tensoralloc_cuda.h"

#include <dlfcn.h>

typedef int (*memcpy_fn)(void *, const void *, size_t, int);
typedef int (*alloc_fn)(void **, size_t);
typedef int (*free_fn)(void *);
typedef int (*sync_fn)(void);

static memcpy_fn cu_memcpy;
static alloc_fn cu_malloc_host;
static free_fn cu_free_host;
static sync_fn cu_sync;

static int load_runtime(void)
{
    const char *chosen = getenv("TENSORALLOC_CUDART");
    const char *names[] = {chosen, "libcudart.so.13", "libcudart.so.12", "libcudart.so"};
    void *h = NULL;
    for (int i = 0; i < 4 && !h; i++)
        if (names[i])
            h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return -1;
    *(void **)&cu_memcpy = dlsym(h, "cudaMemcpy");
    *(void **)&cu_malloc_host = dlsym(h, "cudaMallocHost");
    *(void **)&cu_free_host = dlsym(h, "cudaFreeHost");
    *(void **)&cu_sync = dlsym(h, "cudaDeviceSynchronize");
    return cu_memcpy && cu_malloc_host && cu_free_host && cu_sync ? 0 : -1;
}

static uint64_t checksum(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i < 8 ? n - i : 8);
        h = (h ^ w) * 1099511628211ULL;
    }
    return h;
}

static void fill(unsigned char *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t w = (i + seed) * 0x9E3779B97F4A7C15ULL;
        memcpy(p + i, &w, n - i < 8 ? n - i : 8);
    }
}

#define GBPS(bytes, s) ((double)(bytes) / (s) / 1e9)

int main(int argc, char **argv)
{
    size_t sizes_mib[8] = {64, 1024, 8192};
    int nsizes = 3;
    if (argc > 1) {
        nsizes = 0;
        for (int i = 1; i < argc && nsizes < 8; i++)
            sizes_mib[nsizes++] = (size_t)atol(argv[i]);
    }
    int rc = ta_cuda_init(0);
    if (rc != 0) {
        fprintf(stderr, "cuda_bench: %s\n", ta_strerror(rc));
        return 77;
    }
    if (load_runtime() != 0) {
        fprintf(stderr, "cuda_bench: cannot load libcudart for the baselines\n");
        return 77;
    }
    ta_pinned_pool_t *pool;
    if ((rc = ta_pinned_pool_create((size_t)256 << 20, &pool)) != 0) {
        fprintf(stderr, "cuda_bench: pool: %s\n", ta_strerror(rc));
        return 1;
    }
    printf("| size | register GB/s | direction | pageable cudaMemcpy | cudaMallocHost | "
           "tensoralloc staged | pinned in place | staged/MallocHost | in place/MallocHost | "
           "checksums |\n|---|---|---|---|---|---|---|---|---|---|\n");
    int failures = 0;
    for (int s = 0; s < nsizes; s++) {
        size_t n = sizes_mib[s] * MiB;
        unsigned char *src = ta_malloc(n), *back = ta_malloc(n), *hostbuf = NULL;
        void *dev = NULL;
        if (!src || !back || ta_cuda_device_alloc(n, &dev) != 0 ||
            cu_malloc_host((void **)&hostbuf, n) != 0) {
            fprintf(stderr, "cuda_bench: cannot allocate %zu MiB\n", sizes_mib[s]);
            return 1;
        }
        fill(src, n, (uint64_t)s);
        memset(back, 0, n); /* prefault: registration cost, not page faults */
        uint64_t want = checksum(src, n);
        double t, h2d[4], d2h[4];
        int ok = 1;

        /* pageable */
        t = now_s();
        cu_memcpy(dev, src, n, 1);
        cu_sync();
        h2d[0] = GBPS(n, now_s() - t);
        t = now_s();
        cu_memcpy(back, dev, n, 2);
        cu_sync();
        d2h[0] = GBPS(n, now_s() - t);
        ok &= checksum(back, n) == want;

        /* cudaMallocHost (the data copy into it is not timed) */
        memcpy(hostbuf, src, n);
        t = now_s();
        cu_memcpy(dev, hostbuf, n, 1);
        cu_sync();
        h2d[1] = GBPS(n, now_s() - t);
        memset(hostbuf, 0, n);
        t = now_s();
        cu_memcpy(hostbuf, dev, n, 2);
        cu_sync();
        d2h[1] = GBPS(n, now_s() - t);
        ok &= checksum(hostbuf, n) == want;

        /* staged through the pinned pool (warm the pool once) */
        ta_cuda_copy_to_device(pool, dev, src, n < (64u << 20) ? n : (64u << 20));
        memset(back, 0, n);
        t = now_s();
        rc = ta_cuda_copy_to_device(pool, dev, src, n);
        h2d[2] = GBPS(n, now_s() - t);
        t = now_s();
        rc |= ta_cuda_copy_to_host(pool, back, dev, n);
        d2h[2] = GBPS(n, now_s() - t);
        ok &= rc == 0 && checksum(back, n) == want;

        /* pinned in place: registration timed separately */
        t = now_s();
        rc = ta_cuda_pin(src);
        double reg = GBPS(ta_usable_size(src), now_s() - t);
        rc |= ta_cuda_pin(back);
        memset(back, 0, n);
        t = now_s();
        rc |= ta_cuda_copy_to_device(NULL, dev, src, n);
        h2d[3] = GBPS(n, now_s() - t);
        t = now_s();
        rc |= ta_cuda_copy_to_host(NULL, back, dev, n);
        d2h[3] = GBPS(n, now_s() - t);
        ok &= rc == 0 && checksum(back, n) == want;
        ta_cuda_unpin(src);
        ta_cuda_unpin(back);

        char regbuf[32];
        snprintf(regbuf, sizeof regbuf, "%.1f", reg);
        for (int d = 0; d < 2; d++) {
            double *v = d ? d2h : h2d;
            printf("| %zu MiB | %s | %s | %.1f | %.1f | %.1f | %.1f | %.0f%% | %.0f%% | %s |\n",
                   sizes_mib[s], d ? "" : regbuf, d ? "D2H" : "H2D", v[0], v[1], v[2], v[3],
                   100 * v[2] / v[1], 100 * v[3] / v[1], ok ? "match" : "MISMATCH");
        }
        failures += !ok;
        cu_free_host(hostbuf);
        ta_cuda_device_free(dev);
        ta_free(src);
        ta_free(back);
    }
    ta_cuda_stats_t cs = {.size = sizeof cs};
    ta_cuda_stats_get(&cs);
    printf("\nregistrations %llu, %.3f s in cudaHostRegister (%.2f s per GiB registered at "
           "peak %.1f GiB)\n",
           (unsigned long long)cs.registrations, cs.register_seconds,
           cs.registered_peak ? cs.register_seconds / ((double)cs.registered_peak / (1 << 30)) : 0,
           (double)cs.registered_peak / (1 << 30));
    ta_pinned_pool_destroy(pool);
    return failures ? 1 : 0;
}
