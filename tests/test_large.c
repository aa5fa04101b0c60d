/* SPDX-License-Identifier: MIT */
/* Suite "large": one mapping per block, the retain pool, mremap, names,
 * huge-page advice, and memory really going back to the kernel. */
#define _GNU_SOURCE
#include "core/large.h"
#include "core/slab.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* The block is its mapping: page aligned, as long as its usable size, and
 * freeing it (with no pool) unmaps exactly that range. */
Test(large, block_starts_at_its_own_mapping)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    size_t sizes[] = {300 * KiB, 3 * MiB + 5};
    for (int i = 0; i < 2; i++) {
        unsigned char *p = ta_malloc(sizes[i]);
        size_t cap = ta_usable_size(p);
        cr_assert_eq((uintptr_t)p % 4096, 0, "no header in front of the block");
        cr_assert_eq(cap, (sizes[i] + 4095) / 4096 * 4096);
        unsigned char vec[1024];
        touch_pages(p, cap);
        cr_assert_eq(mincore(p, cap, vec), 0, "the block's range is mapped");
        ta_free(p);
        errno = 0;
        cr_assert_eq(mincore(p, cap, vec), -1, "the whole range was unmapped");
        cr_assert_eq(errno, ENOMEM);
    }
}

Test(large, huge_blocks_are_advised_hugepage)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    cr_assert_eq(ta_option_set(TA_OPT_THP, 1), 0);
    unsigned char *p = ta_malloc(8 * MiB);
    char buf[8192];
    cr_assert(smaps_entry(p, buf, sizeof buf));
    const char *flags = strstr(buf, "VmFlags:");
    cr_assert_not_null(flags);
    cr_assert(strstr(flags, " hg"), "MADV_HUGEPAGE missing: %s", flags);
    ta_free(p);
}

/* Pages of [p, p + size) resident. */
static size_t resident_pages(const void *p, size_t size)
{
    static unsigned char vec[(64 * MiB) / 4096];
    size_t page = (size_t)sysconf(_SC_PAGESIZE), n = 0;
    cr_assert_leq(size / page, sizeof vec);
    cr_assert_eq(mincore((void *)p, size, vec), 0);
    for (size_t i = 0; i < size / page; i++)
        n += vec[i] & 1;
    return n;
}

/* Whether the kernel populates on request (Linux 5.14 and later). */
static bool kernel_populates(void)
{
    static _Alignas(4096) char probe[4096];
    return _ta_os_populate_write(probe, sizeof probe) == 0;
}

/* Under huge pages a block's last 2 MiB region passes its mapping's end
 * and would fault 4 KiB at a time (up to 511 faults): it is populated at
 * once, in one call. So is the region where a grown block's old pages
 * end. The whole huge pages between stay untouched until written. */
Test(large, huge_blocks_have_their_edge_regions_populated)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    if (!kernel_populates())
        cr_skip_test("this kernel has no MADV_POPULATE_WRITE (before Linux 5.14)");
    cr_assert_eq(ta_option_set(TA_OPT_THP, 1), 0);
    const size_t tail = MiB + 12 * 1024, pages = tail / 4096;
    unsigned char *p = ta_malloc(4 * MiB + tail);
    cr_assert_eq((uintptr_t)p % (2 * MiB), 0);
    cr_assert_eq(resident_pages(p + 4 * MiB, tail), pages, "the last region is populated");
    cr_assert_eq(resident_pages(p, 4 * MiB), 0, "the whole huge pages wait for the program");
    unsigned char *q = ta_realloc(p, 8 * MiB + tail);
    cr_assert_not_null(q);
    cr_assert_eq(resident_pages(q + 4 * MiB, 2 * MiB), 512, "the old end's region is filled up");
    cr_assert_eq(resident_pages(q + 6 * MiB, 2 * MiB), 0);
    cr_assert_eq(resident_pages(q + 8 * MiB, tail), pages, "the grown block's last region too");
    ta_free(q);
}

/* THP=auto, the default: the first fresh mapping is a probe, left
 * unadvised; once a probe was seen written whole, fresh mappings are
 * advised. */
Test(large, thp_auto_by_default_advises_blocks_written_whole)
{
    REQUIRE_THP_AUTO();
    unsigned char *first = ta_malloc(16 * MiB);
    cr_assert_not(advised(first), "nothing was seen written yet: the first block is a probe");
    memset(first, 1, 16 * MiB);
    unsigned char *second = ta_malloc(16 * MiB);
    cr_assert(advised(second), "the probe was written whole: fresh blocks should be advised");
    ta_free(first);
    ta_free(second);
}

/* Blocks touched on their first and last page only (large-scale) must not
 * get huge pages: each would make 2 MiB resident per touch. With huge
 * pages for every block (the default for a day) 5,000 such blocks held
 * 6.3 GiB. */
Test(large, thp_auto_keeps_sparse_blocks_sparse)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    enum { BLOCKS = 16 };
    unsigned char *b[BLOCKS];
    size_t resident = 0;
    for (int i = 0; i < BLOCKS; i++) {
        b[i] = ta_malloc(16 * MiB);
        b[i][0] = 1;
        b[i][16 * MiB - 1] = 2;
        resident += resident_pages(b[i], 16 * MiB);
    }
    /* two pages each, and some slack for the kernel's fault-around */
    cr_assert_leq(resident, (size_t)BLOCKS * 2 * 16, "%zu pages resident for %d blocks", resident,
                  BLOCKS);
    for (int i = 1; i < BLOCKS; i++)
        cr_assert_not(advised(b[i]), "block %d advised though every block is sparse", i);
    for (int i = 0; i < BLOCKS; i++)
        ta_free(b[i]);
}

