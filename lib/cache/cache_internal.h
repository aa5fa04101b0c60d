/* SPDX-License-Identifier: MIT */
/*
 * The model cache's private header, shared by its two sides: cache.c (the
 * RAM side: budgets, the LRU list, locks, loads into RAM, keep-alive,
 * statistics) and cache_device.c (moves to and from the device, loads
 * straight to it, through the CUDA staging module). The device side calls
 * the RAM side's helpers below; the RAM side never calls the device side
 * (it frees device copies through the CUDA module itself).
 */
#ifndef TA_CACHE_INTERNAL_H
#define TA_CACHE_INTERNAL_H

#include "core/core.h"
#include "file_guard.h"
#include "loader.h"
#include "safetensors.h"
#include "tensoralloc_cache.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char *name;
    ta_dtype_t dtype;
    int ndim;
    int64_t shape[TA_MAX_DIMS];
    size_t nbytes;
    void *data;
    void *dev;
} tensor_t;

struct ta_entry {
    ta_cache_t *cache;
    char *key;
    tensor_t *tensors;
    size_t count, cap;
    size_t ram_bytes;  /* charged: tensor bytes with a host copy */
    size_t vram_bytes; /* charged: tensor bytes on the device */
    int locks;
    bool loading;                 /* not visible to gets yet: a load, or building */
    bool building;                /* ta_cache_create_entry's: tensors may be added */
    pthread_t builder;            /* the thread building it (its get would wait on itself) */
    bool moving;                  /* a device move is in flight (moves are serialised) */
    bool drop_host;               /* free the host copy when the last holder unlocks */
    bool drop_device;             /* free the device copy when the last holder unlocks */
    _ta_file_guard_t *guard;      /* mapped: the host copy is its mapping of the file */
    uint64_t used_ms;             /* last loaded, got or unlocked (keep_alive_ms) */
    struct ta_entry *prev, *next; /* LRU order: head least recently used */
};

typedef struct {
    char *key;
    uint64_t bytes;
} size_record_t;

typedef struct {
    char key[64]; /* cut to fit */
    uint64_t bytes;
    double seconds;
    int readers;
    bool direct;
} load_record_t;

struct ta_cache {
    ta_cache_config_t cfg;
    pthread_mutex_t mu;
    pthread_cond_t loaded;
    ta_entry_t *head, *tail;
    size_t count;
    size_t ram_used, vram_used;
    ta_cache_stats_t st;
    size_record_t *sizes;
    size_t nsizes;
    load_record_t recent[TA_CACHE_RECENT_LOADS]; /* a ring: loads % N is the next */
    ta_pinned_pool_t *pool;
    pthread_cond_t wake_keeper; /* the keep-alive timer's */
    unsigned long keeper;
    bool has_keeper, stopping;
    _Atomic uint64_t mapped_copied; /* counted by the file guard's thread */
    /* Memory pressure: the budget in force is lowered to `lowered` (0: not
     * lowered) and grows back an eighth each pressure_calm_ms from
     * calm_since_ms. With ram_budget 0 the rule is looked at again each
     * second (rule_ms), following the cgroup's limit. */
    size_t lowered;
    uint64_t calm_since_ms;
    bool budget_from_rule, listening;
    uint64_t rule_ms;
};

/* What one pass of eviction took, freed after the cache mutex is released. */
typedef struct {
    ta_entry_t *whole[64]; /* entries evicted */
    size_t nwhole;
    void **device[64]; /* device copies dropped: NULL-terminated pointer lists */
    size_t ndevice;
} victims_t;

/* ---- the RAM side (cache.c), for the device side ---------------------------- */

/* Records this thread's failure for ta_cache_last_error; returns rc. */
int _ta_cache_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The message of this thread's last failure. */
const char *_ta_cache_last_message(void);
void _ta_cache_log(ta_cache_t *c, ta_log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void _ta_cache_snapshot_if_debug(ta_cache_t *c, ta_memory_snapshot_t *s);
void _ta_cache_log_snapshot_diff(ta_cache_t *c, const ta_memory_snapshot_t *before);

/* Eviction for the VRAM budget (cache mutex held); victims freed by the
 * caller after unlocking, with _ta_cache_victims_free. */
int _ta_cache_make_room_vram(ta_cache_t *c, size_t need, victims_t *v);
void _ta_cache_victims_free(victims_t *v);
/* Charges need more RAM bytes to a locked entry, evicting others. */
int _ta_cache_charge_entry(ta_cache_t *c, ta_entry_t *e, size_t need, const char *what,
                           bool record);
/* Called with c->mu held, releases it: frees the copies marked drop_* if
 * at most holders hold e. */
void _ta_cache_drop_marked_and_unlock(ta_cache_t *c, ta_entry_t *e, int holders);

/* The steps of a load: a locked "loading" entry, its tensors, then publish
 * or abandon. */
_ta_load_opts_t _ta_cache_load_opts(const ta_cache_t *c);
int _ta_cache_open_header(const char *path, int *fd, _ta_st_header_t *h, uint64_t *total);
int _ta_cache_insert_reserved(ta_cache_t *c, const char *key, size_t need, bool building,
                              ta_entry_t **out);
int _ta_cache_append_header_tensors(ta_entry_t *e, const _ta_st_header_t *h, const char *path,
                                    _ta_span_t *spans);
void _ta_cache_abandon_entry(ta_cache_t *c, ta_entry_t *e);
void _ta_cache_publish(ta_cache_t *c, ta_entry_t *e, uint64_t bytes, double seconds,
                       const _ta_load_report_t *rep);

#endif
