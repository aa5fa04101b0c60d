/* SPDX-License-Identifier: MIT */
/*
 * Conformance, the everyday calls: malloc, calloc, realloc, reallocarray,
 * free and malloc_usable_size. What glibc promises (malloc/malloc.c;
 * malloc/tst-malloc.c, tst-calloc.c, tst-realloc.c, tst-reallocarray.c,
 * tst-free-errno.c, tst-malloc-usable.c): malloc(0) is a unique block;
 * every block is 16-aligned and its usable size covers the request; no
 * object exceeds PTRDIFF_MAX (ENOMEM); calloc zeroes, even memory that was
 * dirty when freed, and detects count * size overflow; realloc(NULL, n) is
 * malloc(n), realloc(p, 0) frees p and returns NULL, a failed realloc
 * leaves the block as it was, and contents survive growing and shrinking
 * across every size; free keeps errno.
 */
#include "conform.h"

static const size_t sizes[] = {
    0,        1,           15,        16,        17,           24,      100,
    1000,     1024,        1025,      4095,      4096,         4097,    16 * KiB,
    64 * KiB, 128 * KiB,   255 * KiB, 256 * KiB, 257 * KiB,    1 * MiB, 2 * MiB - 1,
    2 * MiB,  2 * MiB + 1, 3 * MiB,   32 * MiB,  64 * MiB + 3,
};
#define NSIZES (sizeof sizes / sizeof *sizes)

static const size_t impossible[] = {
    (size_t)1 << 50,         PTRDIFF_MAX - 4096, PTRDIFF_MAX,
    (size_t)PTRDIFF_MAX + 1, SIZE_MAX - 4096,    SIZE_MAX,
};
#define NIMPOSSIBLE (sizeof impossible / sizeof *impossible)

static void test_malloc(void)
{
    void *a = malloc(0), *b = malloc(0);
    printf("malloc(0) twice: %s and %s, distinct %s\n", a ? "block" : "NULL", b ? "block" : "NULL",
           yes(a != b));
    free(a);
    free(b);
    for (size_t i = 0; i < NSIZES; i++)
        TRY(16, sizes[i], malloc(sizes[i]), "malloc(%zu)", sizes[i]);
    for (size_t i = 0; i < NIMPOSSIBLE; i++)
        TRY(16, 0, malloc(impossible[i]), "malloc(%#zx)", impossible[i]);
    printf("malloc_usable_size(NULL) = %zu\n", malloc_usable_size(NULL));
}

static void test_calloc(void)
{
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        void *dirty = malloc(n);
        if (dirty)
            memset(dirty, 0xEE, n);
        free(dirty);
        errno = 0;
        unsigned char *z = calloc(1, n);
        int e = errno;
        bool zero = true;
        for (size_t j = 0; z && j < n; j++)
            zero &= z[j] == 0;
        printf("calloc(1, %zu) = %s, zeroed %s\n", n, z ? "block" : err_name(e), yes(zero));
        free(z);
    }
    TRY(16, 0, calloc(0, 100), "calloc(0, 100)");
    TRY(16, 0, calloc(100, 0), "calloc(100, 0)");
    TRY(16, 0, calloc(SIZE_MAX / 2, 3), "calloc(SIZE_MAX / 2, 3)");
    TRY(16, 0, calloc((size_t)1 << 33, (size_t)1 << 33), "calloc(2^33, 2^33)");
    TRY(16, 0, calloc(SIZE_MAX, SIZE_MAX), "calloc(SIZE_MAX, SIZE_MAX)");
    for (size_t i = 0; i < NIMPOSSIBLE; i++)
        TRY(16, 0, calloc(1, impossible[i]), "calloc(1, %#zx)", impossible[i]);
}

