/* SPDX-License-Identifier: MIT */
/* Suite "faults": injected map/remap failures and the max_map_count guard. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>

Test(faults, failed_large_map_gives_enomem_and_no_leak)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    ta_stats_t before = stats_now();
    _ta_os_fail_nth_map(1);
    errno = 0;
    cr_assert_null(ta_malloc(8 * MiB));
    cr_assert_eq(errno, ENOMEM);
    ta_stats_t after = stats_now();
    cr_assert_eq(after.large_live_count, before.large_live_count);
    cr_assert_eq(after.large_mapped_bytes, before.large_mapped_bytes);
    cr_assert_eq(after.os_map_failures, before.os_map_failures + 1);
    /* the fault has passed: allocation works again */
    void *p = ta_malloc(8 * MiB);
    cr_assert_not_null(p);
    ta_free(p);
}

Test(faults, failed_segment_map_gives_enomem)
{
    /* Fill the first segment's pages so the next class needs a new span
     * somewhere; with every map failing, a fresh thread heap cannot start. */
    void *keep = ta_malloc(64); /* heap and first segment exist now */
    size_t n = 0;
    void *blocks[200];
    _ta_os_fail_nth_map(1);
    /* 256 KiB blocks below the threshold? use the largest slab classes: each
     * span is several pages, so a few dozen exhaust the segment. */
    ta_option_set(TA_OPT_THRESHOLD, 1 << 20);
    errno = 0;
    void *p;
    while (n < 200 && (p = ta_malloc(900 * KiB)) != NULL)
        blocks[n++] = p;
    cr_assert_lt(n, 200, "the injected failure never surfaced");
    cr_assert_eq(errno, ENOMEM);
    while (n)
        ta_free(blocks[--n]);
    cr_assert_not_null(p = ta_malloc(900 * KiB), "allocation works once the fault passed");
    ta_free(p);
    ta_free(keep);
}

Test(faults, failed_remap_keeps_the_block)
{
    unsigned char *p = ta_malloc(4 * MiB);
    pattern_fill(p, 4 * MiB, 3);
    /* block the in-place growth and the move */
    _ta_os_fail_nth_remap(1);
    _ta_os_fail_nth_map(1);
    errno = 0;
    unsigned char *q = ta_realloc(p, 64 * MiB);
    if (q == NULL) {
        cr_assert_eq(errno, ENOMEM);
        cr_assert(pattern_ok(p, 4 * MiB, 3));
        cr_assert_eq(ta_usable_size(p), 4 * MiB);
        q = ta_realloc(p, 64 * MiB);
    }
    _ta_os_fail_nth_map(0);
    _ta_os_fail_nth_remap(0);
    cr_assert_not_null(q);
    cr_assert(pattern_ok(q, 4 * MiB, 3));
    ta_free(q);
}

Test(faults, every_nth_map_failure_is_absorbed)
{
    /* Walk a failure through the first 40 map calls of a mixed workload. */
    for (long nth = 1; nth <= 40; nth++) {
        void *keep[64] = {0};
        _ta_os_fail_nth_map(nth);
        for (int i = 0; i < 64; i++) {
            size_t n = (i % 4 == 0) ? (size_t)(i + 1) * 100 * KiB : (size_t)(i * 997 % 70000) + 1;
            errno = 0;
            keep[i] = ta_malloc(n);
            if (keep[i] == NULL)
                cr_assert_eq(errno, ENOMEM);
            else
                memset(keep[i], 0x33, n);
        }
        _ta_os_fail_nth_map(0);
        for (int i = 0; i < 64; i++)
            ta_free(keep[i]);
    }
    ta_trim();
    ta_stats_t st = stats_now();
    cr_assert_eq(st.large_live_count, 0);
    cr_assert_eq(st.pool_bytes, 0);
}

Test(faults, map_count_guard_falls_back_to_slabs)
{
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 200);
    enum { N = 3000 };
    static void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = ta_malloc(300 * KiB); /* large by size */
        cr_assert_not_null(p[i], "allocation %d failed near the map limit", i);
        memset(p[i], i & 0xff, 64);
    }
    ta_stats_t st = stats_now();
    cr_assert_leq(st.large_live_count, 200);
    cr_assert_gt(st.maxmap_fallbacks, 2000);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(((unsigned char *)p[i])[63], (unsigned char)(i & 0xff));
        ta_free(p[i]);
    }
}

Test(faults, map_limit_reports_the_override)
{
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 1234);
    cr_assert_eq(stats_now().map_limit, 1234);
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 0);
    cr_assert_gt(stats_now().map_limit, 1000);
}
