/* SPDX-License-Identifier: MIT */
/*
 * Run under the preload library: mallinfo2(), malloc_stats(), malloc_info()
 * and mallopt() must be tensoralloc's. The figures are checked against
 * ta_stats_get, found in the preloaded library with dlsym.
 */
#define _GNU_SOURCE
#include "tensoralloc.h"

#include <dlfcn.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* mallinfo() is deprecated, and replaced all the same: test it. */
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

int main(void)
{
    int (*stats_get)(ta_stats_t *);
    *(void **)&stats_get = dlsym(RTLD_DEFAULT, "ta_stats_get");
    if (stats_get == NULL) {
        printf("ta_stats_get not found: not running under the preload library\n");
        return 1;
    }
    void *big = malloc(40 << 20);
    memset(big, 1, 40 << 20);
    void *smalls[1000];
    for (int i = 0; i < 1000; i++)
        smalls[i] = malloc(200);
    struct mallinfo2 mi = mallinfo2();
    ta_stats_t st = {.size = sizeof st};
    stats_get(&st);
    int bad = 0;
    if (mi.hblks != st.large_live_count || mi.hblkhd != st.large_mapped_bytes ||
        mi.hblkhd < (40u << 20)) {
        printf("mallinfo2 large fields are not ours: hblks %zu hblkhd %zu\n", mi.hblks, mi.hblkhd);
        bad++;
    }
    if (mi.uordblks < 1000 * 200 || mi.arena < mi.uordblks) {
        printf("mallinfo2 small fields are not ours: uordblks %zu arena %zu\n", mi.uordblks,
               mi.arena);
        bad++;
    }
    struct mallinfo old = mallinfo();
    if ((size_t)old.hblkhd != mi.hblkhd) {
        printf("mallinfo disagrees with mallinfo2\n");
        bad++;
    }
    /* mallopt moves the threshold; a 100 KiB block then takes the large path */
    if (mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1 || mallopt(M_ARENA_MAX, 2) != 1 ||
        mallopt(12345, 1) != 1 /* glibc accepts any parameter */) {
        printf("mallopt results wrong\n");
        bad++;
    }
    size_t before = mallinfo2().hblks;
    void *mid = malloc(100 * 1024);
    if (mallinfo2().hblks != before + 1) {
        printf("M_MMAP_THRESHOLD had no effect\n");
        bad++;
    }
    free(mid);
    char *xml = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&xml, &len);
    if (malloc_info(0, f) != 0)
        bad++;
    fclose(f);
    if (strstr(xml, "<malloc version=\"1\">") == NULL || strstr(xml, "type=\"mmap\"") == NULL) {
        printf("malloc_info output unexpected: %s\n", xml);
        bad++;
    }
    free(xml);
    free(big);
    for (int i = 0; i < 1000; i++)
        free(smalls[i]);
    if (malloc_trim(0) != 1) {
        printf("malloc_trim released nothing with a 40 MiB block pooled\n");
        bad++;
    }
    printf("mallinfo: %s\n", bad ? "FAILED" : "tensoralloc figures");
    return bad != 0;
}
