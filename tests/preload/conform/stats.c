/* SPDX-License-Identifier: MIT */
/*
 * Conformance, the statistics calls: mallinfo2, mallinfo, malloc_info,
 * malloc_trim, malloc_stats. Their figures are each allocator's own, so
 * what is compared is what glibc's documentation and tests
 * (malloc/tst-mallinfo2.c, tst-malloc_info.c, tst-trim1.c) hold for any
 * figures: a live mmapped-size block shows in hblks and hblkhd and leaves
 * them when freed; small blocks in use show in uordblks; mallinfo is
 * mallinfo2 in ints; malloc_info(0, fp) writes one <malloc version="1">
 * document and returns 0, any other option returns EINVAL and writes
 * nothing; malloc_trim returns 1 after memory was given back and keeps
 * working; malloc_stats writes to stderr only.
 */
#include "conform.h"

#define NSMALL 20000

int main(void)
{
    /* a block past every mmap threshold */
    struct mallinfo2 m0 = mallinfo2();
    void *big = malloc(8 * MiB);
    memset(big, 1, 8 * MiB);
    struct mallinfo2 m1 = mallinfo2();
    printf("8 MiB block: hblks up by 1 %s, hblkhd up by >= 8 MiB %s\n",
           yes(m1.hblks == m0.hblks + 1), yes(m1.hblkhd >= m0.hblkhd + 8 * MiB));
    free(big);
    struct mallinfo2 m2 = mallinfo2();
    printf("freed: hblks back %s, hblkhd back %s\n", yes(m2.hblks == m0.hblks),
           yes(m2.hblkhd == m0.hblkhd));

    /* small blocks in use */
    static void *small[NSMALL];
    for (int i = 0; i < NSMALL; i++)
        small[i] = malloc(1000);
    struct mallinfo2 m3 = mallinfo2();
    printf("%d small blocks: uordblks up by >= %d %s, arena >= uordblks %s\n", NSMALL,
           NSMALL * 1000, yes(m3.uordblks >= m2.uordblks + NSMALL * 1000),
           yes(m3.arena >= m3.uordblks));
    struct mallinfo old = mallinfo();
    printf("mallinfo agrees with mallinfo2: %s\n",
           yes((size_t)old.hblks == m3.hblks && (size_t)old.hblkhd == m3.hblkhd &&
               (size_t)old.uordblks == m3.uordblks && (size_t)old.arena == m3.arena));

    /* malloc_info */
    char *xml = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&xml, &len);
    errno = 0;
    int rc = malloc_info(0, f);
    int e = errno;
    fclose(f);
    size_t n = strlen(xml);
    printf("malloc_info(0) returns %d, errno %s, starts <malloc version=\"1\"> %s, ends "
           "</malloc> %s\n",
           rc, err_name(e), yes(strncmp(xml, "<malloc version=\"1\">\n", 21) == 0),
           yes(n >= 10 && strcmp(xml + n - 10, "</malloc>\n") == 0));
    free(xml);
    xml = NULL;
    f = open_memstream(&xml, &len);
    errno = 0;
    rc = malloc_info(1, f);
    e = errno;
    fclose(f);
    printf("malloc_info(1) returns %s, errno %s, wrote %zu bytes\n", err_name(rc), err_name(e),
           strlen(xml));
    free(xml);

    /* malloc_trim after 20 MB of small blocks went back */
    for (int i = 0; i < NSMALL; i++)
        free(small[i]);
    errno = 0;
    rc = malloc_trim(0);
    e = errno;
    printf("malloc_trim(0) after freeing 20 MB of small blocks returns %d, errno %s\n", rc,
           err_name(e));
    rc = malloc_trim(0);
    printf("malloc_trim(0) again returns 0 or 1: %s\n", yes(rc == 0 || rc == 1));
    rc = malloc_trim(SIZE_MAX / 2);
    printf("malloc_trim(huge pad) returns 0 or 1: %s\n", yes(rc == 0 || rc == 1));
    for (int i = 0; i < NSMALL; i++)
        small[i] = malloc(1000);
    bool all = true;
    for (int i = 0; i < NSMALL; i++) {
        all &= small[i] != NULL;
        free(small[i]);
    }
    printf("allocating after trim works: %s\n", yes(all));

    fflush(stdout);
    malloc_stats(); /* stderr: figures differ; compare.sh compares stdout */
    printf("malloc_stats returned\n");
    return 0;
}
