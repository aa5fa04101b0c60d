/* SPDX-License-Identifier: MIT */
/*
 * Conformance, mallopt's answers: every parameter <malloc.h> names, and
 * some it does not, with values from INT_MIN to INT_MAX. What glibc
 * promises (malloc/malloc.c, __libc_mallopt; malloc/tst-mallopt.c): 1 for
 * every parameter, known or not, because the value is taken as a size_t
 * (-1 is "as large as can be"); 0 only for an M_MXFAST above MAX_FAST_SIZE
 * (160 on 64-bit) and, before glibc 2.35, an M_MMAP_THRESHOLD above 32 MiB.
 * Ends by setting glibc's defaults back, and allocating with them.
 */
#include "conform.h"

#include <limits.h>

static const struct {
    int param;
    const char *name;
} params[] = {
    {M_MXFAST, "M_MXFAST"},       {M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD"},
    {M_TOP_PAD, "M_TOP_PAD"},     {M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"},
    {M_MMAP_MAX, "M_MMAP_MAX"},   {M_CHECK_ACTION, "M_CHECK_ACTION"},
    {M_PERTURB, "M_PERTURB"},     {M_ARENA_TEST, "M_ARENA_TEST"},
    {M_ARENA_MAX, "M_ARENA_MAX"}, {-9, "-9 (unknown)"},
    {0, "0 (unknown)"},           {2, "2 (M_NLBLKS, unused)"},
    {3, "3 (M_GRAIN, unused)"},   {4, "4 (M_KEEP, unused)"},
    {12345, "12345 (unknown)"},   {INT_MIN, "INT_MIN (unknown)"},
};

static const int values[] = {
    INT_MIN,        -1,       0,       1, 64, 160, 161, 4096, 128 << 10, 1 << 20, 32 << 20,
    (32 << 20) + 1, 64 << 20, INT_MAX,
};

int main(void)
{
    for (size_t i = 0; i < sizeof params / sizeof *params; i++) {
        printf("mallopt(%s):", params[i].name);
        for (size_t j = 0; j < sizeof values / sizeof *values; j++)
            printf(" %d->%d", values[j], mallopt(params[i].param, values[j]));
        printf("\n");
    }

    /* the usual way to keep freed memory: both knobs at "never" */
    printf("mallopt(M_TRIM_THRESHOLD, -1) = %d\n", mallopt(M_TRIM_THRESHOLD, -1));
    printf("mallopt(M_MMAP_MAX, 0) = %d\n", mallopt(M_MMAP_MAX, 0));

    /* glibc's defaults again; allocations go on working */
    int ok = mallopt(M_MXFAST, 128) + mallopt(M_TRIM_THRESHOLD, 128 << 10) +
             mallopt(M_TOP_PAD, 128 << 10) + mallopt(M_MMAP_THRESHOLD, 128 << 10) +
             mallopt(M_MMAP_MAX, 65536) + mallopt(M_PERTURB, 0) + mallopt(M_CHECK_ACTION, 3);
    printf("defaults set again: %d of 7\n", ok);
    size_t sizes[] = {10, 1000, 100 * KiB, 200 * KiB, 5 * MiB};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        TRY(16, sizes[i], malloc(sizes[i]), "malloc(%zu) after mallopt", sizes[i]);
    return 0;
}
