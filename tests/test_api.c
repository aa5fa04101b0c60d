/* SPDX-License-Identifier: MIT */
/* Suite "api": the C semantics of every ta_* allocation function. */
#include "helpers.h"
#include "tensoralloc_cache.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>

/* The point of some cases is to pass absurd sizes. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Walloc-size-larger-than="
#endif

Test(api, malloc_zero_gives_unique_pointers)
{
    void *a = ta_malloc(0), *b = ta_malloc(0);
    cr_assert_not_null(a);
    cr_assert_not_null(b);
    cr_assert_neq(a, b);
    cr_assert_geq(ta_usable_size(a), 1);
    ta_free(a);
    ta_free(b);
}

Test(api, free_null_is_noop)
{
    errno = 1234;
    ta_free(NULL);
    cr_assert_eq(errno, 1234);
}

Test(api, sizes_across_the_threshold_and_pages)
{
    long long threshold;
    cr_assert_eq(ta_option_get(TA_OPT_THRESHOLD, &threshold), 0);
    size_t t = (size_t)threshold;
    size_t sizes[] = {1,    15,    16,          17,      127,         128,        129,
                      4095, 4096,  4097,        65535,   65536,       65537,      t - 1,
                      t,    t + 1, 2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 7 * MiB + 3};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        unsigned char *p = ta_malloc(n);
        cr_assert_not_null(p, "malloc(%zu)", n);
        cr_assert_eq((uintptr_t)p % 16, 0, "malloc(%zu) misaligned: %p", n, (void *)p);
        cr_assert_geq(ta_usable_size(p), n, "usable(%zu) = %zu", n, ta_usable_size(p));
        pattern_fill(p, n, i);
        cr_assert(pattern_ok(p, n, i));
        if (n >= 2 * MiB)
            cr_assert_eq((uintptr_t)p % (2 * MiB), 0, "large block %zu not 2 MiB aligned", n);
        ta_free(p);
    }
}

Test(api, malloc_huge_fails_with_enomem)
{
    size_t sizes[] = {SIZE_MAX, SIZE_MAX - 4096, SIZE_MAX / 2, (size_t)1 << 60};
    for (size_t i = 0; i < 4; i++) {
        errno = 0;
        cr_assert_null(ta_malloc(sizes[i]));
        cr_assert_eq(errno, ENOMEM, "size %zx", sizes[i]);
    }
}

Test(api, calloc_zeroes_and_detects_overflow)
{
    errno = 0;
    cr_assert_null(ta_calloc(SIZE_MAX / 2, 3));
    cr_assert_eq(errno, ENOMEM);
    errno = 0;
    cr_assert_null(ta_calloc((size_t)1 << 33, (size_t)1 << 33));
    cr_assert_eq(errno, ENOMEM);

    /* Dirty a block of each path, free it, and calloc the same sizes: the
     * memory that comes back (reused or fresh) must read zero. */
    size_t sizes[] = {24, 1000, 60000, 300 * KiB, 3 * MiB};
    for (int i = 0; i < 5; i++) {
        size_t n = sizes[i];
        unsigned char *d = ta_malloc(n);
        memset(d, 0xAB, n);
        ta_free(d);
        unsigned char *z = ta_calloc(1, n);
        cr_assert_not_null(z);
        for (size_t j = 0; j < n; j++)
            cr_assert_eq(z[j], 0, "calloc(%zu) byte %zu = %d", n, j, z[j]);
        ta_free(z);
    }
    void *c0 = ta_calloc(0, 10);
    cr_assert_not_null(c0);
    ta_free(c0);
}

Test(api, aligned_alloc_every_power_of_two)
{
    size_t sizes[] = {1, 100, 5000, 70000, 300 * KiB, 3 * MiB};
    for (size_t a = 8; a <= 4 * MiB; a <<= 1) {
        for (int i = 0; i < 6; i++) {
            void *p = ta_aligned_alloc(a, sizes[i]);
            cr_assert_not_null(p, "aligned_alloc(%zu, %zu)", a, sizes[i]);
            cr_assert_eq((uintptr_t)p % a, 0, "aligned_alloc(%zu, %zu) = %p", a, sizes[i], p);
            cr_assert_geq(ta_usable_size(p), sizes[i]);
            memset(p, 0x5A, sizes[i]);
            ta_free(p);
        }
    }
}

Test(api, aligned_alloc_rejects_bad_alignment)
{
    size_t bad[] = {0, 3, 24, 100, 4097};
    for (int i = 0; i < 5; i++) {
        errno = 0;
        cr_assert_null(ta_aligned_alloc(bad[i], 64));
        cr_assert_eq(errno, EINVAL, "alignment %zu", bad[i]);
    }
}