/* A program that turns sparse is seen: while blocks are dense one fresh
 * mapping in 16 or so is still a probe. */
Test(large, thp_auto_notices_when_blocks_turn_sparse)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    enum { DENSE = 8, SPARSE = 96 };
    unsigned char *d[DENSE], *s[SPARSE];
    for (int i = 0; i < DENSE; i++) {
        d[i] = ta_malloc(4 * MiB);
        memset(d[i], 1, 4 * MiB);
    }
    cr_assert(advised(d[DENSE - 1]), "dense blocks should be advised");
    size_t resident = 0;
    for (int i = 0; i < SPARSE; i++) {
        s[i] = ta_malloc(4 * MiB);
        s[i][0] = 1;
        resident += resident_pages(s[i], 4 * MiB);
    }
    cr_assert_not(advised(s[SPARSE - 1]), "blocks turned sparse but are still advised");
    /* once seen, sparse blocks stay sparse: well under a huge page each */
    cr_assert_lt(resident, (size_t)SPARSE * 512 / 2, "%zu pages resident", resident);
    for (int i = 0; i < DENSE; i++)
        ta_free(d[i]);
    for (int i = 0; i < SPARSE; i++)
        ta_free(s[i]);
}

Test(large, mappings_are_named)
{
    unsigned char *p = ta_malloc(8 * MiB);
    char buf[8192];
    cr_assert(smaps_entry(p, buf, sizeof buf));
    if (_ta_os_name(p, 8 * MiB, "tensoralloc") != 0)
        cr_skip_test("this kernel cannot name anonymous mappings (no CONFIG_ANON_VMA_NAME)");
    cr_assert(strstr(buf, "[anon:tensoralloc]"), "mapping not named:\n%s", buf);
    ta_free(p);
}

Test(large, thp_off_gives_no_huge_advice)
{
    cr_assert_eq(ta_option_set(TA_OPT_THP, 0), 0);
    unsigned char *p = ta_malloc(8 * MiB);
    char buf[8192];
    cr_assert(smaps_entry(p, buf, sizeof buf));
    const char *flags = strstr(buf, "VmFlags:");
    cr_assert_not_null(flags);
    cr_assert_null(strstr(flags, " hg"), "THP=0 but advised: %s", flags);
    ta_free(p);
}

/* Blocks under a huge page are cut from a run, one mapping for several
 * (MoE experts: 15x fewer page faults with the run's huge pages); each
 * still owns its pages, and freed, the run joins up and goes back whole. */
Test(large, blocks_under_a_huge_page_share_a_run)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    /* a footprint whose 1/32 slack has room for a run's rest */
    void *big = ta_malloc(320 * MiB);
    unsigned char *a = ta_malloc(MiB), *b = ta_malloc(MiB);
    uintptr_t lo = (uintptr_t)(a < b ? a : b), hi = (uintptr_t)(a < b ? b : a);
    cr_assert_eq(lo % (2 * MiB), 0, "a run starts on a huge page");
    cr_assert_eq(hi - lo, MiB, "the second block is cut from the first one's run");
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pool_bytes, 6 * MiB, "the run's rest waits in the pool");
    cr_assert_eq(st.large_mapped_bytes, 322 * MiB);
    memset(a, 1, MiB);
    memset(b, 2, MiB);
    ta_free(a);
    for (size_t i = 0; i < MiB; i += 4096)
        cr_assert_eq(b[i], 2, "freeing a neighbour in the run left this block alone");
    ta_free(b);
    st = stats_now();
    cr_assert_eq(st.pool_entries, 1, "the run's pieces join up");
    cr_assert_eq(st.pool_bytes, 8 * MiB);
    ta_trim();
    unsigned char vec[2048];
    errno = 0;
    cr_assert_eq(mincore((void *)lo, 8 * MiB, vec), -1, "the run went back whole");
    cr_assert_eq(errno, ENOMEM);
    ta_free(big);
}

/* A big block cut from the pool keeps the rest of its last huge page, so
 * that no later cut splits it (large-window ran 2x slower without) --
 * unless blocks under a huge page are being asked for often: they can use
 * that rest, which the big block would hold unused (a diffusion UNet's 2.5-7
 * MiB tensors held 180 MiB of rests, 7% above its peak live, issue 25). */
Test(large, big_blocks_leave_their_huge_page_rests_to_small_ones)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    unsigned char *range = ta_malloc(16 * MiB);
    cr_assert_eq((uintptr_t)range % (2 * MiB), 0);
    memset(range, 1, 16 * MiB);
    ta_free(range);
    unsigned char *big = ta_malloc(3 * MiB);
    cr_assert_eq(big, range, "cut from the pooled range");
    cr_assert_eq(ta_usable_size(big), 4 * MiB, "only big blocks asked for: it keeps its huge page");
    ta_free(big);

    enum { SMALL = 128 }; /* a third of the last ~256 large requests, and more */
    void *small[SMALL];
    for (int i = 0; i < SMALL; i++)
        cr_assert_not_null(small[i] = ta_malloc(512 * KiB));
    for (int i = 0; i < SMALL; i++)
        ta_free(small[i]);
    big = ta_malloc(3 * MiB);
    cr_assert_eq(big, range, "cut from the pooled range");
    cr_assert_eq(ta_usable_size(big), 3 * MiB,
                 "blocks under a huge page are asked for: the rest of its huge page is theirs");
    ta_free(big);

    /* one small request in six (large-churn's share) is too few: after
     * ~300 such requests the big blocks keep their rests again */
    for (int i = 0; i < 300; i++) {
        void *q = ta_malloc(i % 6 == 0 ? 512 * KiB : 6 * MiB);
        cr_assert_not_null(q);
        ta_free(q);
    }
    big = ta_malloc(3 * MiB);
    cr_assert_eq(ta_usable_size(big), 4 * MiB, "small blocks became rare: it keeps its huge page");
    ta_free(big);
}

