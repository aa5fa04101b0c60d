/* SPDX-License-Identifier: MIT */
/* Suite "faults": injected map/remap failures and the max_map_count guard. */
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/time.h>

Test(faults, failed_large_map_gives_enomem_and_no_leak)
{
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    ta_stats_t before = stats_now();
    _ta_os_fail_every_map(1);
    errno = 0;
    void *none = ta_malloc(8 * MiB);
    int err = errno;
    _ta_os_fail_every_map(0);
    cr_assert_null(none);
    cr_assert_eq(err, ENOMEM);
    ta_stats_t after = stats_now();
    cr_assert_eq(after.large_live_count, before.large_live_count);
    cr_assert_eq(after.large_mapped_bytes, before.large_mapped_bytes);
    cr_assert_eq(after.os_map_failures, before.os_map_failures + 2,
                 "tried, gave back, tried again");
    /* the fault has passed: allocation works again */
    void *p = ta_malloc(8 * MiB);
    cr_assert_not_null(p);
    ta_free(p);
}

/* One refused map is absorbed: the allocation gives back what is retained
 * and tries once more. */
Test(faults, one_failed_map_is_retried)
{
    ta_stats_t before = stats_now();
    _ta_os_fail_nth_map(1);
    void *p = ta_malloc(8 * MiB);
    cr_assert_not_null(p);
    cr_assert_eq(stats_now().os_map_failures, before.os_map_failures + 1);
    ta_free(p);
}

Test(faults, failed_segment_map_gives_enomem)
{
    /* Fill the first segment's pages so the next class needs a new span
     * somewhere; with every map failing, no new segment can be had. */
    void *keep = ta_malloc(64); /* heap and first segment exist now */
    size_t n = 0;
    void *blocks[200];
    ta_option_set(TA_OPT_THRESHOLD, 1 << 20);
    _ta_os_fail_every_map(1);
    errno = 0;
    void *p;
    while (n < 200 && (p = ta_malloc(900 * KiB)) != NULL)
        blocks[n++] = p;
    int err = errno;
    _ta_os_fail_every_map(0);
    cr_assert_lt(n, 200, "the injected failure never surfaced");
    cr_assert_eq(err, ENOMEM);
    while (n)
        ta_free(blocks[--n]);
    cr_assert_not_null(p = ta_malloc(900 * KiB), "allocation works once the fault passed");
    ta_free(p);
    ta_free(keep);
}

/* realloc of a large block when the kernel refuses both the remap and
 * every new mapping (the retry after giving back the pool included): NULL
 * with ENOMEM, and the old block intact and still usable. */
Test(faults, failed_realloc_keeps_the_block)
{
    unsigned char *p = ta_malloc(4 * MiB);
    pattern_fill(p, 4 * MiB, 3);
    _ta_os_counters_t before;
    _ta_os_counters(&before);
    _ta_os_fail_nth_remap(1);
    _ta_os_fail_every_map(1);
    errno = 0;
    unsigned char *q = ta_realloc(p, 64 * MiB);
    int err = errno;
    _ta_os_fail_every_map(0);
    _ta_os_fail_nth_remap(0);
    _ta_os_counters_t after;
    _ta_os_counters(&after);
    cr_assert_gt(after.injected, before.injected + 1, "the remap and a map must have failed");
    cr_assert_null(q, "realloc succeeded although the kernel refused every way");
    cr_assert_eq(err, ENOMEM);
    cr_assert(pattern_ok(p, 4 * MiB, 3));
    cr_assert_eq(ta_usable_size(p), 4 * MiB);
    q = ta_realloc(p, 64 * MiB); /* the fault has passed */
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

/* At the guard, large blocks are cut from packs (mappings shared by many
 * blocks): thousands of them cost a handful of VMAs, keep their contents,
 * and the packs go once their blocks are freed. The limit is set just
 * above what the process has (the guard counts the kernel's VMAs). */
Test(faults, map_count_guard_packs_large_blocks)
{
    /* The limit sits just above the VMAs the process has: the kernel merges
     * neighbouring anonymous mappings (6.x puts 3000 such blocks in one
     * VMA), so a limit with room to spare might never be reached. */
    long base = maps_lines();
    ta_option_set(TA_OPT_MAX_MAP_COUNT, base + 4);
    enum { N = 3000 };
    static void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = ta_malloc(300 * KiB); /* large by size */
        cr_assert_not_null(p[i], "allocation %d failed near the map limit", i);
        memset(p[i], i & 0xff, 300 * KiB);
    }
    ta_stats_t st = stats_now();
    long at = maps_lines();
    cr_assert_gt(st.maxmap_fallbacks, 0, "no block was packed");
    cr_log_info("%" PRIu64 " of %d blocks packed; %ld VMAs (%ld before)", st.maxmap_fallbacks, N,
                at, base);
    bool vmas_meaningful = !under_valgrind(); /* valgrind keeps mappings of its own */
    if (vmas_meaningful)
        cr_assert_leq(at, base + 50 + 16, "%ld VMAs for %d blocks (%ld before)", at, N, base);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(((unsigned char *)p[i])[300 * KiB - 1], (unsigned char)(i & 0xff));
        ta_free(p[i]);
    }
    ta_trim();
    cr_assert_eq(stats_now().large_live_count, 0);
    if (vmas_meaningful)
        cr_assert_leq(maps_lines(), base + 8, "the packs stayed after their blocks went");
    else
        cr_log_info("under valgrind: VMA counts not checked");
}

