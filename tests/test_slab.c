/* SPDX-License-Identifier: MIT */
/* Suite "slab": size classes, block reuse, and small frees lowering RSS. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

Test(slab, every_small_size_is_usable_and_disjoint)
{
    enum { N = 4096 };
    static unsigned char *p[N];
    static size_t n[N];
    for (int i = 0; i < N; i++) {
        n[i] = (size_t)(i * 37 % 20000) + 1;
        p[i] = ta_malloc(n[i]);
        cr_assert_not_null(p[i]);
        cr_assert_geq(ta_usable_size(p[i]), n[i]);
        pattern_fill(p[i], n[i], (uint64_t)i);
    }
    for (int i = 0; i < N; i++)
        cr_assert(pattern_ok(p[i], n[i], (uint64_t)i), "block %d (%zu B) overwritten", i, n[i]);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
}

Test(slab, usable_size_is_a_class_size)
{
    cr_assert_eq(ta_usable_size(ta_malloc(1)), 16);
    cr_assert_eq(ta_usable_size(ta_malloc(17)), 32);
    cr_assert_eq(ta_usable_size(ta_malloc(129)), 160);
    cr_assert_eq(ta_usable_size(ta_malloc(1000)), 1024);
    cr_assert_eq(ta_usable_size(ta_malloc(1025)), 1280);
}

Test(slab, freed_block_is_reused)
{
    void *a = ta_malloc(48);
    ta_free(a);
    void *b = ta_malloc(48);
    cr_assert_eq(a, b, "the lowest free block of the current span comes back first");
    ta_free(b);
}

Test(slab, a_million_small_objects_freed_lower_rss)
{
    enum { N = 1000000 };
    void **p = ta_malloc(N * sizeof *p); /* 8 MB: a large block */
    size_t start = rss_bytes();
    for (int i = 0; i < N; i++) {
        p[i] = ta_malloc(16 + (size_t)(i % 8) * 16);
        cr_assert_not_null(p[i]);
        *(int *)p[i] = i;
    }
    cr_assert_gt(rss_bytes(), start + 50 * MiB);
    ta_stats_t st = stats_now();
    cr_assert_geq(st.small_live_bytes, (size_t)N * 16);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(*(int *)p[i], i);
        ta_free(p[i]);
    }
    ta_trim();
    size_t end = rss_bytes();
    cr_assert_lt(end, start + 16 * MiB, "RSS %zu MiB above start", (end - start) >> 20);
    ta_free(p);
}

Test(slab, statistics_track_small_bytes)
{
    ta_stats_t a = stats_now();
    enum { N = 1000 };
    void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = ta_malloc(1000); /* class 1024 */
    ta_stats_t b = stats_now();
    cr_assert_eq(b.small_live_bytes - a.small_live_bytes, (uint64_t)N * 1024);
    cr_assert_geq(b.small_committed_bytes, b.small_live_bytes);
    struct mallinfo2 mi = ta_mallinfo2();
    cr_assert_eq(mi.uordblks, b.small_live_bytes);
    cr_assert_eq(mi.arena, b.small_committed_bytes);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
    ta_stats_t c = stats_now();
    cr_assert_eq(c.small_live_bytes, a.small_live_bytes);
}

/* Free pages beyond 8 MiB wait RETAIN_MS before going back to the kernel
 * (a load right after an eviction reuses them), but never more than 32 MiB
 * of them per heap. */
static void churn_small(size_t bytes)
{
    enum { BLOCK = 1000 };
    size_t n = bytes / BLOCK;
    void **p = ta_malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) {
        p[i] = ta_malloc(BLOCK);
        cr_assert_not_null(p[i]);
        memset(p[i], 1, BLOCK);
    }
    for (size_t i = 0; i < n; i++)
        ta_free(p[i]);
    ta_free(p);
}

Test(slab, free_pages_wait_then_go_back)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    churn_small(20 * MiB);
    uint64_t dirty = stats_now().small_dirty_bytes;
    cr_assert_gt(dirty, 8 * MiB, "young free pages were purged: %" PRIu64 " bytes left", dirty);
    churn_small(80 * MiB);
    dirty = stats_now().small_dirty_bytes;
    cr_assert_leq(dirty, 32 * MiB, "free pages over the hard limit: %" PRIu64, dirty);
    ta_option_set(TA_OPT_RETAIN_MS, 1);
    usleep(5000);
    churn_small(20 * MiB);
    dirty = stats_now().small_dirty_bytes;
    cr_assert_leq(dirty, 9 * MiB, "old free pages were kept: %" PRIu64 " bytes", dirty);
}