/* A block its caller fills (a load's tensor) may be cut from a run before
 * the footprint bound has room for one, but the pool stays within its
 * byte bound, and over the footprint bound by at most one run's rest. */
Test(large, filled_runs_keep_the_pool_within_its_bounds)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    ta_option_set(TA_OPT_RETAIN_BYTES, 8 * MiB);
    enum { SMALL = 12, FILLED = 200 };
    void *small[SMALL];
    for (int i = 0; i < SMALL; i++)
        cr_assert_not_null(small[i] = ta_malloc(512 * KiB));
    for (int i = 0; i < SMALL; i++)
        ta_free(small[i]);
    cr_assert_eq(stats_now().pool_bytes, 6 * MiB);
    void *one = _ta_alloc_filled(MiB);
    cr_assert_not_null(one);
    cr_assert_leq(stats_now().pool_bytes, 8 * MiB, "a run's rest broke RETAIN_BYTES");
    ta_free(one);
    ta_trim();

    ta_option_set(TA_OPT_RETAIN_BYTES, 1024 * MiB);
    static void *b[FILLED];
    for (int i = 0; i < FILLED; i++) {
        cr_assert_not_null(b[i] = _ta_alloc_filled(3 * MiB / 2));
        memset(b[i], 1, 3 * MiB / 2);
    }
    ta_stats_t st = stats_now();
    uint64_t room = st.large_mapped_bytes / 32; /* at the peak: the slack */
    cr_assert_leq(st.pool_bytes, room + 8 * MiB,
                  "pool %" PRIu64 " KiB, footprint room %" PRIu64
                  " KiB: more than one run's rest over it",
                  (uint64_t)st.pool_bytes >> 10, room >> 10);
    for (int i = 0; i < FILLED; i++)
        ta_free(b[i]);
}

/* Runs are probes like any fresh mapping: a process whose large blocks
 * are all under 2 MiB (experts written whole) gets huge pages in its runs
 * once a run was seen written; one whose small blocks turn sparse stops
 * getting them. */
Test(large, runs_follow_the_huge_page_rule)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    void *big = ta_malloc(320 * MiB); /* room in the footprint bound for runs */
    enum { DENSE = 200, SPARSE = 1000 };
    static unsigned char *d[DENSE], *s[SPARSE];
    for (int i = 0; i < DENSE; i++) {
        d[i] = ta_malloc(MiB);
        memset(d[i], 1, MiB);
    }
    cr_assert(advised(d[DENSE - 1]), "runs of blocks written whole should be advised");
    size_t resident = 0;
    for (int i = 0; i < SPARSE; i++) {
        s[i] = ta_malloc(300 << 10);
        s[i][0] = 1;
    }
    for (int i = SPARSE / 2; i < SPARSE; i++)
        resident += resident_pages(s[i], 300 << 10);
    cr_assert_not(advised(s[SPARSE - 1]), "the small blocks turned sparse but runs are advised");
    cr_assert_lt(resident, (size_t)SPARSE / 2 * 4,
                 "%zu pages resident in the last %d sparse blocks", resident, SPARSE / 2);
    for (int i = 0; i < DENSE; i++)
        ta_free(d[i]);
    for (int i = 0; i < SPARSE; i++)
        ta_free(s[i]);
    ta_free(big);
}

/* A process whose large blocks never needed much (python-json's strings
 * and lists) gets no runs: the footprint bound has no room for the rest. */
Test(large, no_run_without_room_in_the_bound)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    void *a = ta_malloc(MiB);
    cr_assert_eq(stats_now().pool_bytes, 0, "no rest pooled");
    cr_assert_eq(ta_usable_size(a), MiB);
    ta_free(a);
}

Test(large, pool_hands_a_freed_mapping_to_the_next_block)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    void *a = ta_malloc(16 * MiB);
    touch_pages(a, 16 * MiB);
    ta_free(a);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pool_entries, 1);
    cr_assert_eq(st.pool_bytes, 16 * MiB);
    void *b = ta_malloc(16 * MiB);
    cr_assert_eq(a, b, "same-size request should reuse the pooled mapping");
    ta_stats_t st2 = stats_now();
    cr_assert_eq(st2.pool_hits, st.pool_hits + 1);
    cr_assert_eq(st2.pool_bytes, 0);
    /* a smaller request trims the pooled mapping instead of a new one */
    ta_free(b);
    void *c = ta_malloc(10 * MiB);
    cr_assert_eq(c, a);
    cr_assert_eq(ta_usable_size(c), 10 * MiB);
    ta_free(c);
    /* a larger one grows it (mremap) */
    void *d = ta_malloc(20 * MiB);
    cr_assert_eq((uintptr_t)d % (2 * MiB), 0);
    cr_assert_eq(stats_now().pool_hits, st2.pool_hits + 2);
    memset(d, 1, 20 * MiB);
    ta_free(d);
    ta_trim();
    cr_assert_eq(stats_now().pool_bytes, 0);
}

/* The VMA (line of /proc/self/maps) holding p. */
static bool vma_of(const void *p, uintptr_t *start, uintptr_t *end)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return false;
    char line[512];
    bool found = false;
    unsigned long s, e;
    while (!found && fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && s <= (uintptr_t)p && (uintptr_t)p < e) {
            *start = s;
            *end = e;
            found = true;
        }
    fclose(f);
    return found;
}

