/* SPDX-License-Identifier: MIT */
/*
 * The base layer, shared by every layer above the OS: the log and the
 * fatal path (log.c, which calls only the OS layer), the options (options.c:
 * the log and the OS layer), the spin-then-yield lock (lock.c) and a few
 * macros. The way in to lib/base/ from above; list.h is its other header.
 */
#ifndef TA_BASE_H
#define TA_BASE_H

#include "os/os.h"
#include "tensoralloc.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TA_HIDDEN __attribute__((visibility("hidden")))
#define TA_LIKELY(x) __builtin_expect(!!(x), 1)
#define TA_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* The preload build must use initial-exec TLS (glibc manual, "Replacing
 * malloc"); a dlopen-able build must not, or dlopen fails with "cannot
 * allocate memory in static TLS block" (jemalloc #937). */
#ifdef TA_PRELOAD
#define TA_TLS __thread __attribute__((tls_model("initial-exec")))
#else
#define TA_TLS __thread
#endif

/* ---- fatal errors (log.c): metadata corruption and bad pointers stop the process */
__attribute__((noreturn, cold)) void _ta_fatal(const char *call, const void *addr,
                                               const char *what);
#define TA_CHECK(cond, call, addr, what)                                                           \
    do {                                                                                           \
        if (TA_UNLIKELY(!(cond)))                                                                  \
            _ta_fatal(call, addr, what);                                                           \
    } while (0)

/* ---- the log (log.c) ------------------------------------------------------ */
/* Writes a message to stderr without allocating when verbose (or always,
 * when force is set). The options set verbose from VERBOSE: the log sits
 * below them and reads no option. */
void _ta_log(bool force, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void _ta_log_set_verbose(bool on);

/* ---- options (options.c) ------------------------------------------------ */
extern long long _ta_options[TA_OPT_COUNT_];
void _ta_options_init(void); /* idempotent; reads environ, never allocates */
/* False while the options were read before environ existed (defaults). */
bool _ta_options_final(void);
static inline long long _ta_opt(ta_option_t o)
{
    return __atomic_load_n(&_ta_options[o], __ATOMIC_RELAXED);
}

/* ---- a spin-then-yield lock (lock.c): no allocation, fork-resettable ---- */
typedef struct {
    atomic_int held;
} ta_lock_t;
void _ta_lock_slow(ta_lock_t *l);
static inline void _ta_lock(ta_lock_t *l)
{
    int expected = 0;
    if (!atomic_compare_exchange_weak_explicit(&l->held, &expected, 1, memory_order_acquire,
                                               memory_order_relaxed))
        _ta_lock_slow(l);
}
static inline bool _ta_lock_try(ta_lock_t *l)
{
    int expected = 0;
    return atomic_compare_exchange_strong_explicit(&l->held, &expected, 1, memory_order_acquire,
                                                   memory_order_relaxed);
}
static inline void _ta_unlock(ta_lock_t *l)
{
    atomic_store_explicit(&l->held, 0, memory_order_release);
}

/* ---- sizes --------------------------------------------------------------- */
#define TA_MIN_ALIGN 16
static inline size_t _ta_align_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

#endif
