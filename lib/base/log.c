/* SPDX-License-Identifier: MIT */
/*
 * The log and the fatal path: messages to stderr without allocating (safe
 * inside malloc), and the abort on corrupt metadata or a bad pointer.
 */
#include "base.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_bool verbose;

void _ta_log_set_verbose(bool on)
{
    atomic_store_explicit(&verbose, on, memory_order_relaxed);
}

void _ta_log(bool force, const char *fmt, ...)
{
    if (!force && !atomic_load_explicit(&verbose, memory_order_relaxed))
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