/* The unused end of a pooled mapping stays pooled with its pages, the next
 * block takes it without a fault, and the pieces join up again when both
 * are free, into a range mremap can still grow. */
Test(large, pool_keeps_cut_ends_and_joins_them)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    unsigned char *a = ta_malloc(20 * MiB);
    memset(a, 0xA5, 20 * MiB);
    ta_free(a);
    ta_stats_t st = stats_now();
    unsigned char *b = ta_malloc(4 * MiB);
    cr_assert_eq(b, a);
    ta_stats_t st2 = stats_now();
    cr_assert_eq(st2.pool_entries, 1);
    cr_assert_eq(st2.pool_bytes, 16 * MiB, "the cut end stays pooled");
    unsigned char *c = ta_malloc(8 * MiB);
    cr_assert_eq(c, a + 4 * MiB, "the next block takes the cut end");
    static unsigned char vec[8 * MiB / 4096];
    cr_assert_eq(mincore(c, 8 * MiB, vec), 0);
    for (size_t i = 0; i < sizeof vec; i++)
        cr_assert(vec[i] & 1, "page %zu of the reused end is not resident", i);
    ta_stats_t st3 = stats_now();
    cr_assert_eq(st3.os_map_calls, st.os_map_calls, "no new mapping");
    cr_assert_eq(st3.pool_bytes, 8 * MiB);
    ta_free(b);
    ta_free(c);
    ta_stats_t st4 = stats_now();
    cr_assert_eq(st4.pool_entries, 1, "the three pieces joined");
    cr_assert_eq(st4.pool_bytes, 20 * MiB);
    uintptr_t vs, ve;
    cr_assert(vma_of(a, &vs, &ve));
    cr_assert(vs <= (uintptr_t)a && ve >= (uintptr_t)a + 20 * MiB,
              "the joined entry spans VMAs: %lx-%lx", (unsigned long)vs, (unsigned long)ve);
    unsigned char *d = ta_malloc(20 * MiB);
    cr_assert_eq(d, a, "the joined entry serves the whole size again");
    cr_assert_eq(d[0], 0xA5);
    cr_assert_eq(d[20 * MiB - 1], 0xA5, "the same pages, not fresh ones");
    uint64_t remaps = stats_now().os_remap_calls;
    unsigned char *e = ta_realloc(d, 40 * MiB);
    cr_assert_not_null(e);
    cr_assert_gt(stats_now().os_remap_calls, remaps, "grown by mremap");
    cr_assert_eq(e[20 * MiB - 1], 0xA5);
    ta_free(e);
    ta_trim();
    cr_assert_eq(stats_now().pool_bytes, 0);
}

/* A block pinned for the GPU never joins its neighbours again (the driver
 * may have split its VMA) and is never grown: it goes back to the pool as
 * a range alone. */
Test(large, pinned_blocks_do_not_join)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    unsigned char *a = ta_malloc(20 * MiB);
    ta_free(a);
    unsigned char *b = ta_malloc(4 * MiB);
    cr_assert_eq(b, a);
    uintptr_t base;
    size_t cap;
    cr_assert_eq(_ta_large_pin_mark(b, true, &base, &cap), 0);
    cr_assert_eq(_ta_large_pin_mark(b, false, &base, &cap), 0);
    ta_free(b);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pool_entries, 2);
    cr_assert_eq(st.pool_bytes, 20 * MiB);
    ta_trim();
}

/* The /proc/self/maps entries that overlap [p, p + n): how many, and
 * whether they cover it without a gap. */
static int vmas_over(const void *p, size_t n, bool *covered)
{
    uintptr_t lo = (uintptr_t)p, hi = lo + n, reached = lo;
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    char line[512];
    int count = 0;
    while (fgets(line, sizeof line, f)) {
        uintptr_t a, b;
        if (sscanf(line, "%lx-%lx", &a, &b) != 2 || b <= lo || a >= hi)
            continue;
        count++;
        if (a <= reached && b > reached)
            reached = b;
    }
    fclose(f);
    *covered = reached >= hi;
    return count;
}

/* A load whose tensors are bigger than any pooled range gets a block put
 * together from pooled ranges moved into it with mremap: their pages (and
 * contents: nothing is zeroed or copied) are in it, back to back, nothing
 * else is touched, calloc still gets zeros, and realloc, which mremap
 * cannot do across the pieces' VMAs, copies. */
