/* SPDX-License-Identifier: MIT */
/*
 * Process-wide memory snapshots: the process's RAM and the allocator's
 * figures (the statistics face, lib/core/stats.c) with the VRAM in use
 * (the CUDA module), and their differences as text. In the module tier,
 * above both, so that the allocator core never links the CUDA module.
 */
#define _GNU_SOURCE
#include "core/core.h"
#include "staging.h"

#include <malloc.h>
#include <stdio.h>
#include <string.h>

void ta_memory_snapshot(ta_memory_snapshot_t *out)
{
    struct mallinfo2 mi = ta_mallinfo2();
    memset(out, 0, sizeof *out);
    out->rss = _ta_os_rss();
    out->mapped = mi.hblkhd;
    out->small_used = mi.uordblks;
    out->small_free = mi.fordblks;
    out->total_allocated = mi.arena + mi.hblkhd;
    out->total_used = mi.uordblks + mi.hblkhd;
    size_t fr, total;
    if (_ta_cuda_ready() && ta_cuda_mem_info(&fr, &total) == 0)
        out->vram = total - fr;
}

int ta_memory_snapshot_diff(const ta_memory_snapshot_t *a, const ta_memory_snapshot_t *b, char *buf,
                            size_t len)
{
    static const char *const names[] = {"Process RAM",
                                        "tensoralloc mapped (large)",
                                        "small path used",
                                        "small path free",
                                        "total allocated",
                                        "total used",
                                        "VRAM"};
    const uint64_t va[] = {a->rss,        a->mapped,          a->small_used,
                           a->small_free, a->total_allocated, a->total_used,
                           a->vram};
    const uint64_t vb[] = {b->rss,        b->mapped,          b->small_used,
                           b->small_free, b->total_allocated, b->total_used,
                           b->vram};
    const double GB = 1e9;
    int total = 0;
    for (int i = 0; i < 7; i++) {
        int n = snprintf(
            len > (size_t)total ? buf + total : NULL, len > (size_t)total ? len - (size_t)total : 0,
            "%-30s (%+.3f): %.3fGB -> %.3fGB\n", names[i], ((double)vb[i] - (double)va[i]) / GB,
            (double)va[i] / GB, (double)vb[i] / GB);
        if (n < 0)
            return n;
        total += n;
    }
    return total;
}
