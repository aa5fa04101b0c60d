/* SPDX-License-Identifier: MIT */
/*
 * large-scale: many live large blocks at once, churned: N blocks of 256 KiB
 * to 16 MiB (log-uniform) allocated, each touched on its first and last
 * page, then R rounds in which a random block is freed and replaced by one
 * of a new size. Reports the time, the /proc/self/maps line count at the
 * end of the churn (what vm.max_map_count limits) and failures.
 *
 *     large_scale [N [R [seed]]]      (defaults 100000, 200000, 1)
 */
#include "bench.h"

static long maps_lines(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return -1;
    long n = 0;
    int c;
    while ((c = getc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

static void *block(uint64_t *s, size_t *size)
{
    *size = rng_log_uniform(s, 256 << 10, 16 << 20);
    unsigned char *p = b_malloc(*size);
    if (p) {
        p[0] = 1;
        p[*size - 1] = 2;
    }
    return p;
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 100000;
    size_t rounds = argc > 2 ? strtoull(argv[2], NULL, 10) : 200000;
    uint64_t s = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
    void **live = calloc(n, sizeof *live);
    size_t *sizes = calloc(n, sizeof *sizes);
    if (!live || !sizes)
        return 1;
    long failures = 0, lost = 0;
    double t0 = now_s();
    for (size_t i = 0; i < n; i++)
        failures += (live[i] = block(&s, &sizes[i])) == NULL;
    long maps_filled = maps_lines();
    for (size_t r = 0; r < rounds; r++) {
        size_t k = rng_next(&s) % n;
        if (live[k]) {
            unsigned char *p = live[k];
            lost += p[0] != 1 || p[sizes[k] - 1] != 2;
            b_free(p);
        }
        failures += (live[k] = block(&s, &sizes[k])) == NULL;
    }
    double t_churn = now_s() - t0;
    long maps_churned = maps_lines();
    for (size_t i = 0; i < n; i++)
        b_free(live[i]);
    double wall = now_s() - t0;
    report_str("workload", "large-scale");
    report_str("api", BENCH_API);
    report_num("blocks", (double)n);
    report_num("rounds", (double)rounds);
    report_num("wall_s", wall);
    report_num("churn_s", t_churn);
    report_num("maps_filled", (double)maps_filled);
    report_num("maps_churned", (double)maps_churned);
    report_num("failures", (double)failures);
    report_num("lost", (double)lost);
    report_num("peak_rss_mib", (double)status_bytes("VmHWM") / MiB);
    return lost ? 1 : 0; /* failed allocations are a figure; lost contents a bug */
}