Test(large, pooled_ranges_move_into_one_block)
{
    if (under_valgrind())
        cr_skip_test("valgrind does not move mappings with mremap MREMAP_FIXED as the kernel does");
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    ta_option_set(TA_OPT_THP, 0);
    const size_t B = 4 * MiB + 512 * KiB; /* under half the block: not grown */
    unsigned char *a = ta_malloc(4 * MiB), *spacer = ta_malloc(2 * MiB), *b = ta_malloc(B);
    unsigned char *spacer2 = ta_malloc(2 * MiB);
    memset(a, 0xa1, 4 * MiB);
    memset(b, 0xb2, B);
    memset(spacer, 0x55, 2 * MiB);
    memset(spacer2, 0x66, 2 * MiB);
    ta_free(a);
    ta_free(b);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pool_bytes, 4 * MiB + B);
    cr_assert_eq(st.pool_entries, 2, "the ranges must not have joined");
    _ta_os_counters_t c0, c1;
    _ta_os_counters(&c0);
    unsigned char *p = ta_malloc(10 * MiB);
    _ta_os_counters(&c1);
    cr_assert_not_null(p);
    cr_assert_eq(stats_now().pool_bytes, 0, "both ranges went into the block");
    cr_assert_geq(c1.remap - c0.remap, 2, "the pieces were not moved");
    /* the biggest piece first, the next on the next huge-page boundary
     * (6 MiB), fresh zeros between: contents moved, not zeroed */
    cr_assert_eq(p[0], 0xb2);
    cr_assert_eq(p[B - 1], 0xb2);
    cr_assert_eq(p[B], 0);
    cr_assert_eq(p[6 * MiB], 0xa1);
    cr_assert_eq(p[10 * MiB - 1], 0xa1);
    for (size_t i = 0; i < 2 * MiB; i += 4096) {
        cr_assert_eq(spacer[i], 0x55, "a neighbour was overwritten");
        cr_assert_eq(spacer2[i], 0x66, "a neighbour was overwritten");
    }
    bool covered;
    int vmas = vmas_over(p, 10 * MiB, &covered);
    cr_assert(covered, "the block has a hole");
    cr_assert(vmas >= 2 && vmas <= 4, "%d VMAs for a block of 2 pieces and a fresh gap", vmas);
    cr_log_info("a block of 2 pieces lies in %d VMAs", vmas);
    /* realloc copies (mremap refuses the pieces' VMAs) and keeps contents */
    unsigned char *q = ta_realloc(p, 14 * MiB);
    cr_assert_not_null(q);
    cr_assert_eq(q[0], 0xb2);
    cr_assert_eq(q[10 * MiB - 1], 0xa1);
    ta_free(q);
    /* calloc from pieces still gets zeros */
    unsigned char *x = ta_malloc(4 * MiB), *y = ta_malloc(B);
    memset(x, 0x77, 4 * MiB);
    memset(y, 0x77, B);
    ta_trim();
    ta_free(x);
    ta_free(y);
    unsigned char *z = ta_calloc(1, 10 * MiB);
    cr_assert_not_null(z);
    for (size_t i = 0; i < 10 * MiB; i += 512)
        cr_assert_eq(z[i], 0, "calloc from moved pieces is not zero at %zu", i);
    ta_free(z);
    ta_free(spacer);
    ta_free(spacer2);
    ta_trim();
}

/* Random large blocks through a pool that cuts and joins pieces: blocks
 * never overlap, keep their contents, and those of 2 MiB and more stay
 * 2 MiB aligned (small blocks are cut off the end of big entries). */
Test(large, pool_pieces_keep_blocks_apart_and_aligned)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    enum { LIVE = 48, OPS = 4000 };
    static unsigned char *blk[LIVE];
    static size_t len[LIVE];
    uint64_t rng = 12345;
    for (int op = 0; op < OPS; op++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        int i = (int)((rng >> 33) % LIVE);
        if (blk[i]) {
            cr_assert(pattern_ok(blk[i], 4096, (uint64_t)i + len[i]), "block %d head changed", i);
            cr_assert(pattern_ok(blk[i] + len[i] - 4096, 4096, (uint64_t)i * 7 + len[i]),
                      "block %d end changed", i);
            ta_free(blk[i]);
            blk[i] = NULL;
            continue;
        }
        /* 256 KiB to 16 MiB, log-uniform */
        size_t n = (size_t)256 << 10 << ((rng >> 20) % 7);
        n += (size_t)((rng >> 40) % n);
        blk[i] = ta_malloc(n);
        len[i] = n;
        cr_assert_not_null(blk[i]);
        if (n >= 2 * MiB)
            cr_assert_eq((uintptr_t)blk[i] % (2 * MiB), 0, "%zu-byte block at %p", n,
                         (void *)blk[i]);
        for (int j = 0; j < LIVE; j++)
            if (j != i && blk[j])
                cr_assert(blk[i] + n <= blk[j] || blk[j] + len[j] <= blk[i],
                          "blocks %d and %d overlap", i, j);
        pattern_fill(blk[i], 4096, (uint64_t)i + n);
        pattern_fill(blk[i] + n - 4096, 4096, (uint64_t)i * 7 + n);
    }
    ta_stats_t st = stats_now();
    cr_assert_gt(st.pool_hits, OPS / 4, "the pool served few blocks: %" PRIu64, st.pool_hits);
    for (int i = 0; i < LIVE; i++)
        ta_free(blk[i]);
    ta_trim();
    cr_assert_eq(stats_now().pool_bytes, 0);
}

Test(large, retain_zero_unmaps_on_every_free)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    ta_stats_t before = stats_now();
    for (int i = 0; i < 10; i++)
        ta_free(ta_malloc(4 * MiB));
    ta_stats_t after = stats_now();
    cr_assert_eq(after.pool_bytes, 0);
    cr_assert_eq(after.pool_hits, before.pool_hits);
    cr_assert_geq(after.os_unmap_calls - before.os_unmap_calls, 10);
}

Test(large, pool_respects_its_byte_bound)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 20 * MiB);
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    void *p[8];
    for (int i = 0; i < 8; i++)
        p[i] = ta_malloc(8 * MiB);
    for (int i = 0; i < 8; i++) {
        ta_free(p[i]);
        cr_assert_leq(stats_now().pool_bytes, 20 * MiB);
    }
    /* the excess comes off the oldest range, in whole huge pages */
    cr_assert_geq(stats_now().pool_bytes, 16 * MiB);
}

