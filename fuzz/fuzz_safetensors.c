/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness for the safetensors reader and the cache's loader: the
 * input is a whole file. A header that passes the checks must describe
 * tensors inside the data section that do not overlap; loading it into a
 * cache must then succeed (or be refused for budget) and leave the cache
 * consistent; a refused file must leave it unchanged.
 */
#define _GNU_SOURCE
#include "cache/safetensors.h"
#include "tensoralloc_cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    int fd = memfd_create("st", 0);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len)
        abort();
    _ta_st_header_t h;
    char err[256];
    int rc = _ta_st_read_header(fd, &h, err, sizeof err);
    if (rc == 0) {
        for (size_t i = 0; i < h.count; i++) {
            if (h.tensors[i].end > h.data_len || h.tensors[i].begin > h.tensors[i].end)
                abort();
            for (size_t j = 0; j < i; j++)
                if (h.tensors[i].begin < h.tensors[j].end &&
                    h.tensors[j].begin < h.tensors[i].end &&
                    h.tensors[i].begin != h.tensors[i].end &&
                    h.tensors[j].begin != h.tensors[j].end)
                    abort();
        }
        _ta_st_free(&h);
    } else if (rc == TA_EFORMAT && err[0] == '\0') {
        abort(); /* a refusal always says why */
    }
    static ta_cache_t *cache;
    if (!cache) {
        ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 16 << 20};
        if (ta_cache_create(&cfg, &cache) != 0)
            abort();
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ta_cache_stats_t before = {.size = sizeof before}, after = {.size = sizeof after};
    ta_cache_stats_get(cache, &before);
    ta_entry_t *e;
    int lrc = ta_cache_load_safetensors(cache, "k", path, &e);
    ta_cache_stats_get(cache, &after);
    if (lrc == 0) {
        for (size_t i = 0; i < ta_entry_tensor_count(e); i++) {
            ta_tensor_t t;
            if (ta_entry_tensor_at(e, i, &t) != 0 || (t.nbytes && !t.data))
                abort();
        }
        ta_entry_unlock(e);
        if (ta_cache_remove(cache, "k") != 0)
            abort();
    } else if (after.in_cache != before.in_cache || after.ram_used != before.ram_used) {
        abort(); /* a refused file changed the cache */
    }
    if ((rc == 0) != (lrc == 0 || lrc == TA_EBUDGET || lrc == TA_ECACHEFULL))
        abort(); /* the loader and the reader disagree */
    close(fd);
    return 0;
}