Test(faults, map_limit_reports_the_override)
{
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 1234);
    cr_assert_eq(stats_now().map_limit, 1234);
    ta_option_set(TA_OPT_MAX_MAP_COUNT, 0);
    cr_assert_gt(stats_now().map_limit, 1000);
}

/* A mixed workload of both paths, reallocs across sizes and trims; every
 * failed allocation must be NULL with ENOMEM. Returns how many failed. */
static int mixed_workload(void)
{
    void *keep[48] = {0};
    int failed = 0;
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 48; i++) {
            size_t n = (i % 3 == 0) ? (size_t)(i + 1) * 300 * KiB : (size_t)(i * 997 % 90000) + 1;
            errno = 0;
            void *p = ta_malloc(n);
            if (p == NULL) {
                cr_assert_eq(errno, ENOMEM, "malloc(%zu) failed with errno %d", n, errno);
                failed++;
            } else {
                memset(p, 0x5A, n < 4096 ? n : 4096);
            }
            ta_free(keep[i]);
            keep[i] = p;
        }
        for (int i = 0; i < 48; i += 5) {
            if (!keep[i])
                continue;
            size_t grow = ta_usable_size(keep[i]) * 3 + 2 * MiB;
            errno = 0;
            void *q = ta_realloc(keep[i], grow);
            if (q == NULL) {
                cr_assert_eq(errno, ENOMEM);
                failed++;
            } else {
                keep[i] = q;
            }
        }
        ta_trim();
    }
    for (int i = 0; i < 48; i++)
        ta_free(keep[i]);
    return failed;
}

static void check_clean(uint64_t baseline_mappings)
{
    ta_trim();
    ta_stats_t st = stats_now();
    cr_assert_eq(st.large_live_count, 0);
    cr_assert_eq(st.large_live_bytes, 0);
    cr_assert_eq(st.pool_bytes, 0, "a retained or failed-unmap range was not released by trim");
    cr_assert_eq(st.mappings, baseline_mappings, "mappings %llu, baseline %llu",
                 (unsigned long long)st.mappings, (unsigned long long)baseline_mappings);
}

/* Runs the workload with the nth call of one kind failing, for n = 1..60.
 * Returns how many calls of that kind (per calls_of) a clean run makes, so
 * that a test can check that the sweep reached them. */
/* One call counter of ta_stats_t, named by its offset. */
static uint64_t counter_now(size_t offset)
{
    ta_stats_t st = stats_now();
    uint64_t v;
    memcpy(&v, (const char *)&st + offset, sizeof v);
    return v;
}

static uint64_t fault_sweep(void (*arm)(long), const char *kind, size_t calls_offset)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000); /* pool entries live until trim */
    uint64_t before = counter_now(calls_offset);
    mixed_workload();
    uint64_t clean_calls = counter_now(calls_offset) - before;
    ta_trim();
    uint64_t baseline = stats_now().mappings;
    int total_failed = 0;
    for (long nth = 1; nth <= 60; nth++) {
        arm(nth);
        total_failed += mixed_workload();
        arm(0);
        check_clean(baseline);
        void *after = ta_malloc(5 * MiB);
        cr_assert_not_null(after, "%s fault %ld: allocation after the fault", kind, nth);
        ta_free(after);
    }
    cr_log_info("%s faults: %d allocations failed cleanly", kind, total_failed);
    return clean_calls;
}

/* The failure points the workload reaches fired: one failure per point, up
 * to the calls a clean run makes. A fault changes the path after it (and
 * the pool's state the next run), so runs after one may make fewer calls:
 * three points in four must have fired. */
static void assert_sweep_reached(uint64_t failures, uint64_t clean_calls, const char *kind)
{
    uint64_t points = clean_calls < 60 ? clean_calls : 60;
    cr_log_info("%s: a clean run makes %" PRIu64 " calls; %" PRIu64 " failures injected", kind,
                clean_calls, failures);
    cr_assert_gt(clean_calls, 10, "the workload makes %" PRIu64 " %s calls: too few to sweep",
                 clean_calls, kind);
    cr_assert_geq(failures * 4, points * 3, "%s: %" PRIu64 " failures for %" PRIu64 " points", kind,
                  failures, points);
}

Test(faults, every_map_failure_point, .timeout = 120)
{
    uint64_t calls = fault_sweep(_ta_os_fail_nth_map, "map", offsetof(ta_stats_t, os_map_calls));
    assert_sweep_reached(stats_now().os_map_failures, calls, "map");
}

Test(faults, every_remap_failure_point, .timeout = 120)
{
    _ta_os_counters_t before, after;
    _ta_os_counters(&before);
    uint64_t calls =
        fault_sweep(_ta_os_fail_nth_remap, "remap", offsetof(ta_stats_t, os_remap_calls));
    _ta_os_counters(&after);
    assert_sweep_reached(after.injected - before.injected, calls, "remap");
}