Test(api, posix_memalign_contract)
{
    void *p = (void *)0x1;
    errno = 77;
    cr_assert_eq(ta_posix_memalign(&p, 4, 10), EINVAL); /* not a multiple of void* */
    cr_assert_eq(ta_posix_memalign(&p, 48, 10), EINVAL);
    cr_assert_eq(ta_posix_memalign(&p, 0, 10), EINVAL);
    cr_assert_eq(p, (void *)0x1, "output untouched on failure");
    cr_assert_eq(ta_posix_memalign(&p, 64, SIZE_MAX), ENOMEM);
    cr_assert_eq(errno, 77, "posix_memalign leaves errno alone");
    for (size_t a = 8; a <= 2 * MiB; a <<= 1) {
        cr_assert_eq(ta_posix_memalign(&p, a, 3 * a + 1), 0);
        cr_assert_eq((uintptr_t)p % a, 0);
        ta_free(p);
    }
}

/* Requests no mapping can satisfy, probed the way glibc's
 * tst-malloc-too-large does: every power-of-two alignment up to 2^63 with
 * sizes near SIZE_MAX, just past PTRDIFF_MAX and from 2^48 up. Each fails
 * with ENOMEM, found by arithmetic: no mmap or mremap is tried. */
Test(api, impossible_requests_fail_without_a_system_call)
{
    unsigned char *small = ta_malloc(50), *large = ta_malloc(3 * MiB);
    pattern_fill(small, 50, 1);
    pattern_fill(large, 3 * MiB, 2);
    size_t sizes[] = {SIZE_MAX,
                      SIZE_MAX - 4096,
                      (size_t)PTRDIFF_MAX + 1,
                      PTRDIFF_MAX,
                      ((size_t)3 << 50) | (((size_t)1 << 50) - 1),
                      (size_t)1 << 50,
                      ((size_t)1 << 48) + 1};
    ta_stats_t before = {.size = sizeof before}, after = {.size = sizeof after};
    cr_assert_eq(ta_stats_get(&before), 0);
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        errno = 0;
        cr_assert_null(ta_malloc(n));
        cr_assert_eq(errno, ENOMEM, "malloc(%zx)", n);
        errno = 0;
        cr_assert_null(ta_calloc(1, n));
        cr_assert_eq(errno, ENOMEM, "calloc(1, %zx)", n);
        errno = 0;
        cr_assert_null(ta_realloc(small, n));
        cr_assert_eq(errno, ENOMEM, "realloc(small, %zx)", n);
        errno = 0;
        cr_assert_null(ta_realloc(large, n));
        cr_assert_eq(errno, ENOMEM, "realloc(large, %zx)", n);
        for (size_t a = 1; a != 0; a <<= 1) {
            errno = 0;
            cr_assert_null(ta_aligned_alloc(a, n));
            cr_assert_eq(errno, ENOMEM, "aligned_alloc(%zx, %zx)", a, n);
            void *p = NULL;
            if (a >= sizeof(void *))
                cr_assert_eq(ta_posix_memalign(&p, a, n), ENOMEM, "posix_memalign(%zx, %zx)", a, n);
            cr_assert_null(p);
        }
    }
    /* a small size with an alignment that cannot be had */
    errno = 0;
    cr_assert_null(ta_aligned_alloc((size_t)1 << 63, 1));
    cr_assert_eq(errno, ENOMEM);
    cr_assert_eq(ta_stats_get(&after), 0);
    cr_assert_eq(after.os_map_calls, before.os_map_calls, "%llu mmap calls for impossible sizes",
                 (unsigned long long)(after.os_map_calls - before.os_map_calls));
    cr_assert_eq(after.os_remap_calls, before.os_remap_calls, "%llu mremap calls",
                 (unsigned long long)(after.os_remap_calls - before.os_remap_calls));
    cr_assert(pattern_ok(small, 50, 1), "a failed realloc keeps the block");
    cr_assert(pattern_ok(large, 3 * MiB, 2), "a failed realloc keeps the block");
    ta_free(small);
    ta_free(large);
}

Test(api, realloc_null_and_zero)
{
    void *p = ta_realloc(NULL, 100);
    cr_assert_not_null(p);
    cr_assert_null(ta_realloc(p, 0), "realloc(p, 0) frees and returns NULL, as glibc");
    void *big = ta_malloc(5 * MiB);
    cr_assert_null(ta_realloc(big, 0));
}

