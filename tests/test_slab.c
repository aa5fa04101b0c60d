/* SPDX-License-Identifier: MIT */
/* Suite "slab": size classes, block reuse, and small frees lowering RSS. */
#include "helpers.h"
#include "internal.h" /* _ta_small_selfcheck */

#include <criterion/criterion.h>
#include <stdbool.h>
#include <stdlib.h>

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

/* The owner's frees go to the span's local list, which becomes the
 * allocation list when that runs dry: a freed block comes back within one
 * span's worth of allocations, and the last one freed comes first. */
Test(slab, freed_block_is_reused)
{
    enum { SPAN_BLOCKS = 65536 / 48 };
    void *a = ta_malloc(48), *b = ta_malloc(48);
    ta_free(b);
    ta_free(a);
    static void *got[SPAN_BLOCKS + 2];
    size_t n = 0, at_a = 0, at_b = 0;
    while (n < SPAN_BLOCKS + 2 && !(at_a && at_b)) {
        got[n] = ta_malloc(48);
        if (got[n] == a)
            at_a = n + 1;
        if (got[n] == b)
            at_b = n + 1;
        n++;
    }
    cr_assert(at_a && at_b, "both freed blocks came back within a span's worth");
    cr_assert_eq(at_b, at_a + 1, "the last freed comes back first, the one before next");
    while (n)
        ta_free(got[--n]);
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
    bool rss_meaningful = !under_valgrind(); /* valgrind's own memory blurs RSS */
    if (rss_meaningful)
        cr_assert_gt(rss_bytes(), start + 50 * MiB);
    else
        cr_log_info("under valgrind: RSS bounds not checked");
    ta_stats_t st = stats_now();
    cr_assert_geq(st.small_live_bytes, (size_t)N * 16);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(*(int *)p[i], i);
        ta_free(p[i]);
    }
    ta_trim();
    size_t end = rss_bytes();
    if (rss_meaningful)
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

/* The fast paths find a size class by table and a block index by a
 * multiply and a shift: both must agree with the plain arithmetic at every
 * size up to 1 KiB and every offset of every class's span. */
Test(slab, class_table_and_block_index_are_exact)
{
    cr_assert(_ta_small_selfcheck());
}

/* Freed blocks anywhere in a span must be found again (the summary of
 * words with free blocks): refilling the holes needs no new span, and no
 * block is handed out twice. */
Test(slab, freed_blocks_anywhere_in_a_span_are_found)
{
    enum { N = 3000 };
    static void *p[N];
    for (int i = 0; i < N; i++)
        cr_assert_not_null(p[i] = ta_malloc(48));
    uint64_t committed = stats_now().small_committed_bytes;
    for (int i = 0; i < N; i += 7) /* holes all over the spans */
        ta_free(p[i]);
    for (int i = 0; i < N; i += 7)
        p[i] = ta_malloc(48);
    cr_assert_eq(stats_now().small_committed_bytes, committed,
                 "a new span although holes were free");
    for (int i = 0; i < N; i++)
        for (int j = i + 1; j < N; j++)
            cr_assert_neq(p[i], p[j], "block %d handed out twice", i);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
}
