/* SPDX-License-Identifier: MIT */
/* A program outside the tree: built by CMake through find_package and by a
 * static link through pkg-config, against an installed tensoralloc. */
#include <tensoralloc.h>
#if __has_include(<tensoralloc_cache.h>)
#include <tensoralloc_cache.h>
#define HAVE_CACHE 1
#endif
#include <stdio.h>
#include <string.h>

int main(void)
{
    char *p = ta_malloc(4 << 20); /* a large block: a mapping of its own */
    if (!p)
        return 1;
    memset(p, 7, 4 << 20);
    ta_stats_t st = {.size = sizeof st};
    if (ta_stats_get(&st) != 0 || st.large_live_bytes < (4 << 20))
        return 2;
    ta_free(p);
#ifdef HAVE_CACHE
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 1 << 20};
    ta_cache_t *c;
    ta_entry_t *e;
    void *data;
    int64_t shape[1] = {1000};
    if (ta_cache_create(&cfg, &c) != 0 || ta_cache_create_entry(c, "k", &e) != 0 ||
        ta_entry_add_tensor(e, "w", TA_DTYPE_F32, 1, shape, &data) != 0)
        return 3;
    ta_entry_unlock(e);
    ta_cache_destroy(c);
#endif
    printf("consumer ok: tensoralloc %s\n", ta_version());
    return 0;
}
