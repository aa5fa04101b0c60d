/* SPDX-License-Identifier: MIT */
/*
 * Suite "badptr": pointers tensoralloc never returned, interior pointers
 * and double frees, on both paths, end the process with SIGABRT (and a
 * one-line message, checked by tests/preload/badptr.sh) instead of
 * corrupting state; user overflows do not reach the metadata.
 */
#include "helpers.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdlib.h>

Test(badptr, double_free_small, .signal = SIGABRT)
{
    void *p = ta_malloc(48);
    ta_free(p);
    ta_free(p);
}

Test(badptr, double_free_large, .signal = SIGABRT)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    void *p = ta_malloc(4 * MiB);
    ta_free(p);
    ta_free(p);
}

Test(badptr, double_free_large_while_pooled, .signal = SIGABRT)
{
    void *p = ta_malloc(4 * MiB); /* the freed mapping waits in the pool */
    ta_free(p);
    ta_free(p);
}

Test(badptr, interior_pointer_small, .signal = SIGABRT)
{
    char *p = ta_malloc(100);
    ta_free(p + 16);
}

Test(badptr, interior_pointer_large, .signal = SIGABRT)
{
    char *p = ta_malloc(8 * MiB);
    ta_free(p + 4096);
}

Test(badptr, pointer_from_the_stack, .signal = SIGABRT)
{
    char local[64];
    ta_free(local);
}

Test(badptr, pointer_from_glibc, .signal = SIGABRT)
{
    void *p = malloc(100); /* the test binary's malloc is glibc's */
    ta_free(p);
}

Test(badptr, realloc_of_a_freed_block, .signal = SIGABRT)
{
    void *p = ta_malloc(64);
    ta_free(p);
    void *q = ta_realloc(p, 128);
    (void)q;
}

Test(badptr, realloc_of_an_interior_large_pointer, .signal = SIGABRT)
{
    char *p = ta_malloc(8 * MiB);
    void *q = ta_realloc(p + 64, 16 * MiB);
    (void)q;
}

Test(badptr, usable_size_of_a_foreign_pointer, .signal = SIGABRT)
{
    static char global[128];
    cr_log_info("%zu", ta_usable_size(global));
}

Test(badptr, usable_size_of_a_freed_small_block, .signal = SIGABRT)
{
    void *p = ta_malloc(64);
    ta_free(p);
    cr_log_info("%zu", ta_usable_size(p));
}

Test(badptr, pointer_into_slab_metadata, .signal = SIGABRT)
{
    char *p = ta_malloc(64);
    /* page 0 of every 4 MiB segment holds its metadata */
    char *segment = (char *)((uintptr_t)p & ~(uintptr_t)((4 << 20) - 1));
    ta_free(segment + 128);
}

/* Overflowing a small block tramples only the neighbouring block: links
 * and sizes live in the segment's metadata pages, so both frees still
 * work and both blocks are handed out again. */
Test(badptr, overflow_into_a_neighbour_leaves_metadata_alone)
{
    enum { SPAN_BLOCKS = 65536 / 64 };
    unsigned char *a = ta_malloc(64), *b = ta_malloc(64);
    cr_assert_eq(b, a + 64, "consecutive blocks of a class are adjacent");
    unsigned char *volatile overflow = a; /* the overflow is the point */
    memset(overflow, 0xEE, 128);          /* a's 64 bytes and all of b */
    ta_free(a);
    ta_free(b);
    static void *got[SPAN_BLOCKS + 2];
    size_t n = 0, back = 0;
    while (n < SPAN_BLOCKS + 2 && back < 2) {
        got[n] = ta_malloc(64);
        back += got[n] == a || got[n] == b;
        n++;
    }
    cr_assert_eq(back, 2, "both blocks came back");
    while (n)
        ta_free(got[--n]);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.small_live_bytes, 0);
}
