/* SPDX-License-Identifier: MIT */
/*
 * Suite "limits": what a process meets at the kernel's limits. Unmaps the
 * kernel refuses at vm.max_map_count (filled for real with this test's own
 * mappings, and through the MAX_MAP_COUNT option with injected failures),
 * aligned requests near the limit, and RLIMIT_AS with a full pool.
 * Criterion runs each test in a process of its own.
 */
#define _GNU_SOURCE
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

static void skip_unless_plain(void)
{
    if (under_valgrind())
        cr_skip_test("valgrind keeps mappings of its own and emulates the limits");
    if (UNDER_ASAN)
        cr_skip_test("AddressSanitizer's shadow memory changes the mapping count and RLIMIT_AS");
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- filling vm.max_map_count with the test's own mappings --------------- */

static void **fill;
static size_t fill_count, fill_cap;

/* The real tests fill the kernel's limit: skip where it is too high to
 * fill in a test (some distributions set it near 2^31). */
static void skip_unless_fillable(void)
{
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    long limit = 0;
    if (f) {
        if (fscanf(f, "%ld", &limit) != 1)
            limit = 0;
        fclose(f);
    }
    if (limit <= 0 || limit > 500000)
        cr_skip_test("vm.max_map_count is %ld: too high (or unknown) to fill here", limit);
}

/* Maps single pages of alternating protection (so that neighbours never
 * merge) until the kernel refuses with ENOMEM; returns how many. */
static size_t fill_to_the_limit(void)
{
    fill_cap = 1 << 20;
    fill = mmap(NULL, fill_cap * sizeof *fill, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    cr_assert_neq(fill, MAP_FAILED);
    for (fill_count = 0; fill_count < fill_cap; fill_count++) {
        int prot = fill_count % 2 ? PROT_READ : PROT_NONE;
        void *p = mmap(NULL, 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            cr_assert_eq(errno, ENOMEM, "mmap failed with %d before the limit", errno);
            break;
        }
        fill[fill_count] = p;
    }
    return fill_count;
}

static void fill_release(void)
{
    for (size_t i = 0; i < fill_count; i++)
        munmap(fill[i], 4096);
    munmap(fill, fill_cap * sizeof *fill);
    fill_count = 0;
}

static size_t resident_pages(void *p, size_t n)
{
    unsigned char vec[1024];
    size_t pages = n / 4096;
    cr_assert_leq(pages, sizeof vec);
    cr_assert_eq(mincore(p, n, vec), 0);
    size_t r = 0;
    for (size_t i = 0; i < pages; i++)
        r += vec[i] & 1;
    return r;
}

/* 81 blocks of 512 KiB cut from one pooled mapping; every other one is
 * freed, so each freed block is the middle of a mapping and its unmap needs
 * a split the kernel refuses at the limit. Before the fix ta_trim put the
 * failed ranges back with age "now", evicted them again, and never
 * returned. */
Test(limits, unmaps_refused_at_the_real_limit_are_parked, .timeout = 60)
{
    skip_unless_plain();
    skip_unless_fillable();
    enum { N = 81, FREED = N / 2 };
    const size_t bs = 512 * KiB;
    ta_option_set(TA_OPT_THP, 0);
    ta_free(ta_malloc(48 * MiB)); /* one pooled mapping; starts the purge thread */
    char *b[N];
    for (int i = 0; i < N; i++) {
        b[i] = ta_malloc(bs);
        cr_assert_not_null(b[i]);
        memset(b[i], 0x5a, bs);
    }
    for (int i = 1; i < N; i += 2)
        ta_free(b[i]);
    ta_stats_t before = stats_now();

    size_t filled = fill_to_the_limit();
    ta_trim();
    ta_stats_t at = stats_now();
    size_t resident = 0;
    for (int i = 1; i < N; i += 2)
        resident += resident_pages(b[i] + 4096, bs - 4096);
    sleep_ms(4000); /* the timed retries end after about 3 s */
    uint64_t failures_idle = stats_now().os_unmap_failures;
    sleep_ms(1500);
    uint64_t failures_later = stats_now().os_unmap_failures;
    fill_release();

    cr_assert_gt(filled, 1000, "only %zu mappings before the limit", filled);
    cr_assert_geq(at.parked_count, FREED, "%" PRIu64 " parked", at.parked_count);
    cr_assert_geq(at.os_unmap_failures, before.os_unmap_failures + FREED);
    cr_assert_eq(resident, 0, "%zu pages of parked ranges still resident", resident);
    cr_assert_eq(failures_later, failures_idle, "retries went on while idle at the limit");

    ta_trim(); /* room again: the parked ranges go */
    ta_stats_t after = stats_now();
    cr_assert_eq(after.parked_count, 0);
    cr_assert_eq(after.parked_bytes, 0);
    for (int i = 0; i < N; i += 2) {
        cr_assert_eq(b[i][bs - 1], 0x5a, "a live block lost its contents");
        ta_free(b[i]);
    }
    ta_trim();
    cr_assert_eq(stats_now().large_live_count, 0);
}

/* At the limit the purge thread cannot be created (its stack is a
 * mapping): frees that wake it must still return, and the pool ages on
 * allocator calls instead. */
Test(limits, no_purge_thread_at_the_real_limit, .timeout = 60)
{
    skip_unless_plain();
    skip_unless_fillable();
    enum { N = 8 };
    ta_option_set(TA_OPT_RETAIN_MS, 50);
    void *b[N], *keep = ta_malloc(300 * KiB);
    for (int i = 0; i < N; i++)
        b[i] = ta_malloc(4 * MiB); /* nothing freed yet: no purge thread */
    size_t filled = fill_to_the_limit();
    for (int i = 0; i < N; i++)
        ta_free(b[i]); /* the first wakes the purge thread, whose creation fails */
    ta_stats_t pooled = stats_now();
    sleep_ms(200);
    ta_free(ta_malloc(300 * KiB)); /* an allocator call: aged entries go */
    ta_stats_t aged = stats_now();
    fill_release();
    ta_free(keep);
    cr_assert_gt(filled, 1000);
    cr_assert_geq(pooled.pool_bytes, N * 4 * MiB, "the frees went to the pool");
    cr_assert_lt(aged.pool_bytes, pooled.pool_bytes, "the pool did not age on allocator calls");
    cr_assert_geq(aged.pool_expired, 1);
}

static uint64_t next_rand(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

/* About log-uniform in [lo, 64 lo): a power of two times 1 to 2. */
static size_t log_uniform(uint64_t *s, size_t lo)
{
    size_t base = lo << (next_rand(s) % 6);
    return (base + (size_t)(next_rand(s) % base)) & ~(size_t)15;
}

/* 100,000 live blocks of 256 KiB to 16 MiB, churned, under the kernel's
 * real vm.max_map_count: every allocation succeeds, every block keeps its
 * contents, the process stays under the limit (blocks past the guard are
 * cut from packs), and all of it goes when they are freed. Huge pages off:
 * each block is touched on its first and last page only. */
Test(limits, one_hundred_thousand_live_blocks_under_the_real_limit, .timeout = 600)
{
    skip_unless_plain();
    skip_unless_fillable();
    ta_option_set(TA_OPT_THP, 0);
    enum { N = 100000, ROUNDS = 20000, OTHERS = 20000 };
    static unsigned char *b[N];
    static size_t size[N];
    uint64_t s = 7;
    long limit = _ta_os_max_map_count(), worst = 0;
    /* the program's own mappings, which never merge (alternating
     * protection): they take a third of the limit, so the guard is met */
    char *others = mmap(NULL, OTHERS * 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(others, MAP_FAILED);
    for (int i = 0; i < OTHERS; i += 2)
        cr_assert_eq(mprotect(others + (size_t)i * 4096, 4096, PROT_NONE), 0);
    for (int i = 0; i < N + ROUNDS; i++) {
        int k = i < N ? i : (int)(next_rand(&s) % N);
        if (i >= N) {
            cr_assert_eq(b[k][0], (unsigned char)k, "block %d lost its first byte", k);
            cr_assert_eq(b[k][size[k] - 1], (unsigned char)~k, "block %d lost its last byte", k);
            ta_free(b[k]);
        }
        size[k] = log_uniform(&s, 256 * KiB); /* 256 KiB to 16 MiB */
        b[k] = ta_malloc(size[k]);
        cr_assert_not_null(b[k], "allocation %d (%zu bytes) failed", i, size[k]);
        b[k][0] = (unsigned char)k;
        b[k][size[k] - 1] = (unsigned char)~k;
        if (i % 10000 == 0) {
            long m = maps_lines();
            worst = m > worst ? m : worst;
        }
    }
    ta_stats_t st = stats_now();
    long at_end = maps_lines();
    cr_log_info("%" PRIu64 " blocks packed; %ld VMAs at the end, at most %ld seen, limit %ld",
                st.maxmap_fallbacks, at_end, worst, limit);
    cr_assert_lt(at_end, limit);
    cr_assert_gt(st.maxmap_fallbacks, 0, "the guard never packed a block: the test shows nothing");
    cr_assert_eq(st.large_live_count, N);
    for (int k = 0; k < N; k++) {
        cr_assert_eq(b[k][0], (unsigned char)k);
        ta_free(b[k]);
    }
    ta_trim();
    munmap(others, OTHERS * 4096);
    st = stats_now();
    cr_assert_eq(st.large_live_count, 0);
    cr_assert_lt(maps_lines(), 1000, "mappings stayed after every block was freed");
}

/* The same through the MAX_MAP_COUNT option, with every unmap failing:
 * trim returns, malloc near the limit returns (it trims first), and
 * nothing is lost once unmaps work again. */
Test(limits, failing_unmaps_near_the_option_limit_never_spin, .timeout = 30)
{
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 100);
    enum { N = 90, FREED = 60, MORE = 80 };
    void *b[N], *more[MORE];
    for (int i = 0; i < N; i++)
        cr_assert_not_null(b[i] = ta_malloc(300 * KiB));
    for (int i = 0; i < FREED; i++)
        ta_free(b[i]); /* 60 blocks into the pool, joined where adjacent */
    _ta_os_fail_every_unmap(1);
    ta_trim();
    ta_stats_t st = stats_now();
    cr_assert_geq(st.parked_count, 1);
    cr_assert_eq(st.parked_bytes, FREED * 300 * KiB);
    cr_assert_eq(st.pool_entries, 0);
    for (int i = 0; i < MORE; i++) {
        more[i] = ta_malloc(300 * KiB);
        cr_assert_not_null(more[i], "allocation %d near the limit failed", i);
        memset(more[i], i, 300 * KiB);
    }
    cr_assert_gt(stats_now().maxmap_fallbacks, 0, "the limit was never reached");
    _ta_os_fail_every_unmap(0);
    for (int i = 0; i < MORE; i++)
        ta_free(more[i]);
    for (int i = FREED; i < N; i++)
        ta_free(b[i]);
    ta_trim();
    st = stats_now();
    cr_assert_eq(st.parked_count, 0);
    cr_assert_eq(st.large_live_count, 0);
    cr_assert_eq(st.pool_entries, 0);
}

/* Near the limit, small requests fall back to slabs, which align to at
 * most 64 KiB: larger alignments must still be honoured. Before the fix,
 * 128 KiB-1 MiB alignments came back 64 KiB aligned and 2 MiB+ failed
 * after reading past the class table. */
Test(limits, aligned_requests_near_the_limit_stay_aligned)
{
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 100);
    enum { N = 150 };
    void *keep[N];
    for (int i = 0; i < N; i++) /* past the guard: the fallback is active */
        cr_assert_not_null(keep[i] = ta_malloc(300 * KiB));
    cr_assert_gt(stats_now().maxmap_fallbacks, 0);
    for (size_t align = 16; align <= 8 * MiB; align *= 2) {
        for (size_t size = 1; size <= MiB; size = size * 4 + 3) {
            void *p = NULL;
            int rc = ta_posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size);
            cr_assert_eq(rc, 0, "posix_memalign(%zu, %zu) near the limit: %d", align, size, rc);
            cr_assert_eq((uintptr_t)p % align, 0, "%p is not %zu-aligned (size %zu)", p, align,
                         size);
            memset(p, 1, size);
            ta_free(p);
            p = ta_aligned_alloc(align, size);
            cr_assert_not_null(p);
            cr_assert_eq((uintptr_t)p % align, 0);
            ta_free(p);
        }
    }
    for (int i = 0; i < N; i++)
        ta_free(keep[i]);
}

/* ---- RLIMIT_AS ---------------------------------------------------------------- */

/* About 1 GiB of 64 MiB blocks freed into the pool, then an address-space
 * limit that leaves 256 MiB beyond what is mapped: a 512 MiB block and
 * 200,000 small blocks fit only if the pool gives its room back first. */
Test(limits, enomem_gives_back_what_is_retained_and_retries, .timeout = 120)
{
    skip_unless_plain();
    ta_option_set(TA_OPT_RETAIN_BYTES, 2LL << 30);
    ta_option_set(TA_OPT_RETAIN_MS, 60000); /* the pool keeps it all */
    enum { BIG = 16, SMALL = 200000 };
    void *big[BIG];
    for (int i = 0; i < BIG; i++) {
        cr_assert_not_null(big[i] = ta_malloc(64 * MiB));
        touch_pages(big[i], 64 * MiB);
    }
    for (int i = 0; i < BIG; i++)
        ta_free(big[i]);
    cr_assert_geq(stats_now().pool_bytes, (uint64_t)BIG * 64 * MiB);
    size_t mapped = vm_size_bytes();
    cr_assert_gt(mapped, 0);
    struct rlimit lim = {mapped + 256 * MiB, RLIM_INFINITY};
    cr_assert_eq(setrlimit(RLIMIT_AS, &lim), 0);

    char *p = ta_malloc(512 * MiB);
    cr_assert_not_null(p, "malloc(512 MiB) failed with %d while the pool held 1 GiB", errno);
    memset(p, 7, 512 * MiB);
    ta_free(p);

    /* The pool holds the 512 MiB again; small blocks need segments. */
    static void *small[SMALL];
    size_t got = 0;
    for (; got < SMALL; got++)
        if ((small[got] = ta_malloc(2000)) == NULL)
            break;
        else
            memset(small[got], (int)got, 2000);
    cr_assert_eq(got, SMALL, "only %zu of %d small blocks fit", got, SMALL);
    for (size_t i = 0; i < got; i++) {
        cr_assert_eq(((unsigned char *)small[i])[1999], (unsigned char)i);
        ta_free(small[i]);
    }
    /* And the limit still holds: an impossible request fails cleanly. */
    errno = 0;
    cr_assert_null(ta_malloc(4ULL << 30));
    cr_assert_eq(errno, ENOMEM);
}
