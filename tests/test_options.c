/* SPDX-License-Identifier: MIT */
/* Suite "options": environment parsing, the API, and statistics output.
 * Criterion runs each test in a fresh process, so each test sets its
 * environment before the first tensoralloc call reads it. */
#define _GNU_SOURCE
#include "helpers.h"

#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <errno.h>
#include <stdlib.h>

Test(options, sizes_with_suffixes)
{
    setenv("TENSORALLOC_THRESHOLD", "512K", 1);
    setenv("TENSORALLOC_RETAIN_BYTES", "2GiB", 1);
    setenv("TENSORALLOC_RETAIN_MS", "250", 1);
    setenv("TENSORALLOC_THP", "off", 1);
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD), 512 * 1024);
    cr_assert_eq(ta_option_get(TA_OPT_RETAIN_BYTES), 2LL << 30);
    cr_assert_eq(ta_option_get(TA_OPT_RETAIN_MS), 250);
    cr_assert_eq(ta_option_get(TA_OPT_THP), 0);
}

Test(options, bad_value_warns_once_and_keeps_default, .init = cr_redirect_stderr)
{
    setenv("TENSORALLOC_THRESHOLD", "lots", 1);
    setenv("TENSORALLOC_RETAIN_MS", "-5", 1);
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD), 256 * 1024);
    cr_assert_eq(ta_option_get(TA_OPT_RETAIN_MS), 500);
    void *p = ta_malloc(10);
    ta_free(p);
    fflush(stderr);
    cr_assert_stderr_eq_str(
        "tensoralloc: ignoring TENSORALLOC_THRESHOLD=lots (expected a size such as 512K or "
        "2M in [16384, 1048576]); keeping 262144\n"
        "tensoralloc: ignoring TENSORALLOC_RETAIN_MS=-5 (expected a number in [0, "
        "3600000]); keeping 500\n");
}

Test(options, threshold_out_of_range_is_refused)
{
    setenv("TENSORALLOC_THRESHOLD", "64G", 1);
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD), 256 * 1024);
    cr_assert_eq(ta_option_set(TA_OPT_THRESHOLD, 1), EINVAL);
    cr_assert_eq(ta_option_set((ta_option_t)99, 1), EINVAL);
    cr_assert_eq(ta_option_set(TA_OPT_THRESHOLD, 64 * 1024), 0);
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD), 64 * 1024);
    cr_assert_str_eq(ta_option_name(TA_OPT_RETAIN_BYTES), "RETAIN_BYTES");
    cr_assert_null(ta_option_name((ta_option_t)99));
}

Test(options, threshold_moves_blocks_between_paths)
{
    ta_option_set(TA_OPT_THRESHOLD, 64 * 1024);
    ta_stats_t a = stats_now();
    void *p = ta_malloc(100 * 1024);
    cr_assert_eq(stats_now().large_live_count, a.large_live_count + 1);
    ta_free(p);
    ta_option_set(TA_OPT_THRESHOLD, 512 * 1024);
    p = ta_malloc(100 * 1024);
    cr_assert_eq(stats_now().large_live_count, a.large_live_count);
    ta_free(p);
}

Test(options, stats_print_text_and_json)
{
    void *p = ta_malloc(5 * MiB);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_eq(ta_stats_print(f, TA_STATS_JSON), 0);
    fclose(f);
    cr_assert(strstr(buf, "\"large_live_count\": 1"), "%s", buf);
    cr_assert(strstr(buf, "\"opt_threshold\": 262144"), "%s", buf);
    cr_assert_eq(buf[0], '{');
    cr_assert_eq(buf[len - 2], '}');
    free(buf);
    f = open_memstream(&buf, &len);
    cr_assert_eq(ta_stats_print(f, TA_STATS_TEXT), 0);
    fclose(f);
    cr_assert(strstr(buf, "large_mapped_bytes"), "%s", buf);
    free(buf);
    cr_assert_eq(ta_stats_print(NULL, TA_STATS_TEXT), EINVAL);
    cr_assert_eq(ta_stats_print(stdout, (ta_stats_format_t)7), EINVAL);
    ta_free(p);
}

Test(options, stats_struct_is_versioned)
{
    ta_stats_t st;
    memset(&st, 0xff, sizeof st);
    cr_assert_eq(ta_stats_get(NULL), EINVAL);
    st.size = 4;
    cr_assert_eq(ta_stats_get(&st), EINVAL);
    /* an older caller that knows only the first fields */
    st.size = offsetof(ta_stats_t, large_peak_bytes);
    cr_assert_eq(ta_stats_get(&st), 0);
    cr_assert_eq(st.version, TA_STATS_VERSION);
    cr_assert_eq(st.large_peak_bytes, ~0ULL, "fields past size are untouched");
}

Test(options, stats_at_exit, .init = cr_redirect_stderr)
{
    /* the destructor runs when this test's process exits; here we check
     * the option is read */
    setenv("TENSORALLOC_STATS", "1", 1);
    cr_assert_eq(ta_option_get(TA_OPT_STATS), 1);
}
