/* SPDX-License-Identifier: MIT */
/*
 * Statistics: gathers the paths' figures into ta_stats_t, maps them onto
 * glibc's struct mallinfo2, and prints them as text or JSON. The fields
 * are one X-macro list in tensoralloc.h (the mimalloc way) that makes the
 * struct, both printers and ta_stats_field's name table.
 */
#define _GNU_SOURCE
#include "large.h"
#include "pressure.h"
#include "slab.h"
#include "stats.h"

#include <errno.h>
#include <string.h>

static const struct {
    const char *name, *description;
    size_t offset;
} fields[] = {
#define X(f, d) {#f, d, offsetof(ta_stats_t, f)},
    TA_STATS_FIELDS(X)
#undef X
};

int ta_stats_field(const ta_stats_t *stats, size_t i, const char **name, const char **description,
                   uint64_t *value)
{
    if (i >= sizeof fields / sizeof fields[0])
        return EINVAL;
    if (name)
        *name = fields[i].name;
    if (description)
        *description = fields[i].description;
    if (value)
        *value = stats && stats->size >= fields[i].offset + sizeof(uint64_t)
                     ? *(const uint64_t *)((const char *)stats + fields[i].offset)
                     : 0;
    return 0;
}

static void stats_collect(ta_stats_t *st)
{
    memset(st, 0, sizeof *st);
    st->size = sizeof *st;
    st->version = TA_STATS_VERSION;
    _ta_large_stats(st);
    _ta_small_stats(st);
    _ta_pressure_stats(st);
    _ta_os_counters_t os;
    _ta_os_counters(&os);
    st->os_map_calls = os.map;
    st->os_unmap_calls = os.unmap;
    st->os_remap_calls = os.remap;
    st->os_madvise_calls = os.madvise;
    st->os_map_failures = os.map_failures;
    st->os_unmap_failures = os.unmap_failures;
    st->os_advise_failures = os.advise_failures;
    st->opt_threshold = (uint64_t)_ta_opt(TA_OPT_THRESHOLD);
    st->opt_retain_bytes = (uint64_t)_ta_opt(TA_OPT_RETAIN_BYTES);
    st->opt_retain_ms = (uint64_t)_ta_opt(TA_OPT_RETAIN_MS);
    st->opt_thp = (uint64_t)_ta_opt(TA_OPT_THP);
    st->opt_verbose = (uint64_t)_ta_opt(TA_OPT_VERBOSE);
}

int ta_stats_get(ta_stats_t *stats)
{
    if (stats == NULL || stats->size < offsetof(ta_stats_t, large_live_bytes))
        return EINVAL;
    _ta_options_init();
    ta_stats_t all;
    stats_collect(&all);
    /* A caller built against an older, smaller struct gets its prefix. */
    size_t n = stats->size < sizeof all ? stats->size : sizeof all;
    size_t caller_size = stats->size;
    memcpy(stats, &all, n);
    stats->size = caller_size;
    return 0;
}

struct mallinfo2 ta_mallinfo2(void)
{
    ta_stats_t st;
    _ta_options_init();
    stats_collect(&st);
    struct mallinfo2 mi;
    memset(&mi, 0, sizeof mi);
    mi.arena = st.small_committed_bytes;
    mi.ordblks = st.small_spans;
    mi.hblks = st.large_live_count;
    mi.hblkhd = st.large_mapped_bytes;
    mi.usmblks = st.large_peak_bytes + st.small_peak_bytes;
    mi.uordblks = st.small_live_bytes;
    mi.fordblks = st.small_committed_bytes > st.small_live_bytes
                      ? st.small_committed_bytes - st.small_live_bytes
                      : 0;
    mi.keepcost = st.pool_bytes;
    return mi;
}

int ta_stats_print(FILE *out, ta_stats_format_t format)
{
    if (out == NULL || (format != TA_STATS_TEXT && format != TA_STATS_JSON))
        return EINVAL;
    ta_stats_t st;
    _ta_options_init();
    stats_collect(&st);
    size_t rss = _ta_os_rss();
    int rc;
    if (format == TA_STATS_JSON) {
        rc = fprintf(out, "{\"version\": %u, \"tensoralloc\": \"%s\", \"rss_bytes\": %zu",
                     st.version, TA_VERSION_STRING, rss);
#define X(f, d)                                                                                    \
    if (rc >= 0)                                                                                   \
        rc = fprintf(out, ", \"" #f "\": %llu", (unsigned long long)st.f);
        TA_STATS_FIELDS(X)
#undef X
        if (rc >= 0)
            rc = fprintf(out, "}\n");
    } else {
        rc = fprintf(out, "tensoralloc %s statistics (version %u)\n  %-22s %zu\n",
                     TA_VERSION_STRING, st.version, "rss_bytes", rss);
#define X(f, d)                                                                                    \
    if (rc >= 0)                                                                                   \
        rc = fprintf(out, "  %-22s %llu\n", #f, (unsigned long long)st.f);
        TA_STATS_FIELDS(X)
#undef X
    }
    if (rc >= 0)
        rc = fflush(out);
    return rc < 0 ? EIO : 0;
}

/* The exit report (option STATS), called by the front door's destructor
 * (alloc.c). */
void _ta_stats_exit_report(void)
{
    if (_ta_opt(TA_OPT_STATS))
        ta_stats_print(stderr, TA_STATS_TEXT);
}