static void test_realloc(void)
{
    TRY(16, 100, realloc(NULL, 100), "realloc(NULL, 100)");
    TRY(16, 0, realloc(NULL, 0), "realloc(NULL, 0)");

    void *p = malloc(100);
    errno = 0;
    void *q = realloc(p, 0);
    int e = errno;
    printf("realloc(small, 0) = %s, errno %s\n", q ? "block" : "NULL", err_name(e));
    free(q);
    p = malloc(5 * MiB);
    errno = 0;
    q = realloc(p, 0);
    e = errno;
    printf("realloc(large, 0) = %s, errno %s\n", q ? "block" : "NULL", err_name(e));
    free(q);

    /* one block through every size, up and down, contents checked */
    size_t n = 1;
    unsigned char *b = malloc(n);
    fill(b, n, 9);
    for (size_t round = 0; round < 2; round++) {
        for (size_t k = 0; k < NSIZES; k++) {
            size_t m = sizes[round ? NSIZES - 1 - k : k];
            errno = 0;
            unsigned char *r = realloc(b, m);
            e = errno;
            if (m == 0) { /* freed, as glibc: start again */
                printf("realloc(%zu -> 0) = %s\n", n, r ? "block" : "NULL");
                free(r);
                b = malloc(n = 1);
                fill(b, n, 9);
                continue;
            }
            size_t keep = n < m ? n : m;
            printf("realloc(%zu -> %zu) = %s%s%s\n", n, m, r ? "block" : err_name(e),
                   r && !intact(r, keep, 9) ? ", CONTENTS LOST" : "",
                   r && malloc_usable_size(r) < m ? ", TOO SMALL" : "");
            if (r == NULL)
                break;
            fill(r, m, 9);
            b = r;
            n = m;
        }
    }

    /* a failed realloc keeps the block */
    for (size_t i = 0; i < NIMPOSSIBLE; i++) {
        size_t start[] = {50, 3 * MiB};
        for (int s = 0; s < 2; s++) {
            unsigned char *old = b;
            size_t oldn = n;
            if (start[s] != n) {
                old = realloc(b, start[s]);
                oldn = start[s];
                fill(old, oldn, 4);
            } else {
                fill(old, oldn, 4);
            }
            errno = 0;
            void *r = realloc(old, impossible[i]);
            e = errno;
            printf("realloc(%zu -> %#zx) = %s, errno %s, old block intact %s\n", oldn,
                   impossible[i], r ? "block" : "NULL", err_name(e), yes(intact(old, oldn, 4)));
            b = r ? r : old;
            n = oldn;
        }
    }
    free(b);

    /* reallocarray: realloc with an overflow check */
    TRY(16, 100, reallocarray(NULL, 10, 10), "reallocarray(NULL, 10, 10)");
    unsigned char *volatile ra = reallocarray(NULL, 8, 8); /* kept by a failed call */
    fill(ra, 64, 3);
    errno = 0;
    void *rb = reallocarray(ra, SIZE_MAX / 2, 3);
    e = errno;
    printf("reallocarray(p, SIZE_MAX / 2, 3) = %s, errno %s, old block intact %s\n",
           rb ? "block" : "NULL", err_name(e), yes(intact(ra, 64, 3)));
    errno = 0;
    rb = reallocarray(ra, 100, 100);
    e = errno;
    printf("reallocarray(p, 100, 100) = %s, contents kept %s\n", rb ? "block" : err_name(e),
           yes(rb && intact(rb, 64, 3)));
    free(rb ? rb : ra);
}

static void test_free(void)
{
    errno = 1234;
    free(NULL);
    printf("free(NULL) keeps errno: %s\n", yes(errno == 1234));
    for (size_t i = 0; i < NSIZES; i++) {
        void *p = malloc(sizes[i]);
        errno = 1234;
        free(p);
        if (errno != 1234)
            printf("free of a %zu-byte block changed errno to %s\n", sizes[i], err_name(errno));
    }
    printf("free keeps errno for every size: done\n");
}

int main(void)
{
    test_malloc();
    test_calloc();
    test_realloc();
    test_free();
    return 0;
}