Test(large, pool_expires_without_allocator_calls)
{
    ta_option_set(TA_OPT_RETAIN_MS, 100);
    size_t start = rss_bytes();
    void *p = ta_malloc(64 * MiB);
    memset(p, 7, 64 * MiB);
    ta_free(p);
    cr_assert_eq(stats_now().pool_bytes, 64 * MiB);
    /* no allocator call from here on: the purge thread must do it (the
     * entry leaves the pool just before its munmap, so wait for both) */
    bool check_rss = rss_meaningful();
    for (int i = 0;
         i < 100 && (stats_now().pool_bytes || (check_rss && rss_bytes() >= start + 16 * MiB)); i++)
        usleep(20000);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pool_bytes, 0, "pooled mapping still there after 2 s");
    cr_assert_geq(st.pool_expired, 1);
    if (check_rss)
        cr_assert_lt(rss_bytes(), start + 16 * MiB, "unmapped memory still resident after 2 s");
    else
        cr_log_info("under valgrind or ASan: RSS bounds not checked");
}

/* Retention by activity: while large requests keep coming (a model loading
 * for longer than RETAIN_MS) the pool keeps an evicted model's pages;
 * once they stop it gives them back within about RETAIN_MS. */
Test(large, pool_waits_while_requests_come_and_empties_when_they_stop)
{
    ta_option_set(TA_OPT_RETAIN_MS, 150);
    void *p = ta_malloc(32 * MiB);
    memset(p, 7, 32 * MiB);
    ta_free(p);
    cr_assert_eq(stats_now().pool_bytes, 32 * MiB);
    for (int i = 0; i < 60; i++) { /* 600 ms of requests, 4 x RETAIN_MS */
        void *q = ta_malloc(300 * KiB);
        cr_assert_not_null(q);
        memset(q, 1, 300 * KiB);
        ta_free(q);
        usleep(10000);
    }
    ta_stats_t active = stats_now();
    cr_assert_geq(active.pool_bytes, 32 * MiB - 300 * KiB,
                  "the pool gave back %zu MiB while requests kept coming",
                  (size_t)(32 * MiB - active.pool_bytes) / MiB);
    int waited = 0;
    while (stats_now().pool_bytes != 0 && waited < 2000) {
        usleep(10000);
        waited += 10;
    }
    cr_assert_eq(stats_now().pool_bytes, 0, "pool still holds memory 2 s after the last request");
    cr_log_info("empty %d ms after the last request (RETAIN_MS 150)", waited);
}

Test(large, realloc_uses_mremap_and_copies_nothing)
{
    size_t n = 256 * MiB;
    unsigned char *p = ta_malloc(n);
    for (size_t i = 0; i < n; i += 4096)
        p[i] = (unsigned char)(i >> 12);
    size_t rss_before = rss_bytes();
    uint64_t remaps = stats_now().os_remap_calls;
    unsigned char *q = ta_realloc(p, 2 * n);
    cr_assert_not_null(q);
    /* A copy would fault in another 256 MiB; mremap moves page tables. */
    if (rss_meaningful()) /* valgrind's and ASan's own memory blur RSS */
        cr_assert_lt(rss_bytes(), rss_before + 32 * MiB, "realloc grew RSS: it copied");
    cr_assert_gt(stats_now().os_remap_calls, remaps);
    cr_assert_eq((uintptr_t)q % (2 * MiB), 0);
    for (size_t i = 0; i < n; i += 4096)
        cr_assert_eq(q[i], (unsigned char)(i >> 12));
    unsigned char *r = ta_realloc(q, n / 2);
    cr_assert_not_null(r);
    for (size_t i = 0; i < n / 2; i += 4096)
        cr_assert_eq(r[i], (unsigned char)(i >> 12));
    cr_assert_eq(ta_usable_size(r), n / 2);
    ta_free(r);
}

Test(large, one_gib_freed_and_trimmed_goes_back)
{
    size_t start = rss_bytes();
    enum { N = 64 };
    void *blocks[N];
    for (int i = 0; i < N; i++) {
        blocks[i] = ta_malloc(16 * MiB);
        cr_assert_not_null(blocks[i]);
        memset(blocks[i], i, 16 * MiB);
    }
    bool check_rss = rss_meaningful();
    if (check_rss)
        cr_assert_gt(rss_bytes(), start + 900 * MiB);
    for (int i = 0; i < N; i++)
        ta_free(blocks[i]);
    ta_trim();
    size_t end = rss_bytes();
    if (check_rss)
        cr_assert_lt(end, start + 16 * MiB, "RSS %zu MiB above start", (end - start) >> 20);
    else
        cr_log_info("under valgrind or ASan: RSS bounds not checked; stats instead");
    cr_assert_eq(stats_now().pool_bytes, 0);
    cr_assert_eq(stats_now().large_live_count, 0);
}

Test(large, statistics_agree_with_allocations)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    ta_stats_t base = stats_now();
    size_t sizes[] = {300 * KiB, 1 * MiB, 5 * MiB + 1};
    void *p[3];
    size_t mapped = 0, live = 0;
    for (int i = 0; i < 3; i++) {
        p[i] = ta_malloc(sizes[i]);
        live += sizes[i];
        mapped += ta_usable_size(p[i]);
    }
    ta_stats_t st = stats_now();
    cr_assert_eq(st.large_live_count - base.large_live_count, 3);
    cr_assert_eq(st.large_live_bytes - base.large_live_bytes, live);
    cr_assert_eq(st.large_mapped_bytes - base.large_mapped_bytes, mapped);
    cr_assert_geq(st.large_peak_bytes, st.large_live_bytes);
    struct mallinfo2 mi = ta_mallinfo2();
    cr_assert_eq(mi.hblks, st.large_live_count);
    cr_assert_eq(mi.hblkhd, st.large_mapped_bytes);
    for (int i = 0; i < 3; i++)
        ta_free(p[i]);
    st = stats_now();
    cr_assert_eq(st.large_live_count, base.large_live_count);
    cr_assert_eq(st.large_live_bytes, base.large_live_bytes);
}

