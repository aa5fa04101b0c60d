/* SPDX-License-Identifier: MIT */
/*
 * realloc-grow: one buffer grown to 1 GiB by repeated realloc, 1 MiB at a
 * time, its pages all touched. Reports time and the bytes the allocator
 * copied. Copies are seen, not guessed: when realloc returns a new address
 * the physical frame of the first page (from /proc/self/pagemap, readable
 * as root) tells a moved mapping (same frame) from a copy (new frame).
 */
#include "bench.h"

#include <fcntl.h>
#include <unistd.h>

static int pagemap_fd = -1;

/* Physical frame number of the page holding p, or 0 if unknown. */
static uint64_t frame_of(const void *p)
{
    uint64_t entry = 0;
    long page = sysconf(_SC_PAGESIZE);
    off_t off = (off_t)((uintptr_t)p / (uintptr_t)page) * 8;
    if (pagemap_fd < 0 || pread(pagemap_fd, &entry, 8, off) != 8)
        return 0;
    if (!(entry >> 63)) /* not present */
        return 0;
    return entry & ((1ULL << 55) - 1);
}

int main(int argc, char **argv)
{
    size_t target = (argc > 1 ? (size_t)atol(argv[1]) : 1024) * MiB;
    size_t step = (argc > 2 ? (size_t)atol(argv[2]) : 1) * MiB;
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    unsigned char *p = NULL;
    size_t n = 0, copied = 0, moved = 0, unknown = 0;
    long f0 = minor_faults();
    double t0 = now_s();
    while (n < target) {
        size_t m = n + step;
        uint64_t before = n ? frame_of(p) : 0;
        unsigned char *q = b_realloc(p, m);
        if (!q) {
            fprintf(stderr, "realloc_grow: realloc(%zu) failed\n", m);
            return 1;
        }
        if (p && q != p) {
            uint64_t after = frame_of(q);
            if (before == 0 || after == 0)
                unknown += n;
            else if (before == after)
                moved += n;
            else
                copied += n;
        }
        for (size_t i = n; i < m; i += 4096)
            q[i] = (unsigned char)i;
        p = q;
        n = m;
    }
    double wall = now_s() - t0;
    int ok = 1;
    for (size_t i = 0; i < n; i += 4096)
        ok &= p[i] == (unsigned char)i;
    b_free(p);
    report_str("workload", "realloc-grow");
    report_str("api", BENCH_API);
    report_num("wall_s", wall);
    report_num("copied_mib", (double)copied / MiB);
    report_num("moved_without_copy_mib", (double)moved / MiB);
    report_num("unknown_mib", (double)unknown / MiB);
    report_num("minor_faults", (double)(minor_faults() - f0));
    report_num("peak_rss_mib", (double)status_bytes("VmHWM") / MiB);
    report_num("contents_ok", ok);
    return ok ? 0 : 1;
}
