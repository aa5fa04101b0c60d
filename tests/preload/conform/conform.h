/* SPDX-License-Identifier: MIT */
/*
 * Shared by the conformance programs: each runs once under glibc's malloc
 * and once under the preload library (compare.sh), and what it prints must
 * be the same. So a program prints outcomes only: NULL or a block, errno by
 * name, whether a block meets its alignment and holds its size, yes/no
 * answers to questions whose raw figures differ between allocators; never
 * an address or a count that depends on the allocator's layout.
 *
 * The programs are built with -fno-builtin: GCC otherwise assumes things
 * about the allocation functions (that posix_memalign leaves errno alone,
 * that a malloc/free pair may go) and the program would test the compiler.
 * errno is read in its own statement after each call (an argument list
 * may be evaluated in any order).
 */
#ifndef TA_CONFORM_H
#define TA_CONFORM_H

#include <errno.h>
#include <malloc.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Walloc-size-larger-than="
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static inline const char *err_name(int e)
{
    static char other[32];
    switch (e) {
    case 0: return "0";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EAGAIN: return "EAGAIN";
    default: snprintf(other, sizeof other, "errno %d", e); return other;
    }
}

/* The alignment a block must have: what was asked for, rounded up to a
 * power of two, and at least glibc's MALLOC_ALIGNMENT (16 on 64-bit). */
static inline size_t effective_alignment(size_t align)
{
    size_t a = 16;
    while (a < align && a != 0)
        a <<= 1;
    return a ? a : align;
}

/* One allocation's outcome on a line; the block is freed unless kept. */
static inline void *report(const char *call, void *p, int err, size_t align, size_t size, bool keep)
{
    if (p == NULL) {
        printf("%s = NULL, errno %s\n", call, err_name(err));
        return NULL;
    }
    bool aligned = (uintptr_t)p % effective_alignment(align) == 0;
    bool fits = malloc_usable_size(p) >= size;
    if (fits && size)
        memset(p, 0xA5, size < 64 * KiB ? size : 64 * KiB);
    printf("%s = block%s%s\n", call, aligned ? "" : ", MISALIGNED", fits ? "" : ", TOO SMALL");
    if (keep)
        return p;
    free(p);
    return NULL;
}

/* TRY(align, size, call, "label format", ...): runs call with errno 0
 * before, reports it under the label and frees the block. */
#define TRY(align, size, call, ...)                                                                \
    do {                                                                                           \
        char label_[192];                                                                          \
        snprintf(label_, sizeof label_, __VA_ARGS__);                                              \
        errno = 0;                                                                                 \
        void *p_ = (call);                                                                         \
        int e_ = errno;                                                                            \
        report(label_, p_, e_, (align), (size), false);                                            \
    } while (0)

/* A pattern that differs per block and offset, for contents that must
 * survive a realloc. */
static inline void fill(void *p, size_t n, unsigned seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(seed * 31 + i * 7 + (i >> 8));
}

static inline bool intact(const void *p, size_t n, unsigned seed)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(seed * 31 + i * 7 + (i >> 8)))
            return false;
    return true;
}

static inline const char *yes(bool b)
{
    return b ? "yes" : "no";
}

#endif
