/* SPDX-License-Identifier: MIT */
/*
 * The log and the fatal path: messages to stderr without allocating (safe
 * inside malloc), and the abort on corrupt metadata or a bad pointer.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void _ta_log(bool force, const char *fmt, ...)
{
    if (!force && !_ta_opt(TA_OPT_VERBOSE))
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0)
        _ta_os_write_stderr(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

void _ta_fatal(const char *call, const void *addr, const char *what)
{
    _ta_log(true, "tensoralloc: %s(): %s: %p\n", call, what, addr);
    abort();
}
