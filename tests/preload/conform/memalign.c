/* SPDX-License-Identifier: MIT */
/*
 * Conformance, the memalign family: memalign, aligned_alloc,
 * posix_memalign, valloc and pvalloc over alignments from 0 to SIZE_MAX
 * (powers of two, their neighbours, and others) and sizes from 0 to
 * SIZE_MAX. What glibc promises here (malloc/malloc.c, _mid_memalign and
 * __posix_memalign; malloc/tst-memalign.c, tst-posix_memalign.c,
 * tst-malloc-too-large.c): an alignment up to 16 is malloc's; one above
 * 2^63 is EINVAL; any other is rounded up to a power of two (aligned_alloc
 * the same before glibc 2.38, EINVAL for a non-power-of-two from 2.38); a
 * size that cannot be had is ENOMEM; posix_memalign returns EINVAL for an
 * alignment that is not a power-of-two multiple of sizeof(void *), returns
 * ENOMEM with errno ENOMEM otherwise, and writes *out only on success.
 */
#include "conform.h"

#include <unistd.h>

/* clang-format off */
static const size_t alignments[] = {
    0, 1, 2, 3, 4, 8, 12, 16, 17, 24, 32, 48, 64, 100, 128, 4095, 4096, 4097, 65536, 65537,
    (size_t)2 << 20, (size_t)1 << 24, (size_t)1 << 62, ((size_t)1 << 62) + 1,
    (size_t)1 << 63, ((size_t)1 << 63) + 1, SIZE_MAX,
};

/* Sizes that fit are kept small next to the huge alignments (the block
 * maps alignment + size of address space, never touched). */
static const size_t sizes[] = {
    0, 1, 100, 4097, (size_t)3 << 20,
    (size_t)1 << 50, PTRDIFF_MAX, (size_t)PTRDIFF_MAX + 1, SIZE_MAX - 4096, SIZE_MAX,
};
/* clang-format on */

static void posix(size_t a, size_t n)
{
    void *out = &out; /* a value the call must not overwrite on failure */
    errno = 0;
    int rc = posix_memalign(&out, a, n);
    int e = errno;
    if (rc != 0) {
        printf("posix_memalign(%#zx, %#zx) returns %s, errno %s, out %s\n", a, n, err_name(rc),
               err_name(e), out == &out ? "untouched" : "WRITTEN");
        return;
    }
    char label[96];
    snprintf(label, sizeof label, "posix_memalign(%#zx, %#zx)", a, n);
    report(label, out, 0, a, n, false);
}

int main(void)
{
    for (size_t i = 0; i < sizeof alignments / sizeof *alignments; i++) {
        size_t a = alignments[i];
        for (size_t j = 0; j < sizeof sizes / sizeof *sizes; j++) {
            size_t n = sizes[j];
            if (a >= ((size_t)1 << 24) && n >= ((size_t)1 << 20) && n < ((size_t)1 << 50))
                continue;
            TRY(a, n, memalign(a, n), "memalign(%#zx, %#zx)", a, n);
            TRY(a, n, aligned_alloc(a, n), "aligned_alloc(%#zx, %#zx)", a, n);
            posix(a, n);
        }
    }

    /* every power of two up to 2^63 with a size that cannot be had */
    for (size_t a = 1; a != 0; a <<= 1) {
        TRY(a, 0, memalign(a, SIZE_MAX - a + 1), "memalign(%#zx, SIZE_MAX - a + 1)", a);
        TRY(a, 0, aligned_alloc(a, (size_t)1 << 60), "aligned_alloc(%#zx, 2^60)", a);
        if (a >= sizeof(void *))
            posix(a, PTRDIFF_MAX);
    }

    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t vsizes[] = {0,
                       1,
                       page - 1,
                       page,
                       page + 1,
                       (size_t)5 << 20,
                       (size_t)1 << 50,
                       PTRDIFF_MAX,
                       SIZE_MAX - page,
                       SIZE_MAX - page + 1,
                       SIZE_MAX};
    for (size_t j = 0; j < sizeof vsizes / sizeof *vsizes; j++) {
        size_t n = vsizes[j];
        /* pvalloc's block holds the size rounded up to pages */
        size_t rounded = n > SIZE_MAX - page ? n : (n + page - 1) / page * page;
        TRY(page, n, valloc(n), "valloc(%#zx)", n);
        TRY(page, rounded ? rounded : 1, pvalloc(n), "pvalloc(%#zx)", n);
    }
    return 0;
}
