/* SPDX-License-Identifier: MIT */
/*
 * Run under the preload library: requests no address space can hold fail
 * with ENOMEM (posix_memalign returns it and leaves *out alone), and they
 * fail by arithmetic, without a system call. The sizes are those glibc's
 * malloc/tst-malloc-too-large.c probes (its own program is not copied):
 * SIZE_MAX - i and PTRDIFF_MAX + i for i < 2^14, and 2^50 * m, with and
 * without the low 50 bits set, for every m < 2^14; each with every
 * allocation function and, for the aligned ones, every power-of-two
 * alignment up to 2^63, under an RLIMIT_AS of 2^50 - 1 as there. The
 * mmap count comes from ta_stats_get (found with dlsym).
 */
#define _GNU_SOURCE
#include "tensoralloc.h"

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Walloc-size-larger-than="
#endif

static unsigned long calls, wrong;

/* errno is read after the call, in its own statement. */
static void expect_enomem(const char *what, size_t a, size_t n, void *p, int err)
{
    calls++;
    if (p != NULL || err != ENOMEM) {
        if (wrong++ < 10)
            printf("%s(%#zx, %#zx): %s, errno %d\n", what, a, n, p ? "a block" : "NULL", err);
        free(p);
    }
}

#define EXPECT_ENOMEM(what, a, n, call)                                                            \
    do {                                                                                           \
        errno = 0;                                                                                 \
        void *p_ = (call);                                                                         \
        int e_ = errno;                                                                            \
        expect_enomem(what, a, n, p_, e_);                                                         \
    } while (0)

static void too_large(size_t n)
{
    EXPECT_ENOMEM("malloc", 0, n, malloc(n));
    EXPECT_ENOMEM("calloc", 1, n, calloc(1, n));
    void *volatile old = malloc(16); /* kept by each failed realloc */
    EXPECT_ENOMEM("realloc", 0, n, realloc(old, n));
    EXPECT_ENOMEM("reallocarray", 1, n, reallocarray(old, 1, n));
    free(old);
    for (size_t a = 1; a != 0; a <<= 1) {
        EXPECT_ENOMEM("memalign", a, n, memalign(a, n));
        EXPECT_ENOMEM("aligned_alloc", a, n, aligned_alloc(a, n));
        if (a % sizeof(void *) == 0) {
            void *out = NULL;
            errno = 0;
            int rc = posix_memalign(&out, a, n);
            int e = errno;
            calls++;
            if (rc != ENOMEM || e != ENOMEM || out != NULL) {
                if (wrong++ < 10)
                    printf("posix_memalign(%#zx, %#zx): returns %d, errno %d\n", a, n, rc, e);
                if (rc == 0)
                    free(out);
            }
        }
    }
    EXPECT_ENOMEM("valloc", 0, n, valloc(n));
    EXPECT_ENOMEM("pvalloc", 0, n, pvalloc(n));
}

int main(void)
{
    int (*stats_get)(ta_stats_t *);
    *(void **)&stats_get = dlsym(RTLD_DEFAULT, "ta_stats_get");
    if (stats_get == NULL) {
        printf("ta_stats_get not found: not running under the preload library\n");
        return 1;
    }
    const size_t low50 = ((size_t)1 << 50) - 1;
    struct rlimit limit = {low50, low50};
    setrlimit(RLIMIT_AS, &limit);
    printf("too-large requests:\n"); /* stdout's buffer, before counting */

    ta_stats_t before = {.size = sizeof before}, after = {.size = sizeof after};
    stats_get(&before);
    for (size_t i = 0; i < ((size_t)1 << 14); i++)
        too_large(SIZE_MAX - i);
    for (size_t i = 1; i < ((size_t)1 << 14); i++)
        too_large((size_t)PTRDIFF_MAX + i);
    for (size_t m = ((size_t)1 << 14) - 1; m >= 1; m--) {
        too_large((m << 50) | low50);
        too_large(m << 50);
    }
    stats_get(&after);

    unsigned long long maps = after.os_map_calls - before.os_map_calls;
    unsigned long long remaps = after.os_remap_calls - before.os_remap_calls;
    printf("%lu calls, %lu not ENOMEM, %llu mmap and %llu mremap calls\n", calls, wrong, maps,
           remaps);
    return wrong == 0 && maps == 0 && remaps == 0 ? 0 : 1;
}
