/* SPDX-License-Identifier: MIT */
/*
 * Shared by the benchmark programs: the allocator they call (the C
 * library's malloc, so any allocator can be preloaded, or tensoralloc's
 * ta_* API when built with BENCH_TA), clocks, RSS and fault counters, and
 * the key=value report lines that bench/run parses.
 */
#ifndef TA_BENCH_H
#define TA_BENCH_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifdef BENCH_TA
#include "tensoralloc.h"
#define b_malloc ta_malloc
#define b_calloc ta_calloc
#define b_realloc ta_realloc
#define b_free ta_free
#define b_posix_memalign ta_posix_memalign
#define BENCH_API "ta"
#else
#define b_malloc malloc
#define b_calloc calloc
#define b_realloc realloc
#define b_free free
#define b_posix_memalign posix_memalign
#define BENCH_API "libc"
#endif

#define MiB ((size_t)1 << 20)

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A field of /proc/self/status in bytes ("VmRSS", "VmHWM"). */
static inline size_t status_bytes(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return 0;
    char line[256];
    size_t kib = 0, len = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, len) == 0 && line[len] == ':') {
            kib = strtoull(line + len + 1, NULL, 10);
            break;
        }
    fclose(f);
    return kib * 1024;
}

static inline long minor_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

static inline uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Log-uniform in [lo, hi]. */
static inline size_t rng_log_uniform(uint64_t *s, size_t lo, size_t hi)
{
    double u = (double)(rng_next(s) >> 11) / 9007199254740992.0;
    double v = (double)lo * __builtin_exp(u * __builtin_log((double)hi / (double)lo));
    return (size_t)v;
}

static inline void report_str(const char *key, const char *value)
{
    printf("%s=%s\n", key, value);
}
static inline void report_num(const char *key, double value)
{
    printf("%s=%.6g\n", key, value);
}

#endif