Test(api, realloc_preserves_contents_across_paths)
{
    size_t steps[] = {10,      200,      5000,    100 * KiB, 255 * KiB, 257 * KiB, 1 * MiB,
                      3 * MiB, 33 * MiB, 4 * MiB, 300 * KiB, 20 * KiB,  100,       8};
    size_t n = 1;
    unsigned char *p = ta_malloc(n);
    pattern_fill(p, n, 9);
    for (size_t i = 0; i < sizeof steps / sizeof *steps; i++) {
        size_t m = steps[i];
        unsigned char *q = ta_realloc(p, m);
        cr_assert_not_null(q, "realloc to %zu", m);
        size_t keep = n < m ? n : m;
        cr_assert(pattern_ok(q, keep, 9), "contents lost growing/shrinking %zu -> %zu", n, m);
        pattern_fill(q, m, 9);
        p = q;
        n = m;
    }
    ta_free(p);
}

Test(api, realloc_failure_keeps_the_old_block)
{
    unsigned char *p = ta_malloc(3 * MiB);
    pattern_fill(p, 3 * MiB, 4);
    errno = 0;
    cr_assert_null(ta_realloc(p, SIZE_MAX - 100));
    cr_assert_eq(errno, ENOMEM);
    cr_assert(pattern_ok(p, 3 * MiB, 4));
    unsigned char *s = ta_malloc(50);
    pattern_fill(s, 50, 5);
    cr_assert_null(ta_realloc(s, SIZE_MAX));
    cr_assert(pattern_ok(s, 50, 5));
    ta_free(s);
    ta_free(p);
}

Test(api, usable_size_of_null_is_zero)
{
    cr_assert_eq(ta_usable_size(NULL), 0);
}

Test(api, version)
{
    cr_assert_str_eq(ta_version(), TA_VERSION_STRING);
    cr_assert_eq(ta_version_number(), TA_VERSION_NUMBER);
    cr_assert_geq(TA_VERSION_NUMBER, 100);
}

/* The field table bindings read is the struct: every uint64_t after the
 * header, in order, with its own name, and nothing past the end. */
Test(api, the_statistics_field_table_is_the_struct)
{
    void *p = ta_malloc(1 << 20);
    ta_stats_t st = {.size = sizeof st};
    cr_assert_eq(ta_stats_get(&st), 0);
    size_t n = (sizeof st - offsetof(ta_stats_t, large_live_bytes)) / sizeof(uint64_t);
    const uint64_t *values = &st.large_live_bytes;
    for (size_t i = 0; i < n; i++) {
        const char *name, *description;
        uint64_t v;
        cr_assert_eq(ta_stats_field(&st, i, &name, &description, &v), 0, "field %zu", i);
        cr_assert_eq(v, values[i], "%s", name);
        cr_assert(name && *name && description && *description);
        for (size_t j = 0; j < i; j++) {
            const char *other;
            ta_stats_field(&st, j, &other, NULL, NULL);
            cr_assert_str_neq(name, other);
        }
    }
    const char *name;
    cr_assert_eq(ta_stats_field(&st, n, &name, NULL, NULL), EINVAL);
    ta_stats_field(&st, 0, &name, NULL, NULL);
    cr_assert_str_eq(name, "large_live_bytes");
    cr_assert_geq(st.large_live_bytes, 1 << 20);
    /* a caller's smaller struct: fields past its size read 0 */
    ta_stats_t small = st;
    small.size = offsetof(ta_stats_t, large_peak_bytes);
    uint64_t v = 1;
    cr_assert_eq(ta_stats_field(&small, 1, NULL, NULL, &v), 0);
    cr_assert_eq(v, 0);
    ta_free(p);
}

/* Every module's codes: distinct values, each with the message of its own
 * table; errno values fall through to strerror. */
Test(api, every_error_code_has_its_table_message)
{
    static const struct {
        int code;
        const char *message;
    } all[] = {
#define X(name, value, message) {name, message},
        TA_ERRORS(X) TA_CUDA_ERRORS(X) TA_CACHE_ERRORS(X)
#undef X
    };
    size_t n = sizeof all / sizeof all[0];
    cr_assert_eq(n, 10);
    for (size_t i = 0; i < n; i++) {
        cr_assert_str_eq(ta_strerror(all[i].code), all[i].message);
        cr_assert_geq(all[i].code, 1000);
        for (size_t j = 0; j < i; j++)
            cr_assert_neq(all[i].code, all[j].code);
    }
    cr_assert_str_eq(ta_strerror(0), "success");
    cr_assert_str_eq(ta_strerror(ENOMEM), strerror(ENOMEM));
}