Test(faults, every_unmap_failure_point, .timeout = 120)
{
    uint64_t calls =
        fault_sweep(_ta_os_fail_nth_unmap, "unmap", offsetof(ta_stats_t, os_unmap_calls));
    assert_sweep_reached(stats_now().os_unmap_failures, calls, "unmap");
}

Test(faults, every_advise_failure_point, .timeout = 120)
{
    ta_option_set(TA_OPT_THP, 1); /* every big mapping is advised */
    uint64_t calls =
        fault_sweep(_ta_os_fail_nth_advise, "advise", offsetof(ta_stats_t, os_madvise_calls));
    assert_sweep_reached(stats_now().os_advise_failures, calls, "advise");
}

/* The real thing: the kernel refuses memory under an address-space limit. */
Test(faults, address_space_limit_gives_enomem_then_recovers, .timeout = 120)
{
    struct rlimit old;
    getrlimit(RLIMIT_AS, &old);
    struct rlimit lim = {vm_size_bytes() + 600 * MiB, old.rlim_max};
    cr_assert_eq(setrlimit(RLIMIT_AS, &lim), 0);
    ta_option_set(TA_OPT_RETAIN_BYTES, 0);
    static void *big[64], *small[200000];
    int nb = 0, ns = 0;
    errno = 0;
    while (nb < 64 && (big[nb] = ta_malloc(32 * MiB)) != NULL)
        nb++;
    cr_assert_lt(nb, 64, "the limit never bit");
    cr_assert_eq(errno, ENOMEM);
    errno = 0;
    while (ns < 200000 && (small[ns] = ta_malloc(4000)) != NULL)
        ns++;
    cr_assert_lt(ns, 200000, "small allocations never hit the limit");
    cr_assert_eq(errno, ENOMEM);
    for (int i = 0; i < nb; i++)
        ta_free(big[i]);
    for (int i = 0; i < ns; i++)
        ta_free(small[i]);
    ta_trim();
    void *again = ta_malloc(100 * MiB);
    cr_assert_not_null(again, "allocation works again once memory was freed");
    memset(again, 1, 100 * MiB);
    ta_free(again);
    setrlimit(RLIMIT_AS, &old);
}

/* A run (8 MiB for a block under 2 MiB, lib/core/large.c) the address
 * space has no room for: the block is mapped alone, not refused. */
Test(faults, a_run_refused_by_the_address_space_limit_maps_the_block_alone)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000);
    void *big = ta_malloc(320 * MiB); /* room in the footprint bound for runs */
    cr_assert_not_null(big);
    struct rlimit old;
    getrlimit(RLIMIT_AS, &old);
    struct rlimit lim = {vm_size_bytes() + 4 * MiB, old.rlim_max};
    cr_assert_eq(setrlimit(RLIMIT_AS, &lim), 0);
    errno = 0;
    unsigned char *p = ta_malloc(300 << 10);
    int saved = errno;
    setrlimit(RLIMIT_AS, &old);
    cr_assert_not_null(p, "a 300 KiB block was refused (errno %d) with 4 MiB of room", saved);
    memset(p, 1, 300 << 10);
    ta_free(p);
    ta_free(big);
}

/* The OS contract (lib/os/os.h): a call never changes errno, also when the
 * C library under it fails or is interrupted. A failed thread start (no
 * address space left for its stack) and an interrupted sleep both set
 * errno inside the C library. */
static void *returns_at_once(void *arg)
{
    return arg;
}

static void on_alarm(int sig)
{
    (void)sig;
}

Test(faults, os_sleep_keeps_errno_when_interrupted)
{
    struct sigaction sa = {.sa_handler = on_alarm};
    cr_assert_eq(sigaction(SIGALRM, &sa, NULL), 0);
    struct itimerval it = {.it_value = {0, 20000}};
    cr_assert_eq(setitimer(ITIMER_REAL, &it, NULL), 0);
    errno = 1234;
    _ta_os_sleep_ms(2000); /* cut short by the alarm: nanosleep sets EINTR */
    cr_assert_eq(errno, 1234, "_ta_os_sleep_ms changed errno to %d", errno);
}

Test(faults, os_thread_start_keeps_errno_when_it_fails)
{
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("AddressSanitizer needs address space of its own in the child whose "
                 "address space this test takes away");
#endif
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* No room for a thread's stack: pthread_create fails inside mmap. */
        struct rlimit rl = {.rlim_cur = 0, .rlim_max = RLIM_INFINITY};
        if (setrlimit(RLIMIT_AS, &rl) != 0)
            _exit(3);
        errno = 1234;
        int rc = _ta_os_background_thread(returns_at_once, (size_t)128 << 10);
        _exit(rc == 0 ? 4 : errno == 1234 ? 0 : 5);
    }
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status), "the child died");
    cr_assert_neq(WEXITSTATUS(status), 4, "the thread started with no address space left");
    cr_assert_eq(WEXITSTATUS(status), 0, "_ta_os_background_thread changed errno (child %d)",
                 WEXITSTATUS(status));
}
