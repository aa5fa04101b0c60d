/* SPDX-License-Identifier: MIT */
/*
 * large-churn: allocate, fill and free blocks of 1-64 MiB with a few live
 * at a time: the cost of getting large memory, touching it and giving it
 * back. Reports GB/s of bytes filled and minor faults per GiB. With 20
 * live blocks of 5-25 MiB it is mimalloc-bench's malloc-large (whose
 * std::make_unique<char[]> zero-fills every block). With "none" as the
 * fifth argument blocks are not touched: the cost of the allocator's own
 * calls alone (gb_per_s then counts bytes allocated, not filled).
 */
#include "bench.h"

#include <stdbool.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t total_gib = argc > 1 ? (size_t)atol(argv[1]) : 16;
    int live = argc > 2 ? atoi(argv[2]) : 4;
    size_t min_mib = argc > 3 ? (size_t)atol(argv[3]) : 1;
    size_t max_mib = argc > 4 ? (size_t)atol(argv[4]) : 64;
    const char *touch = argc > 5 ? argv[5] : "fill";
    bool fill = strcmp(touch, "fill") == 0;
    if (total_gib == 0 || live < 1 || live > 256 || min_mib == 0 || max_mib < min_mib ||
        (!fill && strcmp(touch, "none") != 0)) {
        fprintf(stderr, "usage: large_churn [GiB to fill] [live blocks] [min MiB] [max MiB] "
                        "[fill|none]\n");
        return 2;
    }
    void *slot[256] = {0};
    uint64_t s = 42;
    size_t rss_start = status_bytes("VmRSS");
    long f0 = minor_faults();
    double t0 = now_s();
    size_t filled = 0, ops = 0;
    while (filled < (total_gib << 30)) {
        int k = (int)(rng_next(&s) % (uint64_t)live);
        b_free(slot[k]);
        size_t n = rng_log_uniform(&s, min_mib * MiB, max_mib * MiB);
        slot[k] = b_malloc(n);
        if (!slot[k]) {
            fprintf(stderr, "large_churn: malloc(%zu) failed\n", n);
            return 1;
        }
        if (fill)
            memset(slot[k], (int)ops, n);
        else /* keep the compiler from dropping the pair */
            __asm__ volatile("" : : "r"(slot[k]) : "memory");
        filled += n;
        ops++;
    }
    for (int k = 0; k < live; k++)
        b_free(slot[k]);
    double wall = now_s() - t0;
    long faults = minor_faults() - f0;
    size_t hwm = status_bytes("VmHWM");
    sleep(1);
    report_str("workload", "large-churn");
    report_str("api", BENCH_API);
    report_num("wall_s", wall);
    report_num("gb_per_s", (double)filled / wall / 1e9);
    report_num("ops", (double)ops);
    report_num("ops_per_s", (double)ops / wall);
    report_num("minor_faults", (double)faults);
    report_num("faults_per_gib", (double)faults / ((double)filled / (1 << 30)));
    report_num("peak_rss_mib", (double)hwm / MiB);
    report_num("rss_1s_above_start_mib", ((double)status_bytes("VmRSS") - (double)rss_start) / MiB);
    return 0;
}
