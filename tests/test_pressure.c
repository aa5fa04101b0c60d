/* SPDX-License-Identifier: MIT */
/* Suite "pressure": the response to memory pressure (lib/core/pressure.c)
 * and the purge thread's watch of the kernel's signals. The real signals
 * in a real memory cgroup are tests/pressure_cgroup.c's. */
#define _GNU_SOURCE
#include "helpers.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int calls;
    uint64_t pool_at_call, dirty_at_call, released;
    uint32_t sources;
    int listen_rc, signal_rc;
    char figure[256];
} seen_t;

static void record(const ta_pressure_event_t *ev, void *arg)
{
    seen_t *s = arg;
    ta_stats_t st = stats_now();
    s->calls++;
    s->pool_at_call = st.pool_bytes;
    s->dirty_at_call = st.small_dirty_bytes;
    s->sources = ev->sources;
    s->released = ev->released_bytes;
    snprintf(s->figure, sizeof s->figure, "%s", ev->figure);
    s->listen_rc = ta_pressure_listen(record, arg); /* from inside: refused */
    s->signal_rc = ta_pressure_signal();
}

Test(pressure, the_allocator_gives_back_its_pool_before_the_listeners_hear)
{
    ta_option_set(TA_OPT_RETAIN_MS, 600000);
    ta_option_set(TA_OPT_PURGE_THREAD, 0);
    void *p = ta_malloc(64 * MiB);
    cr_assert_not_null(p);
    memset(p, 1, 64 * MiB);
    ta_free(p);
    cr_assert_geq(stats_now().pool_bytes, 64 * MiB, "the pool keeps the freed block");

    seen_t s = {0};
    cr_assert_eq(ta_pressure_listen(record, &s), 0);
    uint64_t events = stats_now().pressure_events;
    cr_assert_eq(ta_pressure_signal(), 0);
    cr_assert_eq(s.calls, 1, "the listener heard %d events, not 1", s.calls);
    cr_assert_eq(s.pool_at_call, 0, "%" PRIu64 " bytes still pooled when the listener heard",
                 s.pool_at_call);
    cr_assert_eq(s.sources, TA_PRESSURE_CALLER);
    cr_assert_geq(s.released, 64 * MiB, "released %" PRIu64, s.released);
    cr_assert(strstr(s.figure, "machine") != NULL, "figure: %s", s.figure);
    cr_assert_eq(s.listen_rc, EDEADLK, "listen from a listener: %d", s.listen_rc);
    cr_assert_eq(s.signal_rc, EDEADLK, "signal from a listener: %d", s.signal_rc);
    ta_stats_t st = stats_now();
    cr_assert_eq(st.pressure_events, events + 1);
    cr_assert_geq(st.pressure_released_bytes, 64 * MiB);

    cr_assert_eq(ta_pressure_unlisten(record, &s), 0);
    cr_assert_eq(ta_pressure_unlisten(record, &s), ENOENT);
    cr_assert_eq(ta_pressure_signal(), 0);
    cr_assert_eq(s.calls, 1, "a removed listener was called");
}

static void nothing(const ta_pressure_event_t *ev, void *arg)
{
    (void)ev;
    (void)arg;
}

Test(pressure, listen_checks_its_arguments)
{
    static int args[17];
    cr_assert_eq(ta_pressure_listen(NULL, NULL), EINVAL);
    cr_assert_eq(ta_pressure_listen(nothing, &args[0]), 0);
    cr_assert_eq(ta_pressure_listen(nothing, &args[0]), EEXIST);
    for (int i = 1; i < 16; i++)
        cr_assert_eq(ta_pressure_listen(nothing, &args[i]), 0);
    cr_assert_eq(ta_pressure_listen(nothing, &args[16]), ENOSPC);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(ta_pressure_unlisten(nothing, &args[i]), 0);
    cr_assert_eq(ta_pressure_unlisten(nothing, &args[16]), ENOENT);
}

/* A thread frees its small blocks and goes idle: its free pages wait
 * RETAIN_MS (here ten minutes) in its heap. Pressure sends them back now. */
static pthread_barrier_t freed, checked;

static void *idle_owner(void *arg)
{
    enum { N = 16384 };
    static void *blocks[N];
    for (int i = 0; i < N; i++)
        memset(blocks[i] = ta_malloc(256), 7, 256);
    for (int i = 0; i < N; i++)
        ta_free(blocks[i]);
    pthread_barrier_wait(&freed);
    pthread_barrier_wait(&checked);
    return arg;
}

Test(pressure, free_slab_pages_of_an_idle_thread_go_back_at_once)
{
    ta_option_set(TA_OPT_RETAIN_MS, 600000);
    ta_option_set(TA_OPT_PURGE_THREAD, 0);
    pthread_barrier_init(&freed, NULL, 2);
    pthread_barrier_init(&checked, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, idle_owner, NULL);
    pthread_barrier_wait(&freed);
    uint64_t before = stats_now().small_dirty_bytes;
    cr_assert_geq(before, 2 * MiB, "only %" PRIu64 " bytes of free pages wait", before);
    seen_t s = {0};
    ta_pressure_listen(record, &s);
    ta_pressure_signal();
    uint64_t after = stats_now().small_dirty_bytes;
    cr_assert_lt(after, 256 * KiB, "%" PRIu64 " of %" PRIu64 " bytes of free pages still wait",
                 after, before);
    cr_assert_lt(s.dirty_at_call, 256 * KiB, "the listener heard before the pages went back");
    cr_assert_geq(s.released, before - 256 * KiB);
    ta_pressure_unlisten(record, &s);
    pthread_barrier_wait(&checked);
    pthread_join(t, NULL);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

Test(pressure, the_purge_thread_watches_the_kernel_without_spending_cpu)
{
    if (access("/proc/pressure/memory", R_OK) != 0) {
        cr_skip_test("no /proc/pressure/memory (a kernel without PSI): nothing to watch");
        return;
    }
    ta_option_set(TA_OPT_PURGE_THREAD, 1);
    ta_free(ta_malloc(1 * MiB)); /* an allocation starts the purge thread */
    uint64_t sources = 0;
    for (int i = 0; i < 200 && !(sources & TA_PRESSURE_MACHINE); i++) {
        usleep(10000);
        sources = stats_now().pressure_sources;
    }
    cr_assert(sources & TA_PRESSURE_MACHINE,
              "the purge thread watches %" PRIu64 ", not the "
              "machine's PSI",
              sources);
    double cpu = cpu_seconds();
    usleep(1000000);
    cpu = cpu_seconds() - cpu;
    cr_assert_lt(cpu, 0.02, "an idle second cost %.3f s of CPU", cpu);
    cr_log_info("watching sources %" PRIu64 "; an idle second cost %.4f s of CPU", sources, cpu);
}

Test(pressure, the_option_turns_the_watch_off)
{
    ta_option_set(TA_OPT_PRESSURE, 0);
    ta_option_set(TA_OPT_PURGE_THREAD, 1);
    ta_free(ta_malloc(1 * MiB));
    usleep(200000);
    cr_assert_eq(stats_now().pressure_sources, 0);
    /* the purge thread still works: a pooled block expires */
    ta_option_set(TA_OPT_RETAIN_MS, 50);
    void *p = ta_malloc(8 * MiB);
    memset(p, 1, 8 * MiB);
    ta_free(p);
    for (int i = 0; i < 200 && stats_now().pool_bytes; i++)
        usleep(10000);
    cr_assert_eq(stats_now().pool_bytes, 0, "the pool kept its block without PRESSURE");
}
