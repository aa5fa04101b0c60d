/* SPDX-License-Identifier: MIT */
/* Suite "options": environment parsing, the API, and statistics output.
 * Criterion runs each test in a fresh process, so each test sets its
 * environment before the first tensoralloc call reads it. */
#define _GNU_SOURCE
#include "helpers.h"

#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

/* An option's value in force (ta_option_get's convention: code, out value). */
static long long opt(ta_option_t o)
{
    long long v = -1;
    cr_assert_eq(ta_option_get(o, &v), 0, "option %d", (int)o);
    return v;
}

Test(options, get_follows_the_error_convention)
{
    long long v = 42;
    cr_assert_eq(ta_option_get(TA_OPT_COUNT_, &v), EINVAL);
    cr_assert_eq(v, 42, "untouched on failure");
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD, NULL), EINVAL);
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD, &v), 0);
    cr_assert_eq(v, 256 * 1024);
}

Test(options, sizes_with_suffixes)
{
    setenv("TENSORALLOC_THRESHOLD", "512K", 1);
    setenv("TENSORALLOC_RETAIN_BYTES", "2GiB", 1);
    setenv("TENSORALLOC_RETAIN_MS", "250", 1);
    setenv("TENSORALLOC_THP", "off", 1);
    cr_assert_eq(opt(TA_OPT_THRESHOLD), 512 * 1024);
    cr_assert_eq(opt(TA_OPT_RETAIN_BYTES), 2LL << 30);
    cr_assert_eq(opt(TA_OPT_RETAIN_MS), 250);
    cr_assert_eq(opt(TA_OPT_THP), 0);
}

Test(options, bad_value_warns_once_and_keeps_default, .init = cr_redirect_stderr)
{
    setenv("TENSORALLOC_THRESHOLD", "lots", 1);
    setenv("TENSORALLOC_RETAIN_MS", "-5", 1);
    cr_assert_eq(opt(TA_OPT_THRESHOLD), 256 * 1024);
    cr_assert_eq(opt(TA_OPT_RETAIN_MS), 500);
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
    cr_assert_eq(opt(TA_OPT_THRESHOLD), 256 * 1024);
    cr_assert_eq(ta_option_set(TA_OPT_THRESHOLD, 1), EINVAL);
    cr_assert_eq(ta_option_set((ta_option_t)99, 1), EINVAL);
    cr_assert_eq(ta_option_set(TA_OPT_THRESHOLD, 64 * 1024), 0);
    cr_assert_eq(opt(TA_OPT_THRESHOLD), 64 * 1024);
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

/* The report is printed by a destructor at exit: a child process exits
 * with stderr on a pipe, and the report it wrote is checked here. */
Test(options, stats_at_exit)
{
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        setenv("TENSORALLOC_STATS", "1", 1);
        void *p = ta_malloc(3 * MiB); /* still live at exit: one large block */
        (void)p;
        exit(0); /* runs the destructors */
    }
    close(fds[1]);
    char buf[8192];
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fds[0], buf + len, sizeof buf - 1 - len)) > 0)
        len += (size_t)n;
    buf[len] = '\0';
    close(fds[0]);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    cr_assert(strstr(buf, "large_live_count"), "no report at exit: \"%s\"", buf);
    cr_assert(strstr(buf, "opt_threshold"), "%s", buf);
    const char *live = strstr(buf, "large_live_count");
    cr_assert(live && strpbrk(live, "0123456789") && *strpbrk(live, "0123456789") == '1',
              "the live block is not in the report: %s", buf);
}

/* The message names the value actually kept: RETAIN_BYTES defaults to an
 * eighth of RAM, not to the table's 1 GiB. */
Test(options, bad_value_message_names_the_value_in_force, .init = cr_redirect_stderr)
{
    setenv("TENSORALLOC_RETAIN_BYTES", "much", 1);
    long long kept = opt(TA_OPT_RETAIN_BYTES);
    fflush(stderr);
    char want[256];
    snprintf(want, sizeof want,
             "tensoralloc: ignoring TENSORALLOC_RETAIN_BYTES=much (expected a size such as 512K "
             "or 2M in [0, 1125899906842624]); keeping %lld\n",
             kept);
    cr_assert_stderr_eq_str(want);
}

/* A first allocation made before environ exists (a constructor of another
 * preloaded library) runs on the defaults; the variables are read as soon
 * as they can be. Before the fix they were never read. */
extern char **environ;
Test(options, read_once_environ_exists)
{
    setenv("TENSORALLOC_THRESHOLD", "64K", 1);
    char **saved = environ;
    environ = NULL;
    void *early = ta_malloc(100 * KiB); /* defaults: 256 KiB threshold, small */
    environ = saved;
    /* Only allocations in between, as in a preloaded program: statistics
     * and option calls read the options themselves. A large block has
     * exactly its page-rounded size; the 100 KiB slab class is 112 KiB. */
    void *p = ta_malloc(100 * KiB);
    size_t early_usable = ta_usable_size(early), usable = ta_usable_size(p);
    cr_assert_neq(early_usable, 100 * KiB, "the early block went by the defaults");
    cr_assert_eq(usable, 100 * KiB, "the threshold from the environment is not in force");
    cr_assert_eq(opt(TA_OPT_THRESHOLD), 64 * KiB);
    ta_free(p);
    ta_free(early);
}