/* Growing step by step across 2 MiB once split the mapping into two VMAs
 * (huge-page advice on the new part only), and mremap then failed. */
Test(large, realloc_in_small_steps_across_huge_page_size)
{
    size_t n = 300 * KiB;
    unsigned char *p = ta_malloc(n);
    pattern_fill(p, n, 1);
    uint64_t copies_before = stats_now().os_remap_calls;
    while (n < 40 * MiB) {
        size_t m = n + n / 8 + 4096;
        unsigned char *q = ta_realloc(p, m);
        cr_assert_not_null(q, "realloc %zu -> %zu failed", n, m);
        cr_assert(pattern_ok(q, n, 1), "contents lost at %zu", n);
        pattern_fill(q, m, 1);
        p = q;
        n = m;
    }
    cr_assert_gt(stats_now().os_remap_calls, copies_before + 20);
    if (n >= 2 * MiB)
        cr_assert_eq((uintptr_t)p % (2 * MiB), 0, "grown block lost its 2 MiB alignment");
    ta_free(p);
}

/* A program whose large blocks come and go one at a time, in sizes and
 * alignments the pool cannot all reuse (Python's strings and lists): the
 * pool must not pile up RETAIN_MS worth of them. Live mappings plus pool
 * stay within 1.25 times the most the live blocks ever mapped. */
Test(large, pool_stays_within_1_32_above_the_live_peak)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    size_t peak = 0, worst_pool = 0;
    for (int i = 0; i < 48; i++) {
        size_t size = (size_t)(1 + i % 3) * 2 * MiB;
        size_t align = (size_t)2 * MiB << (i % 4); /* 2-16 MiB: many entries do not fit */
        void *p = ta_aligned_alloc(align, size);
        cr_assert_not_null(p);
        ta_stats_t st = stats_now();
        if (st.large_mapped_bytes > peak)
            peak = st.large_mapped_bytes;
        ta_free(p);
        st = stats_now();
        if (st.pool_bytes > worst_pool)
            worst_pool = st.pool_bytes;
        cr_assert_leq(st.pool_bytes + st.large_mapped_bytes, peak + peak / 32,
                      "step %d: pool %zu MiB with a live peak of %zu MiB", i,
                      (size_t)st.pool_bytes / MiB, peak / MiB);
    }
    cr_log_info("peak %zu MiB, largest pool %zu MiB", peak / MiB, worst_pool / MiB);
    cr_assert_gt(worst_pool, 0, "the pool kept nothing: the test shows no bound");
}

/* A piece of a pack (what blocks are cut from at vm.max_map_count) that
 * was pinned for CUDA goes back to its own pack when freed, and the pack
 * is unmapped once empty. Before: pinning set the piece's origin to 0 and
 * its free wrote packs[-1] (UBSan: index out of bounds) and left the pack
 * mapped for good. */
Test(large, a_pinned_piece_of_a_pack_goes_back_to_its_pack)
{
    void *p = _ta_large_alloc_packed(300 * KiB, 0);
    cr_assert_not_null(p);
    memset(p, 3, 300 * KiB);
    uintptr_t base;
    size_t capacity;
    cr_assert_eq(_ta_large_pin_mark(p, true, &base, &capacity), 0);
    cr_assert_eq(base, (uintptr_t)p);
    ta_free(p);
    unsigned char vec;
    errno = 0;
    int rc = mincore((void *)((uintptr_t)p & ~(uintptr_t)4095), 4096, &vec);
    cr_assert(rc != 0 && errno == ENOMEM, "the empty pack is still mapped");
}

/* Blocks the program split into several VMAs (madvise on part of each),
 * freed into the pool, then put together into one larger block by moving
 * them: under the order of kernels before 6.17 (emulated by the OS layer:
 * the destination is unmapped, then the move fails), the block must come
 * out whole. Before: it had a hole where each move failed (SIGSEGV on the
 * first write). */
static void *split_blocks_then_assemble(size_t *out_size)
{
    ta_trim();
    enum { N = 4 };
    void *b[N];
    for (int i = 0; i < N; i++) {
        b[i] = ta_malloc(6 * MiB);
        cr_assert_not_null(b[i]);
        memset(b[i], 1, 6 * MiB);
        cr_assert_eq(madvise((char *)b[i] + 2 * MiB, 2 * MiB, MADV_NOHUGEPAGE), 0);
        cr_assert_eq(madvise((char *)b[i] + 3 * MiB, MiB, MADV_DONTDUMP), 0);
    }
    for (int i = 0; i < N; i++)
        ta_free(b[i]);
    *out_size = 20 * MiB; /* no pooled range fits; the largest is under half */
    return ta_malloc(*out_size);
}

static bool mapped_whole(void *p, size_t size)
{
    unsigned char vec[64];
    for (size_t off = 0; off < size; off += 64 * 4096)
        if (mincore((char *)p + off, size - off < 64 * 4096 ? size - off : 64 * 4096, vec) != 0)
            return false;
    return true;
}

Test(large, split_blocks_are_reused_whole_under_the_old_mremap_order)
{
    _ta_os_counters_t before, after;
    _ta_os_counters(&before);
    _ta_os_emulate_old_mremap(1);
    size_t size;
    char *p = split_blocks_then_assemble(&size);
    _ta_os_emulate_old_mremap(0);
    _ta_os_counters(&after);
    cr_assert_not_null(p);
    cr_assert_gt(after.remap_failures, before.remap_failures, "no move was refused");
    cr_assert(mapped_whole(p, size), "the block has a hole");
    memset(p, 2, size);
    ta_free(p);
    ta_trim();
    cr_assert_eq(stats_now().large_live_count, 0);
}

