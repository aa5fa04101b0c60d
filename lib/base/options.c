/* SPDX-License-Identifier: MIT */
/*
 * Options as one table: name, default, bounds, kind. Each is read once from
 * TENSORALLOC_<NAME> through environ (no allocation, so this runs safely
 * inside the first malloc) and can be changed through ta_option_set.
 */
#define _GNU_SOURCE
#include "base.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { KIND_SIZE, KIND_MS, KIND_BOOL, KIND_COUNT, KIND_TRISTATE /* off, on, auto */ } option_kind_t;

typedef struct {
    const char *name; /* after TENSORALLOC_ */
    long long def;
    long long min, max;
    option_kind_t kind;
} option_desc_t;

/* Defaults and the measurements behind them: docs/design.md. */
static const option_desc_t option_table[TA_OPT_COUNT_] = {
    [TA_OPT_THRESHOLD] = {"THRESHOLD", 256 << 10, 16 << 10, 1 << 20, KIND_SIZE},
    [TA_OPT_RETAIN_BYTES] = {"RETAIN_BYTES", 1LL << 30, 0, 1LL << 50, KIND_SIZE},
    [TA_OPT_RETAIN_MS] = {"RETAIN_MS", 500, 0, 3600 * 1000, KIND_MS},
    [TA_OPT_THP] = {"THP", 2, 0, 2, KIND_TRISTATE},
    [TA_OPT_STATS] = {"STATS", 0, 0, 1, KIND_BOOL},
    [TA_OPT_VERBOSE] = {"VERBOSE", 0, 0, 1, KIND_BOOL},
    [TA_OPT_MAX_MAP_COUNT] = {"MAX_MAP_COUNT", 0, 0, 1LL << 31, KIND_COUNT},
    [TA_OPT_PURGE_THREAD] = {"PURGE_THREAD", 2, 0, 2, KIND_TRISTATE},
    [TA_OPT_PRESSURE] = {"PRESSURE", 1, 0, 1, KIND_BOOL},
};

long long _ta_options[TA_OPT_COUNT_];
static atomic_int options_state; /* 0 = not read, 1 = reading, 2 = ready */

/* Parses "123", "64K", "2MiB", "1g"; returns false on anything else. */
static bool parse_value(const char *s, option_kind_t kind, long long *out)
{
    if (kind == KIND_TRISTATE) { /* off, on, or auto */
        if (strcasecmp(s, "auto") == 0 || strcmp(s, "2") == 0)
            return (*out = 2), true;
        kind = KIND_BOOL;
    }
    if (kind == KIND_BOOL) {
        static const char *const yes[] = {"1", "on", "yes", "true"};
        static const char *const no[] = {"0", "off", "no", "false"};
        for (int i = 0; i < 4; i++) {
            if (strcasecmp(s, yes[i]) == 0)
                return (*out = 1), true;
            if (strcasecmp(s, no[i]) == 0)
                return (*out = 0), true;
        }
        return false;
    }
    if (*s < '0' || *s > '9')
        return false;
    unsigned long long v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (v > (1ULL << 60))
            return false;
        v = v * 10 + (unsigned)(*s - '0');
    }
    if (kind == KIND_SIZE && *s) {
        int shift;
        switch (*s | 0x20) {
        case 'k': shift = 10; break;
        case 'm': shift = 20; break;
        case 'g': shift = 30; break;
        case 't': shift = 40; break;
        default: return false;
        }
        s++;
        if (strcasecmp(s, "ib") == 0 || strcasecmp(s, "b") == 0)
            s += strlen(s);
        if (v > (1ULL << (62 - shift)))
            return false;
        v <<= shift;
    }
    if (kind == KIND_MS && strcmp(s, "ms") == 0)
        s += 2;
    if (*s)
        return false;
    *out = (long long)v;
    return true;
}


/* The pool may hold an eighth of physical memory, between 64 MiB and
 * 64 GiB: 3 GiB on a 24 GiB machine, 64 GiB on a 512 GiB one; enough for
 * an evicted model to wait for the next load (docs/design.md). The
 * footprint bound and retention by activity (large.c) keep it from
 * holding more than the process's own peak needs, or for longer. */
static long long retain_bytes_default(void)
{
    long long ram = (long long)_ta_os_physical_memory();
    long long v = ram / 8;
    if (v < (64LL << 20))
        v = 64LL << 20;
    if (v > (64LL << 30))
        v = 64LL << 30;
    return v;
}

void _ta_options_init(void)
{
    if (atomic_load_explicit(&options_state, memory_order_acquire) == 2)
        return;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&options_state, &expected, 1)) {
        while (atomic_load_explicit(&options_state, memory_order_acquire) != 2)
            _ta_os_yield();
        return;
    }
    for (int i = 0; i < TA_OPT_COUNT_; i++)
        _ta_options[i] = option_table[i].def;
    _ta_options[TA_OPT_RETAIN_BYTES] = retain_bytes_default();
    /* VERBOSE first, so that warnings about the others can be shown. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            _ta_log_set_verbose(_ta_options[TA_OPT_VERBOSE] != 0);
        for (int i = 0; i < TA_OPT_COUNT_; i++) {
            if ((i == TA_OPT_VERBOSE) != (pass == 0))
                continue;
            char var[64] = "TENSORALLOC_";
            strncat(var, option_table[i].name, sizeof var - strlen(var) - 1);
            const char *text = _ta_os_getenv(var);
            if (text == NULL || *text == '\0')
                continue;
            long long v;
            if (parse_value(text, option_table[i].kind, &v) && v >= option_table[i].min &&
                v <= option_table[i].max)
                _ta_options[i] = v;
            else
                _ta_log(true,
                        "tensoralloc: ignoring %s=%s (expected %s in [%lld, %lld]); "
                        "keeping %lld\n",
                        var, text,
                        option_table[i].kind == KIND_SIZE   ? "a size such as 512K or 2M"
                        : option_table[i].kind == KIND_BOOL ? "0 or 1"
                        : option_table[i].kind == KIND_TRISTATE  ? "off, on or auto"
                                                            : "a number",
                        option_table[i].min, option_table[i].max, _ta_options[i]);
        }
    }
    /* Before libc has set environ (the dynamic loader's first mallocs, a
     * constructor of another preloaded library) the defaults serve, and the
     * variables are read again on a later call. */
    atomic_store_explicit(&options_state, _ta_os_environ_ready() ? 2 : 0, memory_order_release);
}

bool _ta_options_final(void)
{
    return atomic_load_explicit(&options_state, memory_order_acquire) == 2;
}

int ta_option_get(ta_option_t option, long long *value)
{
    _ta_options_init();
    if ((unsigned)option >= TA_OPT_COUNT_ || value == NULL)
        return EINVAL;
    *value = _ta_opt(option);
    return 0;
}

int ta_option_set(ta_option_t option, long long value)
{
    _ta_options_init();
    if ((unsigned)option >= TA_OPT_COUNT_ || value < option_table[option].min ||
        value > option_table[option].max)
        return EINVAL;
    __atomic_store_n(&_ta_options[option], value, __ATOMIC_RELAXED);
    if (option == TA_OPT_VERBOSE)
        _ta_log_set_verbose(value != 0);
    return 0;
}

const char *ta_option_name(ta_option_t option)
{
    return (unsigned)option < TA_OPT_COUNT_ ? option_table[option].name : NULL;
}