/* The same, with another mapping placed in the hole before the allocator
 * can fill it again (as another thread's mmap could): the block is given
 * up, the request is served from a fresh mapping, and the other mapping is
 * never unmapped or handed out. */
Test(large, a_mapping_placed_in_the_hole_is_never_touched)
{
    _ta_os_emulate_old_mremap(2);
    size_t size;
    char *p = split_blocks_then_assemble(&size);
    unsigned char *intruder = _ta_os_emulated_intruder();
    _ta_os_emulate_old_mremap(0);
    cr_assert_not_null(p);
    cr_assert_not_null(intruder, "no move was refused");
    cr_assert((unsigned char *)p + size <= intruder || intruder + 4096 <= (unsigned char *)p,
              "the block overlaps the other mapping");
    memset(p, 2, size);
    ta_free(p);
    ta_trim();
    cr_assert(mapped_whole(intruder, 4096), "the other mapping was unmapped");
    for (int i = 0; i < 4096; i++)
        cr_assert_eq(intruder[i], 0x5a);
    munmap(intruder, 4096);
}

/* realloc of a block the program split: growth moves it onto an aligned
 * destination, which the old order unmaps; the contents survive, through
 * a copy when the move is refused. */
Test(large, realloc_of_a_split_block_under_the_old_mremap_order)
{
    unsigned char *p = ta_malloc(6 * MiB);
    cr_assert_not_null(p);
    for (size_t i = 0; i < 6 * MiB; i++)
        p[i] = (unsigned char)(i * 7);
    cr_assert_eq(madvise(p + 2 * MiB, 2 * MiB, MADV_NOHUGEPAGE), 0);
    void *block = ta_malloc(MiB); /* keeps the range above p taken: growth must move */
    _ta_os_emulate_old_mremap(2);
    unsigned char *q = ta_realloc(p, 64 * MiB);
    unsigned char *intruder = _ta_os_emulated_intruder();
    _ta_os_emulate_old_mremap(0);
    cr_assert_not_null(q);
    for (size_t i = 0; i < 6 * MiB; i++)
        cr_assert_eq(q[i], (unsigned char)(i * 7), "byte %zu", i);
    memset(q, 1, 64 * MiB);
    ta_free(q);
    ta_free(block);
    ta_trim();
    if (intruder != NULL) {
        cr_assert(mapped_whole(intruder, 4096), "the other mapping was unmapped");
        cr_assert_eq(intruder[0], 0x5a);
        munmap(intruder, 4096);
    }
}

/* Sizes past PTRDIFF_MAX reach the large path only through
 * _ta_alloc_mapped (the front door refuses them): refused at once with
 * ENOMEM, with ranges in the pool (the pool's size bins are not made for
 * them: a take of 2^63 bytes looped for ever in its hash). */
Test(large, impossible_sizes_are_refused_before_the_pool, .timeout = 20)
{
    void *keep[6];
    for (int i = 0; i < 6; i++)
        keep[i] = ta_malloc((size_t)(i + 1) * 3 * MiB);
    for (int i = 0; i < 6; i += 2)
        ta_free(keep[i]);
    size_t sizes[] = {(size_t)PTRDIFF_MAX + 1, (size_t)1 << 63, SIZE_MAX - 4096, SIZE_MAX};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        errno = 0;
        cr_assert_null(_ta_alloc_mapped(sizes[i], 0), "size %zu", sizes[i]);
        cr_assert_eq(errno, ENOMEM);
    }
    for (int i = 1; i < 6; i += 2)
        ta_free(keep[i]);
}

/* A fork while the purge thread is in the middle of a pass: here, between
 * taking an expired range out of the pool and unmapping it (the unmap hook
 * holds it there 300 ms). The fork waits for the pass (fork handlers take
 * the pass lock), so the child never holds a range that is neither pooled
 * nor unmapped. Before: the child kept the range mapped, and nothing in it
 * knew of it (a leak of the whole block in every such child). */
static void *_Atomic held_range;
static atomic_int hook_holding;

static void hold_in_unmap(void *addr, size_t size)
{
    (void)size;
    if (addr == atomic_load(&held_range)) {
        atomic_store(&hook_holding, 1);
        usleep(300000);
    }
}

Test(large, fork_waits_for_a_purge_pass_in_progress, .timeout = 30)
{
    ta_option_set(TA_OPT_RETAIN_MS, 100);
    ta_option_set(TA_OPT_PURGE_THREAD, 1); /* this process has no threads of its own */
    char *p = ta_malloc(8 * MiB);
    cr_assert_not_null(p);
    memset(p, 1, 8 * MiB);
    atomic_store(&held_range, p);
    _ta_os_set_unmap_hook(hold_in_unmap);
    ta_free(p); /* into the pool; the purge thread expires it after 100 ms */
    for (int i = 0; i < 300 && !atomic_load(&hook_holding); i++)
        usleep(10000);
    cr_assert(atomic_load(&hook_holding), "the purge thread never unmapped the range");
    pid_t pid = fork();
    if (pid == 0) {
        unsigned char vec;
        bool mapped = mincore(p, 4096, &vec) == 0;
        _exit(mapped && stats_now().pool_bytes == 0 ? 1 : 0);
    }
    int status;
    cr_assert(wait_child(pid, 10, &status), "the child hung");
    _ta_os_set_unmap_hook(NULL);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the child holds the range, neither pooled nor unmapped");
}
